"""Where the conformance run takes its UIDs from: a KOS manifest, or a study looked up over DICOMweb.

An Imaging Document Source publishes a study as a KOS (RAD-68); the KOS names
every series and instance a consumer may ask for and, in Retrieve Location UID
(0040,E011), the repositoryUniqueId to ask with.  That is exactly what the
cases need, so a KOS file is the general input.  For a target that also speaks
DICOMweb (xdsi does, under ``/dicomweb``), ``--study`` finds the instances with
QIDO-RS and the repositoryUniqueId in the study's own KOS when it has one.
Every UID is validated before it goes into a request or a URL.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import requests
from pydicom.uid import KeyObjectSelectionDocumentStorage

from xdsi.uids import InvalidUID, is_valid_uid, validate_uid

KOS_SOP_CLASS = str(KeyObjectSelectionDocumentStorage)


class SubjectError(ValueError):
    """The UIDs to test with could not be found; the message says what is missing."""


@dataclass(frozen=True)
class Instance:
    sop_instance_uid: str
    sop_class_uid: str = ""


@dataclass
class Subject:
    """One study on the target: what the cases request, and the patient to compare the answers with."""

    study_uid: str
    repository_unique_id: str
    series: dict[str, list[Instance]] = field(default_factory=dict)
    patient_id: str = ""
    source: str = ""  # where the UIDs came from, for the report
    other_study_uid: str = ""  # another study the target holds (ids_2018-4811 case 04); "" if none known

    def first(self, series_uid: str | None = None) -> tuple[str, Instance]:
        s = series_uid or next(iter(self.series))
        return s, self.series[s][0]

    def instances(self) -> list[tuple[str, Instance]]:
        return [(s, i) for s, items in self.series.items() for i in items]

    def image(self) -> tuple[str, Instance] | None:
        """An instance a WADO-WS rendered request can ask for: the first of an image storage SOP class."""
        for s, i in self.instances():
            if _renderable(i.sop_class_uid):
                return s, i
        return None


def _renderable(sop_class_uid: str) -> bool:
    """An image storage SOP class by its PS3.6 name; only used to pick the instance to render, so a guess is safe."""
    from pydicom.uid import UID

    name = UID(sop_class_uid).name if sop_class_uid else ""
    return "Image Storage" in name and "Presentation" not in name


def from_kos(path: Path, repository_unique_id: str | None = None) -> Subject:
    """Series, instances and Retrieve Location UID from the Current Requested Procedure Evidence of a KOS."""
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError

    try:
        ds = dcmread(path)
    except (OSError, InvalidDicomError) as exc:
        raise SubjectError(f"{path}: not a readable DICOM file ({exc})") from None
    return subject_of_kos(ds, repository_unique_id, source=f"KOS {path}")


def subject_of_kos(ds: Any, repository_unique_id: str | None = None, *, source: str = "KOS") -> Subject:
    if str(ds.get("SOPClassUID", "")) != KOS_SOP_CLASS:
        raise SubjectError(f"{source}: SOP Class {ds.get('SOPClassUID', '?')} is not Key Object Selection ({KOS_SOP_CLASS})")
    evidence = list(ds.get("CurrentRequestedProcedureEvidenceSequence", []))
    if not evidence:
        raise SubjectError(f"{source}: no Current Requested Procedure Evidence Sequence (0040,A375)")
    study = evidence[0]  # XDS-I.b: one manifest describes one study (RAD TF-3 4.68.4.1.2.1)
    subject = Subject(
        study_uid=_uid(study.get("StudyInstanceUID"), "Study Instance UID", source),
        repository_unique_id="",
        patient_id=str(ds.get("PatientID", "")),
        source=source,
    )
    locations: set[str] = set()
    for se in study.get("ReferencedSeriesSequence", []):
        series_uid = _uid(se.get("SeriesInstanceUID"), "Series Instance UID", source)
        loc = se.get("RetrieveLocationUID")
        if loc:
            locations.add(str(loc))
        for ref in se.get("ReferencedSOPSequence", []):
            subject.series.setdefault(series_uid, []).append(
                Instance(_uid(ref.get("ReferencedSOPInstanceUID"), "Referenced SOP Instance UID", source), str(ref.get("ReferencedSOPClassUID", "")))
            )
    if not subject.series:
        raise SubjectError(f"{source}: the evidence references no instances")
    if repository_unique_id:
        subject.repository_unique_id = repository_unique_id
    elif len(locations) == 1:
        subject.repository_unique_id = _uid(locations.pop(), "Retrieve Location UID", source)
    else:
        raise SubjectError(
            f"{source}: {'no' if not locations else 'more than one'} Retrieve Location UID (0040,E011) in the evidence; "
            "give --repository-unique-id"
        )
    return subject


def _uid(value: Any, what: str, source: str) -> str:
    try:
        return validate_uid(str(value or ""), what)
    except InvalidUID as exc:
        raise SubjectError(f"{source}: {exc}") from None


def dicomweb_base(ids_url: str) -> str:
    """xdsi's DICOMweb root on the same origin as its Imaging Document Source endpoint."""
    parts = urlsplit(ids_url)
    return urlunsplit((parts.scheme, parts.netloc, "/dicomweb", "", ""))


