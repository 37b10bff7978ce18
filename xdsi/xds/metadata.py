"""ebRIM metadata of a manifest submission: SubmitObjectsRequest with DocumentEntry, SubmissionSet, associations.

The layout follows ITI TF-3 4.2.3 / 4.3.1 and RAD TF-3 4.68.4.1.2.3 as digested
in FACTS.md §3.4.  Element order inside each ebRIM object follows rim.xsd
(Slot*, Name, Description, Classification*, ExternalIdentifier*), so the
result validates against the official schema.  Every coded value comes from
the affinity domain's :class:`~xdsi.xds.codes.CodeTable`; identifiers are
checked for HL7 v2 delimiters before they are put into CX/XCN/XON strings,
because a registry rejects a malformed CX outright.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from lxml import etree

from xdsi.config import XdsSettings
from xdsi.standards import constants as C
from xdsi.xds.codes import Code, CodeNotInDomain, CodeTable
from xdsi.xds.events import event_codes as study_event_codes
from xdsi.xds.manifest import StudySnapshot, date_time, tz_from_offset

if TYPE_CHECKING:
    from xdsi.xds.patients import PatientIds

_OID = re.compile(r"^[0-2](\.(0|[1-9][0-9]*))+$")
_HL7_DELIMS = re.compile(r"[\^&~\\|]")

# DICOM Coding Scheme Designator -> the OID affinity domains use as codingScheme
DESIGNATOR_OIDS = {
    "LN": "2.16.840.1.113883.6.1",
    "SCT": "2.16.840.1.113883.6.96",
    "SRT": "2.16.840.1.113883.6.96",
    "DCM": "1.2.840.10008.2.16.4",
}


class MetadataError(ValueError):
    """The metadata cannot be built from this study and configuration; the message says what to fix."""


def new_entry_uuid() -> str:
    return f"urn:uuid:{uuid.uuid4()}"


def oid_uid() -> str:
    """A uniqueId for a SubmissionSet: an OID (2.25 root), as ITI TF-3 4.2.3.3.12 requires."""
    return f"2.25.{uuid.uuid4().int}"


def xds_time(dt: datetime) -> str:
    """DTM in UTC, to the second (ITI TF-3 4.2.3.1.7)."""
    return dt.astimezone(timezone.utc).strftime("%Y%m%d%H%M%S")


def _hl7_safe(value: str, what: str) -> str:
    if not value or _HL7_DELIMS.search(value):
        raise MetadataError(f"{what} {value!r} is empty or contains an HL7 delimiter (^ & ~ \\ |)")
    return value


def cx(id_value: str, authority_oid: str, what: str = "patient ID") -> str:
    """``ID^^^&OID&ISO`` (ITI TF-3 4.2.3.1.7, CX with an ISO assigning authority)."""
    if not _OID.match(authority_oid):
        raise MetadataError(f"assigning authority {authority_oid!r} for {what} is not an OID")
    return f"{_hl7_safe(id_value, what)}^^^&{authority_oid}&ISO"


def xpn(dicom_pn: str) -> str:
    """DICOM PN (family^given^middle^prefix^suffix) -> HL7 XPN (family^given^middle^suffix^prefix)."""
    alphabetic = dicom_pn.split("=")[0]
    parts = (alphabetic.split("^") + [""] * 5)[:5]
    family, given, middle, prefix, suffix = (p.replace("&", " ").replace("~", " ").replace("|", " ") for p in parts)
    return "^".join([family, given, middle, suffix, prefix]).rstrip("^")


def source_patient_info(snap: StudySnapshot, ids: "PatientIds") -> list[str]:
    info = [f"PID-3|{ids.source}"]
    if snap.patient_name:
        info.append(f"PID-5|{xpn(snap.patient_name)}")
    if re.fullmatch(r"\d{8}", snap.birth_date or ""):
        info.append(f"PID-7|{snap.birth_date}")
    if snap.sex in ("M", "F", "O", "U"):
        info.append(f"PID-8|{snap.sex}")
    return info


def _local(date_time: str, offset: str) -> datetime:
    """YYYYMMDDHHMMSS in the zone Timezone Offset From UTC (0008,0201) names, else the server's own zone."""
    naive = datetime.strptime(date_time, "%Y%m%d%H%M%S")
    zone = tz_from_offset(offset)
    if zone is not None:
        return naive.replace(tzinfo=zone)
    return naive.astimezone()  # the instances do not say: the modality is assumed to be in our zone


