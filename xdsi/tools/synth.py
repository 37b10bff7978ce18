"""Synthetic DICOM instances for tests and benchmarks: valid CT images with controllable identity."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, UID

from xdsi.uids import new_uid


@dataclass
class StudySpec:
    patient_id: str = "PAT001"
    patient_name: str = "DOE^JANE"
    issuer: str = "HOSP"
    birth_date: str = "19700101"
    sex: str = "F"
    study_uid: str = field(default_factory=new_uid)
    study_date: str = "20240115"
    study_time: str = "101500"
    accession: str = "ACC001"
    description: str = "CT CHEST"
    modality: str = "CT"
    body_part: str = "CHEST"


def ct_instance(
    spec: StudySpec,
    series_uid: str,
    number: int,
    *,
    rows: int = 64,
    columns: int = 64,
    transfer_syntax: str = ExplicitVRLittleEndian,
    series_number: int = 1,
    seed: int | None = None,
) -> Dataset:
    """One CT image (16-bit, MONOCHROME2) of the given study and series."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    sop_uid = new_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = UID(transfer_syntax)
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.PatientName = spec.patient_name
    ds.PatientID = spec.patient_id
    ds.IssuerOfPatientID = spec.issuer
    ds.PatientBirthDate = spec.birth_date
    ds.PatientSex = spec.sex
    ds.StudyInstanceUID = spec.study_uid
    ds.StudyDate = spec.study_date
    ds.StudyTime = spec.study_time
    ds.AccessionNumber = spec.accession
    ds.StudyID = "1"
    ds.StudyDescription = spec.description
    ds.ReferringPhysicianName = "SMITH^JOHN"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.Modality = spec.modality
    ds.BodyPartExamined = spec.body_part
    ds.InstanceNumber = number
    ds.ContentDate = spec.study_date
    ds.ContentTime = spec.study_time
    ds.FrameOfReferenceUID = spec.study_uid + ".1"
    ds.PositionReferenceIndicator = ""
    ds.ImagePositionPatient = [0, 0, float(number)]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SliceThickness = 1.0
    ds.PixelSpacing = [0.5, 0.5]
    ds.KVP = 120
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.WindowCenter = 40
    ds.WindowWidth = 400
    rng = np.random.default_rng(seed if seed is not None else number)
    ds.PixelData = rng.integers(0, 4096, size=(rows, columns), dtype=np.uint16).tobytes()
    return ds


def write_study(
    out_dir: Path,
    spec: StudySpec,
    *,
    series: int = 1,
    per_series: int = 3,
    rows: int = 64,
    columns: int = 64,
    transfer_syntax: str = ExplicitVRLittleEndian,
) -> list[Path]:
    """Write a study as Part 10 files; returns the paths in series/instance order."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for s in range(series):
        series_uid = new_uid()
        for i in range(per_series):
            ds = ct_instance(spec, series_uid, i + 1, rows=rows, columns=columns, transfer_syntax=transfer_syntax, series_number=s + 1)
            p = out_dir / f"{ds.SOPInstanceUID}.dcm"
            ds.save_as(p, enforce_file_format=True)
            paths.append(p)
    return paths
