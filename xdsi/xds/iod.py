"""Which kind of IOD a SOP class is, for the value type of a KOS content item (TID 2010).

A Key Object Selection Document references each instance with a content item
whose Value Type depends on the referenced object (PS3.3 C.17.3, TID 2010 row
"IMAGE / WAVEFORM / COMPOSITE"): IMAGE for an image IOD (one with the Image
Pixel Module), WAVEFORM for a Waveform IOD, COMPOSITE for any other composite
object.  SOP class *names* do not tell it: a Waveform Presentation State or a
Waveform Annotation SR is not a waveform, a Segmentation or a Parametric Map is
an image without "Image" in its name.  Hence two explicit tables, from the
Storage SOP classes of PS3.4 Annex B (Table B.5-1) and their IODs in PS3.3
Annex A; a SOP class in neither is COMPOSITE.
"""

from __future__ import annotations

# Storage SOP classes whose IOD is an image IOD (PS3.3 Annex A IODs including the Image Pixel Module)
IMAGE_STORAGE: frozenset[str] = frozenset({
    "1.2.840.10008.5.1.4.1.1.1",  # Computed Radiography Image Storage
    "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray Image Storage - For Presentation
    "1.2.840.10008.5.1.4.1.1.1.1.1",  # Digital X-Ray Image Storage - For Processing
    "1.2.840.10008.5.1.4.1.1.1.2",  # Digital Mammography X-Ray Image Storage - For Presentation
    "1.2.840.10008.5.1.4.1.1.1.2.1",  # Digital Mammography X-Ray Image Storage - For Processing
    "1.2.840.10008.5.1.4.1.1.1.3",  # Digital Intra-Oral X-Ray Image Storage - For Presentation
    "1.2.840.10008.5.1.4.1.1.1.3.1",  # Digital Intra-Oral X-Ray Image Storage - For Processing
    "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
    "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT Image Storage
    "1.2.840.10008.5.1.4.1.1.2.2",  # Legacy Converted Enhanced CT Image Storage
    "1.2.840.10008.5.1.4.1.1.3",  # Ultrasound Multi-frame Image Storage (retired)
    "1.2.840.10008.5.1.4.1.1.3.1",  # Ultrasound Multi-frame Image Storage
    "1.2.840.10008.5.1.4.1.1.4",  # MR Image Storage
    "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR Image Storage
    "1.2.840.10008.5.1.4.1.1.4.3",  # Enhanced MR Color Image Storage
    "1.2.840.10008.5.1.4.1.1.4.4",  # Legacy Converted Enhanced MR Image Storage
    "1.2.840.10008.5.1.4.1.1.5",  # Nuclear Medicine Image Storage (retired)
    "1.2.840.10008.5.1.4.1.1.6",  # Ultrasound Image Storage (retired)
    "1.2.840.10008.5.1.4.1.1.6.1",  # Ultrasound Image Storage
    "1.2.840.10008.5.1.4.1.1.6.2",  # Enhanced US Volume Storage
    "1.2.840.10008.5.1.4.1.1.6.3",  # Photoacoustic Image Storage
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image Storage
    "1.2.840.10008.5.1.4.1.1.7.1",  # Multi-frame Single Bit Secondary Capture Image Storage
    "1.2.840.10008.5.1.4.1.1.7.2",  # Multi-frame Grayscale Byte Secondary Capture Image Storage
    "1.2.840.10008.5.1.4.1.1.7.3",  # Multi-frame Grayscale Word Secondary Capture Image Storage
    "1.2.840.10008.5.1.4.1.1.7.4",  # Multi-frame True Color Secondary Capture Image Storage
    "1.2.840.10008.5.1.4.1.1.12.1",  # X-Ray Angiographic Image Storage
    "1.2.840.10008.5.1.4.1.1.12.1.1",  # Enhanced XA Image Storage
    "1.2.840.10008.5.1.4.1.1.12.2",  # X-Ray Radiofluoroscopic Image Storage
    "1.2.840.10008.5.1.4.1.1.12.2.1",  # Enhanced XRF Image Storage
    "1.2.840.10008.5.1.4.1.1.12.3",  # X-Ray Angiographic Bi-Plane Image Storage (retired)
    "1.2.840.10008.5.1.4.1.1.13.1.1",  # X-Ray 3D Angiographic Image Storage
    "1.2.840.10008.5.1.4.1.1.13.1.2",  # X-Ray 3D Craniofacial Image Storage
    "1.2.840.10008.5.1.4.1.1.13.1.3",  # Breast Tomosynthesis Image Storage
    "1.2.840.10008.5.1.4.1.1.13.1.4",  # Breast Projection X-Ray Image Storage - For Presentation
    "1.2.840.10008.5.1.4.1.1.13.1.5",  # Breast Projection X-Ray Image Storage - For Processing
    "1.2.840.10008.5.1.4.1.1.14.1",  # Intravascular Optical Coherence Tomography Image Storage - For Presentation
    "1.2.840.10008.5.1.4.1.1.14.2",  # Intravascular Optical Coherence Tomography Image Storage - For Processing
    "1.2.840.10008.5.1.4.1.1.20",  # Nuclear Medicine Image Storage
    "1.2.840.10008.5.1.4.1.1.30",  # Parametric Map Storage
    "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation Storage
    "1.2.840.10008.5.1.4.1.1.77.1",  # VL Image Storage - Trial (retired)
    "1.2.840.10008.5.1.4.1.1.77.1.1",  # VL Endoscopic Image Storage
    "1.2.840.10008.5.1.4.1.1.77.1.1.1",  # Video Endoscopic Image Storage
    "1.2.840.10008.5.1.4.1.1.77.1.2",  # VL Microscopic Image Storage
    "1.2.840.10008.5.1.4.1.1.77.1.2.1",  # Video Microscopic Image Storage
    "1.2.840.10008.5.1.4.1.1.77.1.3",  # VL Slide-Coordinates Microscopic Image Storage
    "1.2.840.10008.5.1.4.1.1.77.1.4",  # VL Photographic Image Storage
    "1.2.840.10008.5.1.4.1.1.77.1.4.1",  # Video Photographic Image Storage
    "1.2.840.10008.5.1.4.1.1.77.1.5.1",  # Ophthalmic Photography 8 Bit Image Storage
    "1.2.840.10008.5.1.4.1.1.77.1.5.2",  # Ophthalmic Photography 16 Bit Image Storage
    "1.2.840.10008.5.1.4.1.1.77.1.5.4",  # Ophthalmic Tomography Image Storage
    "1.2.840.10008.5.1.4.1.1.77.1.5.5",  # Wide Field Ophthalmic Photography Stereographic Projection Image Storage
    "1.2.840.10008.5.1.4.1.1.77.1.5.6",  # Wide Field Ophthalmic Photography 3D Coordinates Image Storage
    "1.2.840.10008.5.1.4.1.1.77.1.5.7",  # Ophthalmic Optical Coherence Tomography En Face Image Storage
    "1.2.840.10008.5.1.4.1.1.77.1.5.8",  # Ophthalmic Optical Coherence Tomography B-scan Volume Analysis Storage
    "1.2.840.10008.5.1.4.1.1.77.1.6",  # VL Whole Slide Microscopy Image Storage
    "1.2.840.10008.5.1.4.1.1.77.1.7",  # Dermoscopic Photography Image Storage
    "1.2.840.10008.5.1.4.1.1.77.1.8",  # Confocal Microscopy Image Storage
    "1.2.840.10008.5.1.4.1.1.77.1.9",  # Confocal Microscopy Tiled Pyramidal Image Storage
    "1.2.840.10008.5.1.4.1.1.77.2",  # VL Multi-frame Image Storage - Trial (retired)
    "1.2.840.10008.5.1.4.1.1.81.1",  # Ophthalmic Thickness Map Storage
    "1.2.840.10008.5.1.4.1.1.82.1",  # Corneal Topography Map Storage
    "1.2.840.10008.5.1.4.1.1.128",  # Positron Emission Tomography Image Storage
    "1.2.840.10008.5.1.4.1.1.128.1",  # Legacy Converted Enhanced PET Image Storage
    "1.2.840.10008.5.1.4.1.1.130",  # Enhanced PET Image Storage
    "1.2.840.10008.5.1.4.1.1.481.1",  # RT Image Storage
    "1.2.840.10008.5.1.4.1.1.481.23",  # Enhanced RT Image Storage
    "1.2.840.10008.5.1.4.1.1.481.24",  # Enhanced Continuous RT Image Storage
    "1.2.840.10008.5.1.4.1.1.501.1",  # DICOS CT Image Storage
    "1.2.840.10008.5.1.4.1.1.501.2.1",  # DICOS Digital X-Ray Image Storage - For Presentation
    "1.2.840.10008.5.1.4.1.1.501.2.2",  # DICOS Digital X-Ray Image Storage - For Processing
    "1.2.840.10008.5.1.4.1.1.601.1",  # Eddy Current Image Storage
    "1.2.840.10008.5.1.4.1.1.601.2",  # Eddy Current Multi-frame Image Storage
})

