"""The XDS-I.b manifest: a Key Object Selection Document built from the index (RAD TF-3 4.68.4.1.2.1).

The manifest is built from index rows only (no stored file is opened), so it
can be made for a study of any size.  Like highdicom, :func:`build_kos`
refuses to return a non-conformant object: :func:`check_kos` checks the Type 1
and Type 2 attributes of every module of the KOS IOD that we fill, every UID,
every value against its VR, and that the evidence references exactly the
study's instances.  The same object is then checked by Debian's ``dciodvfy`` in
the tests.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime
from io import BytesIO
from typing import Iterable, Sequence

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID, ExplicitVRLittleEndian, KeyObjectSelectionDocumentStorage, PYDICOM_IMPLEMENTATION_UID
from pydicom.valuerep import validate_value
from sqlalchemy import select

from xdsi.index.db import Index
from xdsi.index.models import Instance, Patient, Series, Study
from xdsi.uids import is_valid_uid, new_uid
from xdsi.standards.constants import DCMR_MAPPING, KOS_TEMPLATE_ID, MANIFEST_TITLE


class NonConformantManifest(ValueError):
    """The KOS would not be a valid DICOM object; the message lists every problem found."""


class StudyNotFound(LookupError):
    pass


@dataclass(frozen=True)
class InstanceRow:
    sop_instance_uid: str
    sop_class_uid: str


@dataclass(frozen=True)
class SeriesRow:
    series_uid: str
    modality: str
    body_part: str
    instances: tuple[InstanceRow, ...]


@dataclass(frozen=True)
class StudySnapshot:
    """What the index knows of a study, excluding our own manifests: the input of the KOS and the metadata."""

    patient_id: str
    issuer_of_patient_id: str
    patient_name: str
    birth_date: str
    sex: str
    study_uid: str
    study_date: str
    study_time: str
    accession_number: str
    accession_issuer: str
    study_id: str
    study_description: str
    referring_physician: str
    procedure_code: tuple[str, str, str] | None
    series: tuple[SeriesRow, ...]
    updated_at: datetime | None = None

    @property
    def sop_uids(self) -> list[str]:
        return sorted(i.sop_instance_uid for s in self.series for i in s.instances)

    @property
    def instance_count(self) -> int:
        return sum(len(s.instances) for s in self.series)

    @property
    def fingerprint(self) -> str:
        """sha1 of the sorted SOP Instance UIDs: equal fingerprints mean the manifest would not change."""
        return hashlib.sha1("\n".join(self.sop_uids).encode("ascii")).hexdigest()

    def _distinct(self, attr: str) -> list[str]:
        """Distinct non-empty values over the series that have instances, in series order."""
        return list(dict.fromkeys(v for s in self.series if s.instances and (v := getattr(s, attr))))

    @property
    def modalities(self) -> list[str]:
        return self._distinct("modality")

    @property
    def body_parts(self) -> list[str]:
        return self._distinct("body_part")


def load_study(index: Index, study_uid: str, exclude_sops: Iterable[str] = ()) -> StudySnapshot | None:
    """The study as the index has it now, without the instances in ``exclude_sops`` (our manifests)."""
    excluded = set(exclude_sops)
    with index.session() as s:
        row = s.execute(
            select(Study, Patient).join(Patient, Study.patient_fk == Patient.pk).where(Study.study_uid == study_uid)
        ).one_or_none()
        if row is None:
            return None
        study, patient = row
        series_rows = s.scalars(
            select(Series).where(Series.study_fk == study.pk).order_by(Series.series_number, Series.pk)
        ).all()
        out: list[SeriesRow] = []
        for se in series_rows:
            insts = s.execute(
                select(Instance.sop_instance_uid, Instance.sop_class_uid)
                .where(Instance.series_fk == se.pk)
                .order_by(Instance.instance_number, Instance.pk)
            ).all()
            kept = tuple(InstanceRow(u, c) for u, c in insts if u not in excluded)
            if kept:
                out.append(SeriesRow(se.series_uid, se.modality, se.body_part, kept))
        code = (study.procedure_code_value, study.procedure_code_scheme, study.procedure_code_meaning)
        return StudySnapshot(
            patient_id=patient.patient_id,
            issuer_of_patient_id=patient.issuer_of_patient_id,
            patient_name=study.patient_name,
            birth_date=study.patient_birth_date,
            sex=study.patient_sex,
            study_uid=study.study_uid,
            study_date=study.study_date,
            study_time=study.study_time,
            accession_number=study.accession_number,
            accession_issuer=study.accession_issuer,
            study_id=study.study_id,
            study_description=study.study_description,
            referring_physician=study.referring_physician,
            procedure_code=code if code[0] else None,
            series=tuple(out),
            updated_at=study.updated_at,
        )


@dataclass(frozen=True)
class RetrieveInfo:
    """What goes on every referenced series so consumers can fetch the images (RAD-69, C-MOVE, WADO-RS)."""

    ae_title: str
    location_uid: str  # = our repositoryUniqueId
    wado_rs_base: str  # Retrieve URL is this + /studies/{study}/series/{series}


@dataclass
class Manifest:
    dataset: Dataset
    data: bytes  # the Part 10 bytes, exactly what is stored, sent and served over ITI-43
    sop_instance_uid: str
    series_uid: str
    fingerprint: str
    instance_count: int
    modalities: list[str] = field(default_factory=list)

    @property
    def sha1(self) -> str:
        return hashlib.sha1(self.data).hexdigest()

    @property
    def size(self) -> int:
        return len(self.data)


def _code_item(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _content_value_type(sop_class_uid: str) -> str:
    """IMAGE for image storage classes, WAVEFORM for waveforms, COMPOSITE for anything else (TID 2010)."""
    name = UID(sop_class_uid).name
    if "Waveform" in name:
        return "WAVEFORM"
    if "Image" in name and "Storage" in name:
        return "IMAGE"
    return "COMPOSITE"


def build_kos(
    snap: StudySnapshot,
    retrieve: RetrieveInfo,
    *,
    now: datetime | None = None,
    sop_instance_uid: str | None = None,
    series_uid: str | None = None,
    series_number: int = 9901,
    manufacturer: str = "xdsi",
) -> Manifest:
    """The KOS manifest of ``snap``, checked; raises :class:`NonConformantManifest` instead of returning a bad one."""
    if not snap.series:
        raise NonConformantManifest(f"study {snap.study_uid} has no instances to reference")
    now = now or datetime.now().astimezone()
    sop_uid = sop_instance_uid or new_uid()
    ser_uid = series_uid or new_uid()

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = KeyObjectSelectionDocumentStorage
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta.ImplementationVersionName = "XDSI_KOS_1"

    # SOP Common
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = now.strftime("%H%M%S")
    ds.SOPClassUID = KeyObjectSelectionDocumentStorage
    ds.SOPInstanceUID = sop_uid
    # General Study (values unchanged from the study)
    ds.StudyDate = snap.study_date
    ds.StudyTime = snap.study_time
    ds.AccessionNumber = snap.accession_number
    if snap.accession_issuer:
        issuer = Dataset()
        issuer.LocalNamespaceEntityID = snap.accession_issuer
        ds.IssuerOfAccessionNumberSequence = DicomSequence([issuer])
    ds.Modality = "KO"
    ds.Manufacturer = manufacturer
    ds.ReferringPhysicianName = snap.referring_physician
    if snap.study_description:
        ds.StudyDescription = snap.study_description
    if snap.procedure_code:
        ds.ProcedureCodeSequence = DicomSequence([_code_item(*snap.procedure_code)])
    ds.ReferencedPerformedProcedureStepSequence = DicomSequence([])
    # Patient
    ds.PatientName = snap.patient_name
    ds.PatientID = snap.patient_id
    if snap.issuer_of_patient_id:
        ds.IssuerOfPatientID = snap.issuer_of_patient_id
    ds.PatientBirthDate = snap.birth_date
    ds.PatientSex = snap.sex
    ds.StudyInstanceUID = snap.study_uid
    ds.SeriesInstanceUID = ser_uid
    ds.StudyID = snap.study_id
    ds.SeriesNumber = series_number
    ds.InstanceNumber = 1
    # SR Document Content (root of TID 2010)
    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = DicomSequence([_code_item(MANIFEST_TITLE.value, MANIFEST_TITLE.scheme_designator, MANIFEST_TITLE.meaning)])
    ds.ContinuityOfContent = "SEPARATE"
    ds.ContentDate = now.strftime("%Y%m%d")
    ds.ContentTime = now.strftime("%H%M%S")
    # Key Object Document: Referenced Request Sequence with the accession number
    req = Dataset()
    req.StudyInstanceUID = snap.study_uid
    req.ReferencedStudySequence = DicomSequence([])
    req.AccessionNumber = snap.accession_number
    if snap.accession_issuer:
        issuer = Dataset()
        issuer.LocalNamespaceEntityID = snap.accession_issuer
        req.IssuerOfAccessionNumberSequence = DicomSequence([issuer])
    req.PlacerOrderNumberImagingServiceRequest = ""
    req.FillerOrderNumberImagingServiceRequest = ""
    req.RequestedProcedureID = snap.study_id
    req.RequestedProcedureDescription = snap.study_description
    req.RequestedProcedureCodeSequence = DicomSequence([_code_item(*snap.procedure_code)] if snap.procedure_code else [])
    ds.ReferencedRequestSequence = DicomSequence([req])
    # Evidence: every referenced instance, with where to retrieve it
    study_item = Dataset()
    study_item.StudyInstanceUID = snap.study_uid
    series_items = []
    for se in snap.series:
        item = Dataset()
        item.SeriesInstanceUID = se.series_uid
        item.RetrieveAETitle = retrieve.ae_title
        item.RetrieveLocationUID = retrieve.location_uid
        if retrieve.wado_rs_base:
            item.RetrieveURL = f"{retrieve.wado_rs_base.rstrip('/')}/studies/{snap.study_uid}/series/{se.series_uid}"
        refs = []
        for inst in se.instances:
            r = Dataset()
            r.ReferencedSOPClassUID = inst.sop_class_uid
            r.ReferencedSOPInstanceUID = inst.sop_instance_uid
            refs.append(r)
        item.ReferencedSOPSequence = DicomSequence(refs)
        series_items.append(item)
    study_item.ReferencedSeriesSequence = DicomSequence(series_items)
    ds.CurrentRequestedProcedureEvidenceSequence = DicomSequence([study_item])
    template = Dataset()
    template.MappingResource = DCMR_MAPPING
    template.TemplateIdentifier = KOS_TEMPLATE_ID
    ds.ContentTemplateSequence = DicomSequence([template])
    content = []
    for se in snap.series:
        for inst in se.instances:
            c = Dataset()
            c.RelationshipType = "CONTAINS"
            c.ValueType = _content_value_type(inst.sop_class_uid)
            r = Dataset()
            r.ReferencedSOPClassUID = inst.sop_class_uid
            r.ReferencedSOPInstanceUID = inst.sop_instance_uid
            c.ReferencedSOPSequence = DicomSequence([r])
            content.append(c)
    ds.ContentSequence = DicomSequence(content)

    check_kos(ds, snap, retrieve)
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return Manifest(
        dataset=ds,
        data=buf.getvalue(),
        sop_instance_uid=sop_uid,
        series_uid=ser_uid,
        fingerprint=snap.fingerprint,
        instance_count=snap.instance_count,
        modalities=snap.modalities,
    )


# Type 1 (present, non-empty) and Type 2 (present) attributes of the modules we fill (PS3.3 A.35.4)
_TYPE1 = (
    "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality", "SeriesNumber",
    "InstanceNumber", "ContentDate", "ContentTime", "ValueType", "ConceptNameCodeSequence", "ContinuityOfContent",
    "CurrentRequestedProcedureEvidenceSequence", "ContentTemplateSequence", "ContentSequence",
)
_TYPE2 = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "ReferringPhysicianName",
    "StudyID", "AccessionNumber", "Manufacturer", "ReferencedPerformedProcedureStepSequence",
)


def _walk(ds: Dataset, path: str = "") -> Iterable[tuple[str, object]]:
    for elem in ds:
        where = f"{path}{elem.keyword or elem.tag}"
        if elem.VR == "SQ":
            for n, item in enumerate(elem.value):
                yield from _walk(item, f"{where}[{n}].")
        else:
            yield where, elem


def check_kos(ds: Dataset, snap: StudySnapshot, retrieve: RetrieveInfo) -> None:
    problems: list[str] = []
    for kw in _TYPE1:
        v = ds.get(kw)
        if v is None or v == "" or (isinstance(v, DicomSequence) and len(v) == 0):
            problems.append(f"Type 1 {kw} is missing or empty")
    for kw in _TYPE2:
        if kw not in ds:
            problems.append(f"Type 2 {kw} is missing")
    for where, elem in _walk(ds):
        e = elem  # type: ignore[assignment]
        if e.VR == "UI" and e.value not in (None, "") and not is_valid_uid(str(e.value)):  # type: ignore[attr-defined]
            problems.append(f"{where}: {e.value!r} is not a valid UID")  # type: ignore[attr-defined]
        if e.value not in (None, "") and e.VR not in ("SQ",):  # type: ignore[attr-defined]
            values = e.value if e.VM > 1 else [e.value]  # type: ignore[attr-defined]
            for v in values:
                try:
                    validate_value(e.VR, str(v) if e.VR in ("IS", "DS", "PN") else v, 2)  # type: ignore[attr-defined]  # 2: raise
                except (ValueError, TypeError) as exc:
                    problems.append(f"{where}: {exc}")
    for n, req in enumerate(ds.get("ReferencedRequestSequence", [])):
        for kw in ("ReferencedStudySequence", "AccessionNumber", "PlacerOrderNumberImagingServiceRequest",
                   "FillerOrderNumberImagingServiceRequest", "RequestedProcedureID", "RequestedProcedureDescription",
                   "RequestedProcedureCodeSequence"):
            if kw not in req:
                problems.append(f"ReferencedRequestSequence[{n}]: Type 2 {kw} is missing")
        if req.get("StudyInstanceUID") != snap.study_uid:
            problems.append(f"ReferencedRequestSequence[{n}]: Study Instance UID differs from the study")
    if ds.get("Modality") != "KO":
        problems.append("Modality is not KO")
    if any(s.series_uid == ds.get("SeriesInstanceUID") for s in snap.series):
        problems.append("the manifest must be in a new series")
    if not retrieve.ae_title:
        problems.append("Retrieve AE Title is empty")
    if not is_valid_uid(retrieve.location_uid):
        problems.append(f"Retrieve Location UID {retrieve.location_uid!r} is not a UID")
    referenced = sorted(
        r.ReferencedSOPInstanceUID
        for st in ds.get("CurrentRequestedProcedureEvidenceSequence", [])
        for se in st.get("ReferencedSeriesSequence", [])
        for r in se.get("ReferencedSOPSequence", [])
    )
    if referenced != snap.sop_uids:
        problems.append(f"evidence references {len(referenced)} instance(s), the study has {snap.instance_count}")
    content = sorted(r.ReferencedSOPInstanceUID for c in ds.get("ContentSequence", []) for r in c.ReferencedSOPSequence)
    if content != snap.sop_uids:
        problems.append("the content tree does not reference exactly the evidence instances")
    if problems:
        raise NonConformantManifest(f"KOS for study {snap.study_uid} not built: " + "; ".join(problems))


def referenced_sops(ds: Dataset) -> Sequence[str]:
    return [
        r.ReferencedSOPInstanceUID
        for st in ds.get("CurrentRequestedProcedureEvidenceSequence", [])
        for se in st.get("ReferencedSeriesSequence", [])
        for r in se.get("ReferencedSOPSequence", [])
    ]