def service_start_time(snap: StudySnapshot) -> str | None:
    """Study Date/Time as an XDS UTC DTM (its zone from (0008,0201) when given); None when the study has no date."""
    start = date_time(snap.study_date, snap.study_time)
    return xds_time(_local(start, snap.timezone_offset)) if start else None


def service_stop_time(snap: StudySnapshot) -> str | None:
    """The latest Series/Content Date+Time of the study as an XDS UTC DTM (serviceStopTime, R2); None if unknown."""
    if not snap.last_date_time or service_start_time(snap) is None:
        return None
    return xds_time(_local(snap.last_date_time, snap.timezone_offset))


def configured_code(codes: CodeTable, code_type: str, value: str) -> Code:
    """A configured ``CODE`` or ``CODE^SCHEME`` looked up in the domain's list."""
    code, _, scheme = value.partition("^")
    return codes.get(code_type, code, scheme or None)


def type_code(snap: StudySnapshot, x: XdsSettings, codes: CodeTable) -> Code:
    """From the Procedure Code Sequence when the domain lists that code (RAD TF-3), else the configured one."""
    if snap.procedure_code:
        value, designator, _ = snap.procedure_code
        found = codes.find("typeCode", value, DESIGNATOR_OIDS.get(designator, designator))
        if found is not None:
            return found
    return configured_code(codes, "typeCode", x.type_code)


def event_codes(snap: StudySnapshot, codes: CodeTable) -> list[Code]:
    """One CID 29 code per acquisition modality present, then CID 4 anatomic regions; only listed codes.

    What the domain does not list is logged and reported by ``xdsi status --study``
    (:func:`xdsi.xds.events.publication_findings`), never silently dropped.
    """
    return study_event_codes(snap, codes).codes


# -- ebRIM element helpers ---------------------------------------------------------------------

def _rim(tag: str, parent: etree._Element | None = None, **attrs: str) -> etree._Element:
    el = etree.Element(C.q("rim", tag), nsmap={"rim": C.NS_RIM}) if parent is None else etree.SubElement(parent, C.q("rim", tag))
    for k, v in attrs.items():
        el.set(k, v)
    return el


def slot(parent: etree._Element, name: str, values: list[str]) -> etree._Element:
    s = _rim("Slot", parent, name=name)
    vl = _rim("ValueList", s)
    for v in values:
        _rim("Value", vl).text = v
    return s


def name(parent: etree._Element, text: str) -> etree._Element:
    n = _rim("Name", parent)
    _rim("LocalizedString", n, value=text)
    return n


def _classification(parent: etree._Element, scheme: str, obj_id: str, node: str) -> etree._Element:
    return _rim(
        "Classification",
        parent,
        id=new_entry_uuid(),
        objectType=C.CLASSIFICATION_OBJECT_TYPE,
        classificationScheme=scheme,
        classifiedObject=obj_id,
        nodeRepresentation=node,
    )


def classification(parent: etree._Element, scheme: str, obj_id: str, code: Code) -> etree._Element:
    c = _classification(parent, scheme, obj_id, code.code)
    slot(c, "codingScheme", [code.scheme])
    name(c, code.display)
    return c


def author(parent: etree._Element, scheme: str, obj_id: str, x: XdsSettings) -> etree._Element | None:
    if not (x.author_institution or x.author_person):
        return None
    c = _classification(parent, scheme, obj_id, "")  # author classifications carry slots, not a code
    if x.author_person:
        slot(c, "authorPerson", [x.author_person])
    if x.author_institution:
        slot(c, "authorInstitution", [x.author_institution])
    if x.author_role:
        slot(c, "authorRole", [x.author_role])
    if x.author_specialty:
        slot(c, "authorSpecialty", [x.author_specialty])
    return c


def external_id(parent: etree._Element, scheme: str, obj_id: str, value: str) -> etree._Element:
    e = _rim(
        "ExternalIdentifier",
        parent,
        id=new_entry_uuid(),
        objectType=C.EXTERNAL_IDENTIFIER_OBJECT_TYPE,
        identificationScheme=scheme,
        registryObject=obj_id,
        value=value,
    )
    name(e, C.EXTERNAL_ID_NAMES[scheme])
    return e


