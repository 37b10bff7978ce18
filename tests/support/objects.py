"""Small valid DICOM objects made in tests, for requests whose subject is the transport, not the pixels."""

from __future__ import annotations

import io
from typing import Callable

from pydicom import dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid


def secondary_capture(
    patient_name: str = "DOE^JANE", patient_id: str = "TEST01", *, side: int = 4, new_uid: Callable[[], str] = generate_uid
) -> tuple[bytes, str]:
    """A ``side`` x ``side`` 8-bit Secondary Capture as Part 10 bytes, and its SOP Instance UID.

    ``new_uid`` makes every UID (the fuzzers pass a deterministic one so their examples repeat).
    """
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = new_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = new_uid(), new_uid()
    ds.PatientName, ds.PatientID, ds.Modality, ds.StudyDate = patient_name, patient_id, "OT", "20240101"
    ds.Rows = ds.Columns = side
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.PixelData = bytes(i % 251 for i in range(side * side))
    buf = io.BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue(), str(ds.SOPInstanceUID)
