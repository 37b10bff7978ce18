"""xdsi: an IHE XDS-I.b Imaging Document Source and DICOM archive."""

__version__ = "0.1.0"