@dataclass(frozen=True)
class DocumentInfo:
    """The manifest as the metadata sees it."""

    unique_id: str  # KOS SOP Instance UID
    entry_uuid: str
    size: int
    sha1: str
    creation_time: datetime


@dataclass(frozen=True)
class Submission:
    request: etree._Element  # lcm:SubmitObjectsRequest
    submission_set_uid: str
    patient_id: str


def build_submission(
    snap: StudySnapshot,
    doc: DocumentInfo,
    x: XdsSettings,
    codes: CodeTable,
    *,
    submission_set_uid: str,
    submission_time: datetime | None = None,
    include_repository: bool = False,
    replaces_entry_uuid: str = "",
) -> Submission:
    """The SubmitObjectsRequest registering ``doc`` (ITI-41 body, or ITI-42 when ``include_repository``)."""
    try:
        return _build(snap, doc, x, codes, submission_set_uid, submission_time or datetime.now(timezone.utc), include_repository, replaces_entry_uuid)
    except CodeNotInDomain as exc:
        raise MetadataError(str(exc)) from None


def _build(snap, doc, x, codes, ss_uid, now, include_repository, replaces):  # type: ignore[no-untyped-def]
    from xdsi.xds.patients import patient_ids  # the patient identity policy (issue 11); imports this module

    ids = patient_ids(snap, x)
    unset = [k for k in ("source_id", *(("repository_unique_id",) if include_repository else ())) if not getattr(x, k)]
    if snap.accession_number and not _OID.match(snap.accession_issuer or "") and not x.accession_authority:
        unset.append("accession_authority")
    if unset:  # Archive.open fills them from the installation; a bare XdsSettings() has none
        raise MetadataError(f"[xds] {', '.join(unset)} not set and not generated for this installation")
    de_id = doc.entry_uuid
    ss_id = new_entry_uuid()
    req = etree.Element(C.q("lcm", "SubmitObjectsRequest"), nsmap={"lcm": C.NS_LCM, "rim": C.NS_RIM})
    objects = _rim("RegistryObjectList", req)

    # DocumentEntry
    de = _rim("ExtrinsicObject", objects, id=de_id, mimeType=C.MIME_DICOM, objectType=C.OBJECT_TYPE_STABLE_DOCUMENT)
    slot(de, "creationTime", [xds_time(doc.creation_time)])
    # ITI-41: the repository checks hash/size and adds repositoryUniqueId; ITI-42: we are the repository
    slot(de, "hash", [doc.sha1])
    if include_repository:
        slot(de, "repositoryUniqueId", [x.repository_unique_id])
    slot(de, "size", [str(doc.size)])
    slot(de, "languageCode", [x.language_code])
    start = service_start_time(snap)
    if start:
        slot(de, "serviceStartTime", [start])
    stop = service_stop_time(snap)
    if stop:
        slot(de, "serviceStopTime", [stop])
    slot(de, "sourcePatientId", [ids.source])
    slot(de, "sourcePatientInfo", source_patient_info(snap, ids))
    refs = [f"{_hl7_safe(snap.study_uid, 'Study Instance UID')}^^^^{C.REFID_STUDY_UID}"]
    if snap.accession_number:
        acc_authority = snap.accession_issuer if _OID.match(snap.accession_issuer or "") else x.accession_authority
        refs.insert(0, f"{_hl7_safe(snap.accession_number, 'accession number')}^^^&{acc_authority}&ISO^{C.REFID_ACCESSION}")
    slot(de, C.SLOT_REFERENCE_ID_LIST, refs)
    title = "Imaging manifest" + (f": {snap.study_description}" if snap.study_description else "")
    name(de, title[:128])
    author(de, C.DE_AUTHOR, de_id, x)
    classification(de, C.DE_CLASS_CODE, de_id, configured_code(codes, "classCode", x.class_code))
    classification(de, C.DE_CONFIDENTIALITY_CODE, de_id, configured_code(codes, "confidentialityCode", x.confidentiality_code))
    for ev in event_codes(snap, codes):
        classification(de, C.DE_EVENT_CODE, de_id, ev)
    fmt_value, fmt_scheme, _ = C.FORMAT_CODE_KOS
    classification(de, C.DE_FORMAT_CODE, de_id, codes.get("formatCode", fmt_value, fmt_scheme))
    classification(
        de, C.DE_HEALTHCARE_FACILITY_TYPE_CODE, de_id, configured_code(codes, "healthcareFacilityTypeCode", x.healthcare_facility_type_code)
    )
    classification(de, C.DE_PRACTICE_SETTING_CODE, de_id, configured_code(codes, "practiceSettingCode", x.practice_setting_code))
    classification(de, C.DE_TYPE_CODE, de_id, type_code(snap, x, codes))
    external_id(de, C.DE_PATIENT_ID, de_id, ids.affinity)
    external_id(de, C.DE_UNIQUE_ID, de_id, doc.unique_id)

    # SubmissionSet
    ss = _rim("RegistryPackage", objects, id=ss_id, objectType=C.OBJECT_TYPE_REGISTRY_PACKAGE)
    slot(ss, "submissionTime", [xds_time(now)])
    name(ss, "xdsi imaging manifest submission")
    author(ss, C.SS_AUTHOR, ss_id, x)
    classification(ss, C.SS_CONTENT_TYPE_CODE, ss_id, configured_code(codes, "contentTypeCode", x.content_type_code))
    external_id(ss, C.SS_UNIQUE_ID, ss_id, ss_uid)
    external_id(ss, C.SS_SOURCE_ID, ss_id, x.source_id)
    external_id(ss, C.SS_PATIENT_ID, ss_id, ids.affinity)
    _rim("Classification", objects, id=new_entry_uuid(), objectType=C.CLASSIFICATION_OBJECT_TYPE,
         classifiedObject=ss_id, classificationNode=C.SS_CLASSIFICATION_NODE)

    # HasMember, and RPLC when this manifest replaces the registered one
    hm = _rim("Association", objects, id=new_entry_uuid(), associationType=C.ASSOC_HAS_MEMBER, sourceObject=ss_id, targetObject=de_id)
    slot(hm, "SubmissionSetStatus", ["Original"])
    if replaces:
        _rim("Association", objects, id=new_entry_uuid(), associationType=C.ASSOC_RPLC, sourceObject=de_id, targetObject=replaces)
    return Submission(req, ss_uid, ids.affinity)


