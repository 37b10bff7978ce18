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
import logging
import re
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from io import BytesIO
from typing import Any, Iterable, Protocol, Sequence

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID, ExplicitVRLittleEndian, KeyObjectSelectionDocumentStorage, PYDICOM_IMPLEMENTATION_UID
from pydicom.valuerep import validate_value
from sqlalchemy import select

from xdsi.index.db import Index
from xdsi.index.models import Instance, Patient, Series, Study
from xdsi.uids import is_valid_uid, new_uid
from xdsi.standards.constants import DCMR_MAPPING, KOS_TEMPLATE_ID, MANIFEST_TITLE
from xdsi.xds.iod import content_value_type

log = logging.getLogger(__name__)
TZ_OFFSET = re.compile(r"[+-](0\d|1[0-4])[0-5]\d")  # (0008,0201) &ZZXX, -1200 .. +1400


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
    series_number: int | None = None
    # Anatomic Region Sequence (0008,2218) of the series' first instance: (Code Value, Designator, Code Meaning)
    anatomic_regions: tuple[tuple[str, str, str], ...] = ()


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
    # Timezone Offset From UTC (0008,0201) of the instances ("+HHMM"/"-HHMM"); "" when they do not say
    timezone_offset: str = ""
    # Requested Procedure ID (0040,1001) of the instances' Request Attributes Sequence, when they agree on one
    requested_procedure_id: str = ""
    # latest Series or Content Date+Time of the study (local, YYYYMMDDHHMMSS): the end of the service
    last_date_time: str = ""

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


def date_time(date: str, time: str) -> str:
    """DA + TM as YYYYMMDDHHMMSS (missing time digits as zeros); "" when the date is not YYYYMMDD."""
    if not re.fullmatch(r"\d{8}", date or ""):
        return ""
    t = re.sub(r"[^0-9]", "", (time or "").split(".")[0])[:6]
    return date + ((t + "000000")[:6] if len(t) in (2, 4, 6) else "000000")


class HeaderReader(Protocol):
    """What :func:`load_study` needs of the retrieve service to read one header per series."""

    def select(self, *, study_uids: Iterable[str] = ...) -> list[Any]: ...  # noqa: E704
    def header(self, ref: Any) -> Dataset: ...  # noqa: E704


def _header_facts(headers: HeaderReader, study_uid: str, series_uids: set[str], excluded: set[str]) -> dict[str, Dataset]:
    """The header (no pixels) of the first instance of each series, for what the index does not keep.

    Anatomic Region Sequence, Timezone Offset From UTC and Request Attributes are
    per instance in DICOM and not indexed; one header per series is read (a
    cold instance is recalled, as any read does).  A header that cannot be read
    leaves that series without these facts, logged, rather than failing the
    manifest.
    """
    out: dict[str, Dataset] = {}
    for ref in headers.select(study_uids=[study_uid]):
        if ref.series_uid in out or ref.series_uid not in series_uids or ref.sop_instance_uid in excluded:
            continue
        try:
            out[ref.series_uid] = headers.header(ref)
        except Exception as exc:  # noqa: BLE001 - a missing fact is reported, not fatal
            log.warning("study %s: header of %s unreadable (%s); its anatomic region and request attributes are not used",
                        study_uid, ref.sop_instance_uid, exc)
    return out


def _regions(ds: Dataset | None) -> tuple[tuple[str, str, str], ...]:
    if ds is None:
        return ()
    return tuple(
        (str(i.get("CodeValue", "") or ""), str(i.get("CodingSchemeDesignator", "") or ""), str(i.get("CodeMeaning", "") or ""))
        for i in ds.get("AnatomicRegionSequence", []) or []
        if i.get("CodeValue")
    )