def from_dicomweb(base: str, study_uid: str, repository_unique_id: str | None, *, session: requests.Session | None = None, timeout: float = 60) -> Subject:
    """The study's series and instances by QIDO-RS; the repositoryUniqueId from the study's KOS if not given.

    QIDO lists every instance, KOS manifests among them; those are left out of the
    instance list (an IDS serves them, but the cases are about the images).
    """
    study_uid = validate_uid(study_uid, "Study Instance UID")
    http = session or requests.Session()
    base = base.rstrip("/")
    subject = Subject(study_uid=study_uid, repository_unique_id=repository_unique_id or "", source=f"QIDO-RS {base}")
    series = _qido(http, f"{base}/studies/{study_uid}/series", timeout)
    if not series:
        raise SubjectError(f"QIDO-RS {base}: study {study_uid} not found (no series)")
    manifests: list[tuple[str, str]] = []
    for s in series:
        series_uid = _value(s, "0020000E")
        if not is_valid_uid(series_uid):
            continue
        for inst in _qido(http, f"{base}/studies/{study_uid}/series/{series_uid}/instances", timeout):
            sop, cls = _value(inst, "00080018"), _value(inst, "00080016")
            if not is_valid_uid(sop):
                continue
            if cls == KOS_SOP_CLASS:
                manifests.append((series_uid, sop))
            else:
                subject.series.setdefault(series_uid, []).append(Instance(sop, cls))
    if not subject.series:
        raise SubjectError(f"QIDO-RS {base}: study {study_uid} holds no instances besides manifests")
    patients = _qido(http, f"{base}/studies?StudyInstanceUID={study_uid}", timeout)
    if patients:
        subject.patient_id = _value(patients[0], "00100020")
    for other in _qido(http, f"{base}/studies?limit=10&includefield=StudyInstanceUID", timeout):
        uid = _value(other, "0020000D")
        if uid != study_uid and is_valid_uid(uid):
            subject.other_study_uid = uid
            break
    if not subject.repository_unique_id:
        for series_uid, sop in manifests:
            kos = _wado_instance(http, f"{base}/studies/{study_uid}/series/{series_uid}/instances/{sop}", timeout)
            if kos is None:
                continue
            try:
                subject.repository_unique_id = subject_of_kos(kos, source=f"KOS {sop}").repository_unique_id
                subject.source += f", repositoryUniqueId from KOS {sop}"
                break
            except SubjectError:
                continue
    if not subject.repository_unique_id:
        raise SubjectError(f"study {study_uid} has no KOS with a Retrieve Location UID on {base}; give --repository-unique-id")
    return subject


def _qido(http: requests.Session, url: str, timeout: float) -> list[dict[str, Any]]:
    # verify per request: REQUESTS_CA_BUNDLE would override the session's --ca (requests #3829)
    r = http.get(url, headers={"Accept": "application/dicom+json"}, timeout=timeout, verify=http.verify)
    if r.status_code == 204:
        return []
    if r.status_code != 200:
        raise SubjectError(f"QIDO-RS {url}: HTTP {r.status_code} {r.text[:200]}")
    data = r.json()
    return data if isinstance(data, list) else []


def _value(obj: dict[str, Any], tag: str) -> str:
    v = (obj.get(tag) or {}).get("Value") or [""]
    return str(v[0])


def _wado_instance(http: requests.Session, url: str, timeout: float) -> Any:
    """One instance by WADO-RS (multipart/related; type="application/dicom"), parsed; ``None`` if not served."""
    from pydicom import dcmread

    from xdsi.wire.media import parse_content_type
    from xdsi.wire.multipart import MultipartError, read_parts

    r = http.get(url, headers={"Accept": 'multipart/related; type="application/dicom"'}, timeout=timeout, verify=http.verify)
    if r.status_code != 200:
        return None
    media, params = parse_content_type(r.headers.get("Content-Type", ""))
    parts: list[io.BytesIO] = []

    def sink(headers: dict[str, str]) -> io.BytesIO:
        parts.append(io.BytesIO())
        return parts[-1]

    try:
        if media != "multipart/related":
            return None
        read_parts(io.BytesIO(r.content), params.get("boundary", ""), sink)
        return dcmread(io.BytesIO(parts[0].getvalue())) if parts else None
    except (MultipartError, Exception):  # noqa: BLE001  (a KOS we cannot read is one we do not use)
        return None


def from_archive(index: Any, study_uid: str, repository_unique_id: str) -> Subject:
    """The study as this installation's index holds it (``xdsi conformance --local``), manifests left out."""
    from xdsi.xds.manifest import load_study

    study_uid = validate_uid(study_uid, "Study Instance UID")
    snap = load_study(index, study_uid)
    if snap is None:
        raise SubjectError(f"study {study_uid} is not in the local archive")
    subject = Subject(study_uid, repository_unique_id, patient_id=snap.patient_id, source="local data directory")
    for se in snap.series:
        for inst in se.instances:
            if inst.sop_class_uid != KOS_SOP_CLASS:
                subject.series.setdefault(se.series_uid, []).append(Instance(inst.sop_instance_uid, inst.sop_class_uid))
    if not subject.series:
        raise SubjectError(f"study {study_uid} holds no instances besides manifests")
    with index.session() as session:
        from sqlalchemy import select

        from xdsi.index.models import Study

        other = session.scalars(select(Study.study_uid).where(Study.study_uid != study_uid).limit(1)).first()
    subject.other_study_uid = other or ""
    return subject