def build_deprecation(
    snap_patient_id: str, target_entry_uuid: str, x: XdsSettings, codes: CodeTable, *, submission_set_uid: str, now: datetime | None = None
) -> Submission:
    """ITI-57 Update DocumentEntry availabilityStatus Approved -> Deprecated (Metadata Update option)."""
    now = now or datetime.now(timezone.utc)
    ss_id = new_entry_uuid()
    req = etree.Element(C.q("lcm", "SubmitObjectsRequest"), nsmap={"lcm": C.NS_LCM, "rim": C.NS_RIM})
    objects = _rim("RegistryObjectList", req)
    ss = _rim("RegistryPackage", objects, id=ss_id, objectType=C.OBJECT_TYPE_REGISTRY_PACKAGE)
    slot(ss, "submissionTime", [xds_time(now)])
    name(ss, "xdsi manifest deprecation")
    try:
        author(ss, C.SS_AUTHOR, ss_id, x)
        classification(ss, C.SS_CONTENT_TYPE_CODE, ss_id, configured_code(codes, "contentTypeCode", x.content_type_code))
    except CodeNotInDomain as exc:
        raise MetadataError(str(exc)) from None
    external_id(ss, C.SS_UNIQUE_ID, ss_id, submission_set_uid)
    external_id(ss, C.SS_SOURCE_ID, ss_id, x.source_id)
    external_id(ss, C.SS_PATIENT_ID, ss_id, snap_patient_id)
    _rim("Classification", objects, id=new_entry_uuid(), objectType=C.CLASSIFICATION_OBJECT_TYPE,
         classifiedObject=ss_id, classificationNode=C.SS_CLASSIFICATION_NODE)
    a = _rim("Association", objects, id=new_entry_uuid(), associationType=C.ASSOC_UPDATE_AVAILABILITY_STATUS,
             sourceObject=ss_id, targetObject=target_entry_uuid)
    slot(a, "OriginalStatus", [C.STATUS_APPROVED])
    slot(a, "NewStatus", [C.STATUS_DEPRECATED])
    return Submission(req, submission_set_uid, snap_patient_id)


def to_bytes(el: etree._Element) -> bytes:
    return etree.tostring(el, xml_declaration=False, encoding="UTF-8")


def pretty(el: etree._Element) -> str:
    return etree.tostring(el, pretty_print=True, encoding="unicode")