def load_study(
    index: Index, study_uid: str, exclude_sops: Iterable[str] = (), headers: HeaderReader | None = None
) -> StudySnapshot | None:
    """The study as the index has it now, without the instances in ``exclude_sops`` (our manifests).

    With ``headers`` (the archive's retrieve service) the first instance of each
    series is read for the attributes the index does not keep (see :func:`_header_facts`).
    """
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
        last = ""
        for se in series_rows:
            insts = s.execute(
                select(Instance.sop_instance_uid, Instance.sop_class_uid, Instance.content_date, Instance.content_time)
                .where(Instance.series_fk == se.pk)
                .order_by(Instance.instance_number, Instance.pk)
            ).all()
            kept = tuple(InstanceRow(u, c) for u, c, _, _ in insts if u not in excluded)
            if kept:
                out.append(SeriesRow(se.series_uid, se.modality, se.body_part, kept, se.series_number))
                last = max([last, date_time(se.series_date, se.series_time),
                            *(date_time(d, t) for u, _, d, t in insts if u not in excluded)])
        code = (study.procedure_code_value, study.procedure_code_scheme, study.procedure_code_meaning)
        snap = StudySnapshot(
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
            last_date_time=last if last >= date_time(study.study_date, study.study_time) else "",
        )
    return with_header_facts(snap, headers, excluded) if headers is not None else snap


def with_header_facts(snap: StudySnapshot, headers: HeaderReader, excluded: set[str]) -> StudySnapshot:
    """``snap`` with what one header per series adds: anatomic regions, time zone, Requested Procedure ID.

    Read outside the index session: no transaction is held open while files are read.
    """
    found = _header_facts(headers, snap.study_uid, {r.series_uid for r in snap.series}, excluded)
    offsets = [str(ds.get("TimezoneOffsetFromUTC", "") or "").strip() for ds in found.values()]
    rpids = list(dict.fromkeys(
        v for ds in found.values() for item in (ds.get("RequestAttributesSequence", []) or [])
        if (v := str(item.get("RequestedProcedureID", "") or "").strip())
    ))
    return replace(
        snap,
        series=tuple(replace(r, anatomic_regions=_regions(found.get(r.series_uid))) for r in snap.series),
        timezone_offset=next((o for o in offsets if TZ_OFFSET.fullmatch(o)), ""),
        # one request: its ID; several or none: empty (Type 2), never the Study ID
        requested_procedure_id=rpids[0] if len(rpids) == 1 else "",
    )


def next_series_number(snap: StudySnapshot) -> int:
    """The first Series Number above every series of the study: the manifest's series never reuses one."""
    used = [s.series_number for s in snap.series if s.series_number is not None]
    return min(max(used, default=0) + 1, 2**31 - 1)  # IS range


def tz_from_offset(offset: str) -> timezone | None:
    """The zone of a Timezone Offset From UTC (0008,0201) value ("+0100"), None for "" or a malformed one."""
    if not TZ_OFFSET.fullmatch(offset or ""):
        return None
    sign = -1 if offset[0] == "-" else 1
    return timezone(sign * timedelta(hours=int(offset[1:3]), minutes=int(offset[3:5])))


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


def build_kos(
    snap: StudySnapshot,
    retrieve: RetrieveInfo,
    *,
    now: datetime | None = None,
    sop_instance_uid: str | None = None,
    series_uid: str | None = None,
    series_number: int | None = None,
    manufacturer: str = "xdsi",
) -> Manifest:
    """The KOS manifest of ``snap``, checked; raises :class:`NonConformantManifest` instead of returning a bad one."""
    if not snap.series:
        raise NonConformantManifest(f"study {snap.study_uid} has no instances to reference")
    now = now or datetime.now().astimezone()
    zone = tz_from_offset(snap.timezone_offset)
    if zone is not None:  # our dates in the study's zone, which then applies to every date of the KOS
        now = now.astimezone(zone)
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
    if zone is not None:
        ds.TimezoneOffsetFromUTC = snap.timezone_offset
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
    ds.SeriesNumber = series_number if series_number else next_series_number(snap)
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
    req.RequestedProcedureID = snap.requested_procedure_id  # Type 2: from Request Attributes, never the Study ID
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
            c.ValueType = content_value_type(inst.sop_class_uid)
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