# Waveform Storage SOP classes (PS3.4 B.5, the Waveform IODs of PS3.3 A.34 and later); the 1.2.840.10008.5.1.4.1.1.9 arc
WAVEFORM_STORAGE: frozenset[str] = frozenset({
    "1.2.840.10008.5.1.4.1.1.9.1",  # Waveform Storage - Trial (retired)
    "1.2.840.10008.5.1.4.1.1.9.1.1",  # 12-lead ECG Waveform Storage
    "1.2.840.10008.5.1.4.1.1.9.1.2",  # General ECG Waveform Storage
    "1.2.840.10008.5.1.4.1.1.9.1.3",  # Ambulatory ECG Waveform Storage
    "1.2.840.10008.5.1.4.1.1.9.1.4",  # General 32-bit ECG Waveform Storage
    "1.2.840.10008.5.1.4.1.1.9.2.1",  # Hemodynamic Waveform Storage
    "1.2.840.10008.5.1.4.1.1.9.3.1",  # Cardiac Electrophysiology Waveform Storage
    "1.2.840.10008.5.1.4.1.1.9.4.1",  # Basic Voice Audio Waveform Storage
    "1.2.840.10008.5.1.4.1.1.9.4.2",  # General Audio Waveform Storage
    "1.2.840.10008.5.1.4.1.1.9.5.1",  # Arterial Pulse Waveform Storage
    "1.2.840.10008.5.1.4.1.1.9.6.1",  # Respiratory Waveform Storage
    "1.2.840.10008.5.1.4.1.1.9.6.2",  # Multi-channel Respiratory Waveform Storage
    "1.2.840.10008.5.1.4.1.1.9.7.1",  # Routine Scalp Electroencephalogram Waveform Storage
    "1.2.840.10008.5.1.4.1.1.9.7.2",  # Electromyogram Waveform Storage
    "1.2.840.10008.5.1.4.1.1.9.7.3",  # Electrooculogram Waveform Storage
    "1.2.840.10008.5.1.4.1.1.9.7.4",  # Sleep Electroencephalogram Waveform Storage
    "1.2.840.10008.5.1.4.1.1.9.8.1",  # Body Position Waveform Storage
})


def content_value_type(sop_class_uid: str) -> str:
    """IMAGE, WAVEFORM or COMPOSITE: the TID 2010 value type of a reference to an instance of this SOP class."""
    uid = str(sop_class_uid).strip()
    if uid in IMAGE_STORAGE:
        return "IMAGE"
    if uid in WAVEFORM_STORAGE:
        return "WAVEFORM"
    return "COMPOSITE"
