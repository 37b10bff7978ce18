"""DICOM PS3.15 A.5 audit messages (the IHE ATNA / ITI-20 payload), built from typed parts.

Why a builder of our own: no maintained Python library writes the DICOM audit
message (RFC 3881 as re-based by DICOM), and the shape is small and fixed.  The
element order and attributes follow the PS3.15 A.5.1 schema (current edition, after
CP-2399): EventIdentification, ActiveParticipant+, AuditSourceIdentification,
ParticipantObjectIdentification*; coded values carry ``csd-code``, ``codeSystemName``
and ``originalText``.  Two rules of that schema are easy to miss and were missed here
once: every participant object carries a ParticipantObjectName or a
ParticipantObjectQuery, and SOPClass / Accession / ParticipantObjectContainsStudy live
inside a ParticipantObjectDescription, which has no text of its own.  The tests validate
every message against the standard's RELAX NG text (tests/support/data).

Every timestamp is UTC with an explicit offset (Consistent Time): a message read in
another time zone, or after a DST change, still says when the event happened.
"""

from __future__ import annotations

import base64
import datetime as dt
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from lxml import etree

__all__ = [
    "Code",
    "Participant",
    "ParticipantObject",
    "AuditSource",
    "AuditEvent",
    "build",
    "application_activity",
    "instances_transferred",
    "query",
    "security_alert",
    "patient_object",
    "study_object",
    "EVENT",
    "ROLE",
    "OUTCOME",
]


@dataclass(frozen=True)
class Code:
    """A coded value as PS3.15 A.5.1 writes it: csd-code, codeSystemName, originalText (displayName optional)."""

    code: str
    system: str
    meaning: str


# PS3.16 CID 400 (Audit Event ID), CID 401 (Audit Event Type Code), CID 402 (Audit Active Participant Role ID)
EVENT = {
    "application_activity": Code("110100", "DCM", "Application Activity"),
    "begin_transferring": Code("110102", "DCM", "Begin Transferring DICOM Instances"),
    "instances_accessed": Code("110103", "DCM", "DICOM Instances Accessed"),
    "instances_transferred": Code("110104", "DCM", "DICOM Instances Transferred"),
    "export": Code("110106", "DCM", "Export"),
    "import": Code("110107", "DCM", "Import"),
    "query": Code("110112", "DCM", "Query"),
    "security_alert": Code("110113", "DCM", "Security Alert"),
}
EVENT_TYPE = {
    "application_start": Code("110120", "DCM", "Application Start"),
    "application_stop": Code("110121", "DCM", "Application Stop"),
    "node_authentication": Code("110126", "DCM", "Node Authentication"),
    "network_configuration": Code("110128", "DCM", "Network Configuration"),
    "security_configuration": Code("110129", "DCM", "Security Configuration"),
    "use_of_restricted_function": Code("110132", "DCM", "Use of Restricted Function"),
}
ROLE = {
    "application": Code("110150", "DCM", "Application"),
    "application_launcher": Code("110151", "DCM", "Application Launcher"),
    "destination": Code("110152", "DCM", "Destination Role ID"),
    "source": Code("110153", "DCM", "Source Role ID"),
}
# EventOutcomeIndicator: 0 success, 4 minor failure, 8 serious failure, 12 major failure
OUTCOME = {"success": "0", "minor": "4", "serious": "8", "major": "12"}
ACTIONS = frozenset("CRUDE")  # EventActionCode: Create, Read, Update, Delete, Execute
# AuditSourceTypeCode (RFC 3881 / CID 20000-ish values as DICOM lists them): 4 = Application Server
SOURCE_TYPES = frozenset("123456789")

_STUDY_ID_TYPE = Code("110180", "DCM", "Study Instance UID")
_PATIENT_ID_TYPE = Code("2", "RFC-3881", "Patient Number")
_CLASS_UID_TYPE = Code("110181", "DCM", "SOP Class UID")


@dataclass(frozen=True)
class Participant:
    """An ActiveParticipant: who took part, from where (IP address or host name) and in which role.

    ``user_id`` is the AE title, process id or TLS certificate subject; ``alternative_user_id``
    is where PS3.15 wants the AE title when ``user_id`` is a process or subject.
    """

    user_id: str
    is_requestor: bool
    role: Code | None = None
    network_access_point: str | None = None
    alternative_user_id: str | None = None
    user_name: str | None = None

    @property
    def access_point_type(self) -> str:
        """NetworkAccessPointTypeCode: 2 for an IP address, 1 for a machine name."""
        import ipaddress

        try:
            ipaddress.ip_address((self.network_access_point or "").strip("[]"))
            return "2"
        except ValueError:
            return "1"


@dataclass(frozen=True)
class ParticipantObject:
    """A ParticipantObjectIdentification: patient, study, query or the subject of an alert."""

    object_id: str
    id_type: Code
    type_code: str  # 1 person, 2 system object, 3 organization, 4 other
    role: str | None = None  # ParticipantObjectTypeCodeRole: 1 patient, 3 report, 13 security resource, 24 query
    name: str | None = None  # written as an empty token when unknown: the schema wants a name or a query
    query: bytes | None = None  # the query as received; base64 in the message
    details: Sequence[tuple[str, bytes]] = ()  # ParticipantObjectDetail type/value pairs (value base64)
    sop_classes: Sequence[tuple[str, int]] = ()  # (SOP Class UID, number of instances)
    studies: Sequence[str] = ()  # ParticipantObjectContainsStudy
    accessions: Sequence[str] = ()  # Accession Numbers


@dataclass(frozen=True)
class AuditSource:
    """AuditSourceIdentification: who writes the record (``[audit] audit_source_id`` and friends)."""

    source_id: str
    enterprise_site_id: str | None = None
    type_code: str = "4"  # Application Server


@dataclass(frozen=True)
class AuditEvent:
    """One audit record before serialisation."""

    event: Code
    action: str
    outcome: str
    participants: Sequence[Participant]
    source: AuditSource
    objects: Sequence[ParticipantObject] = ()
    event_types: Sequence[Code] = ()
    outcome_description: str | None = None
    at: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc))


def _coded(parent: etree._Element, tag: str, code: Code) -> None:
    etree.SubElement(parent, tag, {"csd-code": code.code, "codeSystemName": code.system, "originalText": code.meaning})


def _timestamp(at: dt.datetime) -> str:
    """xs:dateTime in UTC with the offset spelled out (never a naive local time)."""
    if at.tzinfo is None:
        raise ValueError("audit timestamps must be timezone-aware")
    return at.astimezone(dt.timezone.utc).isoformat(timespec="milliseconds")


def build(event: AuditEvent) -> bytes:
    """Serialise ``event`` as a UTF-8 AuditMessage document; refuses what the schema would refuse."""
    if event.action not in ACTIONS:
        raise ValueError(f"EventActionCode {event.action!r} is not one of C, R, U, D, E")
    if event.outcome not in OUTCOME.values():
        raise ValueError(f"EventOutcomeIndicator {event.outcome!r} is not 0, 4, 8 or 12")
    if not event.participants:
        raise ValueError("an audit message needs at least one ActiveParticipant")
    if event.source.type_code not in SOURCE_TYPES:
        raise ValueError(f"AuditSourceTypeCode {event.source.type_code!r} is not 1-9")
    root = etree.Element("AuditMessage")
    ev = etree.SubElement(
        root,
        "EventIdentification",
        {"EventActionCode": event.action, "EventDateTime": _timestamp(event.at), "EventOutcomeIndicator": event.outcome},
    )
    _coded(ev, "EventID", event.event)
    for t in event.event_types:
        _coded(ev, "EventTypeCode", t)
    if event.outcome_description:
        etree.SubElement(ev, "EventOutcomeDescription").text = event.outcome_description
    for p in event.participants:
        if not p.user_id:
            raise ValueError("ActiveParticipant UserID must not be empty")
        attrs = {"UserID": p.user_id}
        if p.alternative_user_id:
            attrs["AlternativeUserID"] = p.alternative_user_id
        if p.user_name:
            attrs["UserName"] = p.user_name
        attrs["UserIsRequestor"] = "true" if p.is_requestor else "false"
        if p.network_access_point:
            attrs["NetworkAccessPointID"] = p.network_access_point
            attrs["NetworkAccessPointTypeCode"] = p.access_point_type
        el = etree.SubElement(root, "ActiveParticipant", attrs)
        if p.role is not None:
            _coded(el, "RoleIDCode", p.role)
    if not event.source.source_id:
        raise ValueError("AuditSourceID must not be empty")
    src_attrs = {"AuditSourceID": event.source.source_id}
    if event.source.enterprise_site_id:
        src_attrs["AuditEnterpriseSiteID"] = event.source.enterprise_site_id
    src = etree.SubElement(root, "AuditSourceIdentification", src_attrs)
    etree.SubElement(src, "AuditSourceTypeCode", {"csd-code": event.source.type_code, "codeSystemName": "RFC-3881", "originalText": "Application Server" if event.source.type_code == "4" else event.source.type_code})
    for o in event.objects:
        _object(root, o)
    # the declaration written by hand: lxml puts a newline after its own, and a syslog message stays on one line
    return b'<?xml version="1.0" encoding="UTF-8"?>' + etree.tostring(root, encoding="UTF-8")


def _object(root: etree._Element, o: ParticipantObject) -> None:
    if not o.object_id:
        raise ValueError("ParticipantObjectID must not be empty")
    attrs = {"ParticipantObjectID": o.object_id, "ParticipantObjectTypeCode": o.type_code}
    if o.role:
        attrs["ParticipantObjectTypeCodeRole"] = o.role
    el = etree.SubElement(root, "ParticipantObjectIdentification", attrs)
    _coded(el, "ParticipantObjectIDTypeCode", o.id_type)
    if o.name is not None and o.query is not None:
        raise ValueError("ParticipantObjectName and ParticipantObjectQuery are exclusive")
    if o.query is not None:
        etree.SubElement(el, "ParticipantObjectQuery").text = base64.b64encode(o.query).decode("ascii")
    else:  # PS3.15 A.5.1 (CP-2399): a name or a query is required; an unknown name is an empty token
        etree.SubElement(el, "ParticipantObjectName").text = o.name or ""
    for key, value in o.details:
        etree.SubElement(el, "ParticipantObjectDetail", {"type": key, "value": base64.b64encode(value).decode("ascii")})
    if o.accessions or o.sop_classes or o.studies:
        desc = etree.SubElement(el, "ParticipantObjectDescription")  # DICOMObjectDescriptionContents, in schema order
        for number in o.accessions:
            etree.SubElement(desc, "Accession", {"Number": number})
        for uid, count in o.sop_classes:
            etree.SubElement(desc, "SOPClass", {"UID": uid, "NumberOfInstances": str(count)})
        if o.studies:
            contains = etree.SubElement(desc, "ParticipantObjectContainsStudy")
            for uid in o.studies:
                etree.SubElement(contains, "StudyIDs", {"UID": uid})


# -- the events, with the participants and objects PS3.15 A.5.3 asks for ---------------------------------------


def patient_object(patient_id: str, patient_name: str | None = None) -> ParticipantObject:
    """The patient an event is about (PS3.15: type 1 person, role 1 patient, ID type 2 Patient Number)."""
    return ParticipantObject(patient_id, _PATIENT_ID_TYPE, "1", "1", name=patient_name or None)


def study_object(study_uid: str, sop_classes: Iterable[tuple[str, int]] = (), accessions: Iterable[str] = ()) -> ParticipantObject:
    """A study (type 2 system object, role 3 report, ID type 110180) with the SOP classes involved."""
    return ParticipantObject(study_uid, _STUDY_ID_TYPE, "2", "3", sop_classes=tuple(sop_classes), accessions=tuple(a for a in accessions if a))


def application_activity(source: AuditSource, app: Participant, started: bool, outcome: str = "0") -> AuditEvent:
    """Application Start/Stop (PS3.15 A.5.3.1): the application itself, role Application, not the requestor."""
    app = Participant(app.user_id, False, ROLE["application"], app.network_access_point, app.alternative_user_id)
    kind = EVENT_TYPE["application_start" if started else "application_stop"]
    return AuditEvent(EVENT["application_activity"], "E", outcome, [app], source, event_types=[kind])


def instances_transferred(
    source: AuditSource,
    sender: Participant,
    receiver: Participant,
    study_uid: str,
    patient_id: str,
    sop_classes: Iterable[tuple[str, int]],
    action: str = "C",
    outcome: str = "0",
    outcome_description: str | None = None,
) -> AuditEvent:
    """DICOM Instances Transferred (PS3.15 A.5.3.4): C-STORE/STOW received ("C") or sent ("R").

    One message per study: PS3.15 allows a single patient per message, and our
    callers audit per study, so the patient and study are both named.
    """
    sender = Participant(sender.user_id, sender.is_requestor, ROLE["source"], sender.network_access_point, sender.alternative_user_id)
    receiver = Participant(receiver.user_id, receiver.is_requestor, ROLE["destination"], receiver.network_access_point, receiver.alternative_user_id)
    objects = [study_object(study_uid, sop_classes), patient_object(patient_id)]
    return AuditEvent(EVENT["instances_transferred"], action, outcome, [sender, receiver], source, objects, outcome_description=outcome_description)


def query(
    source: AuditSource,
    requestor: Participant,
    responder: Participant,
    query_id: str,
    query_bytes: bytes,
    transfer_syntax: str | None = None,
    event_type: Code | None = None,
    patient_id: str | None = None,
    outcome: str = "0",
    *,
    study_uid: str | None = None,
    uri_id: bool = False,
    outcome_description: str | None = None,
    details: Sequence[tuple[str, bytes]] = (),
    others: Sequence[Participant] = (),
) -> AuditEvent:
    """Query (PS3.15 A.5.3.10): the query as received, base64, identified by its SOP Class UID.

    For C-FIND ``query_bytes`` is the identifier dataset as encoded and ``transfer_syntax``
    its syntax (a ParticipantObjectDetail "TransferSyntax").  Over HTTP: QIDO-RS (``query_id``
    the Study Root FIND SOP Class UID, the request target as received) or a WADO-WS
    Information/XPath request (``uri_id``: the operation's action URI, there being no SOP class;
    the SOAP envelope), with an ``event_type`` naming the transaction.  The patient and study
    are named when the request names them (one patient per message).
    """
    extra = [("TransferSyntax", transfer_syntax.encode("ascii"))] if transfer_syntax else []
    q = ParticipantObject(query_id, _URI_ID_TYPE if uri_id else _CLASS_UID_TYPE, "2", "24", query=query_bytes, details=(*extra, *details))
    objects = [q]
    if patient_id:
        objects.append(patient_object(patient_id))
    if study_uid:
        objects.append(study_object(study_uid))
    return AuditEvent(
        EVENT["query"], "E", outcome, [_as(requestor, ROLE["source"], True), _as(responder, ROLE["destination"], False), *others], source, objects,
        event_types=[event_type] if event_type else [], outcome_description=outcome_description,
    )


def security_alert(
    source: AuditSource,
    reporter: Participant,
    kind: str,
    subject: str,
    description: str,
    performer: Participant | None = None,
    outcome: str = "4",
) -> AuditEvent:
    """Security Alert (PS3.15 A.5.3.11): e.g. a failed TLS handshake (kind "node_authentication").

    ``subject`` names what the alert is about (the peer address, certificate subject or
    setting); ``description`` says why, so the record reads without our logs.
    """
    if kind not in EVENT_TYPE or kind.startswith("application_"):
        raise ValueError(f"unknown security alert type {kind!r}")
    reporter = Participant(reporter.user_id, performer is None, ROLE["application"], reporter.network_access_point, reporter.alternative_user_id)
    people = [reporter] + ([Participant(performer.user_id, True, None, performer.network_access_point, performer.alternative_user_id)] if performer else [])
    # the schema's ParticipantObjectDescription holds DICOM object details only: the why goes in a detail
    obj = ParticipantObject(subject, Code("12", "RFC-3881", "URI"), "2", "13", name=subject, details=[("Alert Description", description.encode("utf-8"))])
    return AuditEvent(EVENT["security_alert"], "E", outcome, people, source, [obj], event_types=[EVENT_TYPE[kind]], outcome_description=description)


# -- audit-dimse ----
# Builders for the events of the DIMSE retrieve paths and the archive's life cycle (issue 12):
# Begin Transferring / DICOM Instances Transferred for C-MOVE and C-GET, DICOM Study Deleted and
# DICOM Instances Accessed for deletes and tier migrations, and the event types of Security Alerts
# for refused associations and configuration changes.  Section names follow PS3.15 2024e+ (A.5.3.3
# Begin Transferring, A.5.3.6 Instances Accessed, A.5.3.7 Instances Transferred, A.5.3.8 Study Deleted).

EVENT.update({"study_deleted": Code("110105", "DCM", "DICOM Study Deleted")})
EVENT_TYPE.update({"software_configuration": Code("110131", "DCM", "Software Configuration")})
__all__ += ["begin_transferring", "instances_sent", "study_deleted", "instances_accessed"]


def _as(p: Participant, role: Code | None, is_requestor: bool | None = None) -> Participant:
    """``p`` in ``role`` (and, if given, with UserIsRequestor changed); everything else kept."""
    return Participant(
        p.user_id, p.is_requestor if is_requestor is None else is_requestor, role, p.network_access_point, p.alternative_user_id, p.user_name
    )


def begin_transferring(
    source: AuditSource,
    sender: Participant,
    receiver: Participant,
    study_uid: str,
    patient_id: str,
    sop_classes: Iterable[tuple[str, int]],
    others: Sequence[Participant] = (),
) -> AuditEvent:
    """Begin Transferring DICOM Instances (PS3.15 A.5.3.3, 110102, action E): what we intend to send, per study.

    ``others`` are further participants, above all the requestor of a C-MOVE (a third party);
    they carry no role (the table leaves it optional) so they are not mistaken for the sender.
    """
    people = [_as(sender, ROLE["source"]), _as(receiver, ROLE["destination"]), *others]
    objects = [study_object(study_uid, tuple(sop_classes)), patient_object(patient_id)]
    return AuditEvent(EVENT["begin_transferring"], "E", OUTCOME["success"], people, source, objects)


def instances_sent(
    source: AuditSource,
    sender: Participant,
    receiver: Participant,
    study_uid: str,
    patient_id: str,
    sop_classes: Iterable[tuple[str, int]],
    others: Sequence[Participant] = (),
    outcome: str = "0",
    outcome_description: str | None = None,
) -> AuditEvent:
    """DICOM Instances Transferred (PS3.15 A.5.3.7) from us, action R: the audit source is the sender and
    does not know whether the receiver held copies before ("R" by the table's rule), with the SOP
    classes actually sent and any third-party requestor in ``others``."""
    event = instances_transferred(source, sender, receiver, study_uid, patient_id, sop_classes, "R", outcome, outcome_description)
    return AuditEvent(event.event, event.action, event.outcome, [*event.participants, *others], source, event.objects,
                      outcome_description=event.outcome_description)


def study_deleted(
    source: AuditSource,
    actors: Sequence[Participant],
    study_uid: str,
    patient_id: str,
    sop_classes: Iterable[tuple[str, int]],
    outcome: str = "0",
    outcome_description: str | None = None,
) -> AuditEvent:
    """DICOM Study Deleted (PS3.15 A.5.3.8, 110105, action D): a whole study and all its instances removed.

    ``actors`` are the person and/or process deleting it (1..2)."""
    if not 1 <= len(actors) <= 2:
        raise ValueError("DICOM Study Deleted names one or two actors (the person and/or process)")
    objects = [study_object(study_uid, tuple(sop_classes)), patient_object(patient_id)]
    return AuditEvent(EVENT["study_deleted"], "D", outcome, list(actors), source, objects, outcome_description=outcome_description)


def instances_accessed(
    source: AuditSource,
    actors: Sequence[Participant],
    action: str,
    study_uid: str,
    patient_id: str,
    sop_classes: Iterable[tuple[str, int]],
    outcome: str = "0",
    outcome_description: str | None = None,
    details: Sequence[tuple[str, bytes]] = (),
) -> AuditEvent:
    """DICOM Instances Accessed (PS3.15 A.5.3.6, 110103): some instances of one study created, read, updated
    or deleted (``action`` C/R/U/D).  A delete of every instance of a study is :func:`study_deleted` instead.

    ``details`` go on the study object as ParticipantObjectDetail (e.g. the tiers of a migration)."""
    if action not in "CRUD" or len(action) != 1:
        raise ValueError(f"DICOM Instances Accessed action must be C, R, U or D, not {action!r}")
    if not 1 <= len(actors) <= 2:
        raise ValueError("DICOM Instances Accessed names one or two actors (the person and/or process)")
    study = study_object(study_uid, tuple(sop_classes))
    if details:
        from dataclasses import replace as _replace

        study = _replace(study, details=tuple(study.details) + tuple(details))
    objects = [study, patient_object(patient_id)]
    return AuditEvent(EVENT["instances_accessed"], action, outcome, list(actors), source, objects, outcome_description=outcome_description)


# -- xua ----
# PS3.15 A.5.3.12: what ITI-40 3.40.4.1.3 calls "the ATNA Audit event for Authentication Failure"
EVENT.update({"user_authentication": Code("110114", "DCM", "User Authentication")})
# kept out of EVENT_TYPE on purpose: security_alert() takes any EVENT_TYPE key, and Login is no alert type
USER_AUTHENTICATION_TYPE = {"login": Code("110122", "DCM", "Login"), "logout": Code("110123", "DCM", "Logout")}


def user_authentication(
    source: AuditSource,
    person: Participant,
    node: Participant,
    *,
    login: bool = True,
    outcome: str = "0",
    description: str | None = None,
) -> AuditEvent:
    """User Authentication (PS3.15 A.5.3.12): a user logged in (or tried to), e.g. by a SAML assertion (IHE XUA).

    ``person`` is the user authenticated or claimed (NetworkAccessPointID is mandatory: where the
    request came from); ``node`` the system that did the authenticating (us).  No participant
    objects: the message is about the user, not about data.
    """
    person = Participant(person.user_id, True, person.role, person.network_access_point or "UNKNOWN", person.alternative_user_id, person.user_name)
    node = Participant(node.user_id, False, ROLE["application"], node.network_access_point, node.alternative_user_id, node.user_name)
    kind = USER_AUTHENTICATION_TYPE["login" if login else "logout"]
    return AuditEvent(EVENT["user_authentication"], "E", outcome, [person, node], source, (), event_types=[kind], outcome_description=description)


# -- audit-web ----
# Events of the HTTP front doors (QIDO-RS, WADO-RS, WADO-URI, RAD-69, ITI-43) and of XDS publishing
# (ITI-41 = RAD-68, ITI-42, ITI-57).  Where IHE specialises a message the source is named beside the
# builder; where it does not (DICOMweb, WADO-URI, WADO-WS Information) PS3.15 A.5.3 is followed as is.

# EventTypeCode of an IHE transaction: csd-code "ITI-41", codeSystemName "IHE Transactions" (ITI TF-2 3.41.5.1 ...)
TRANSACTION = {
    "ITI-41": Code("ITI-41", "IHE Transactions", "Provide and Register Document Set-b"),
    "ITI-42": Code("ITI-42", "IHE Transactions", "Register Document Set-b"),
    "ITI-43": Code("ITI-43", "IHE Transactions", "Retrieve Document Set"),
    "ITI-57": Code("ITI-57", "IHE Transactions", "Update Document Set"),
    "RAD-68": Code("RAD-68", "IHE Transactions", "Provide and Register Imaging Document Set - MTOM/XOP"),
    "RAD-69": Code("RAD-69", "IHE Transactions", "Retrieve Imaging Document Set"),
    "RAD-55": Code("RAD-55", "IHE Transactions", "WADO Retrieve"),
    # QIDO-RS is named RAD-129 "QIDO-RS Query" by the IHE RAD Web-based Image Access profile; FACTS.md is
    # silent on it and the supplement text was not at hand here: an EventTypeCode is "U" in PS3.15 A.5.3.10,
    # so a repository that does not know the code loses nothing, and one that does can filter DICOMweb queries.
    "RAD-129": Code("RAD-129", "IHE Transactions", "QIDO-RS Query"),
}
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"  # QIDO-RS searches the Study Root information model (PS3.18 10.6)
_DOCUMENT_ID_TYPE = Code("9", "RFC-3881", "Report Number")  # ITI TF-2 3.43.6.1: "not specialized"; what IHE samples use
_SUBMISSION_SET_ID_TYPE = Code("urn:uuid:a54d6aa5-d40d-43f9-88c5-b4633d873bdd", "IHE XDS Metadata", "submission set classificationNode")
_URI_ID_TYPE = Code("12", "RFC-3881", "URI")


def with_transaction(event: AuditEvent, event_type: Code | None, at: dt.datetime | None = None) -> AuditEvent:
    """``event`` (e.g. from :func:`begin_transferring` / :func:`instances_sent`) with an EventTypeCode naming
    the IHE transaction (RAD-69, RAD-55...) and, when given, the time it happened (a response is
    recorded when it ends; its Begin Transferring is stamped with when it started)."""
    from dataclasses import replace as _replace

    changes: dict[str, object] = {}
    if event_type is not None:
        changes["event_types"] = [*event.event_types, event_type]
    if at is not None:
        changes["at"] = at
    return _replace(event, **changes) if changes else event


def document_object(document_uid: str, repository_uid: str, home_community_id: str | None = None) -> ParticipantObject:
    """An XDS document (ITI TF-2 3.43.6.1): type 2, role 3 (report), ID = DocumentUniqueId, the repository
    (and homeCommunityId when known) as ParticipantObjectDetail with the literal types ITI-43 prescribes."""
    details = [("Repository Unique ID", repository_uid.encode("utf-8"))]
    if home_community_id:
        details.append(("ihe:homeCommunityID", home_community_id.encode("utf-8")))
    return ParticipantObject(document_uid, _DOCUMENT_ID_TYPE, "2", "3", details=details)


def documents_exported(
    source: AuditSource,
    repository: Participant,
    consumer: Participant,
    documents: Sequence[tuple[str, str, str | None]],
    patient_id: str | None,
    outcome: str = "0",
    outcome_description: str | None = None,
    others: Sequence[Participant] = (),
) -> AuditEvent:
    """ITI-43 at the Document Repository (ITI TF-2 3.43.6.1.2): Export (110106), action R, EventTypeCode ITI-43.

    Source = the repository (UserID its SOAP endpoint URI, AlternativeUserID our process id,
    UserIsRequestor false), Destination = the consumer, one Document object per
    (DocumentUniqueId, RepositoryUniqueId, homeCommunityId).  The table lists no Patient for the
    repository; we add it when the documents are ours (issue 12: every message names the patient),
    PS3.15 allowing further participant objects.
    """
    objects = [document_object(d, r, h) for d, r, h in documents]
    if patient_id:
        objects.append(patient_object(patient_id))
    return AuditEvent(
        EVENT["export"], "R", outcome, [_as(repository, ROLE["source"], False), _as(consumer, ROLE["destination"]), *others], source, objects,
        event_types=[TRANSACTION["ITI-43"]], outcome_description=outcome_description,
    )


def submission_set_object(submission_set_uid: str) -> ParticipantObject:
    """The SubmissionSet (ITI TF-2 3.41.5.1.1): type 2, role 20 (job), ID type the submission set classificationNode."""
    return ParticipantObject(submission_set_uid, _SUBMISSION_SET_ID_TYPE, "2", "20")


def submission_exported(
    source: AuditSource,
    document_source: Participant,
    destination: Participant,
    transactions: Sequence[str],
    submission_set_uid: str,
    patient_id: str,
    outcome: str = "0",
    outcome_description: str | None = None,
    action: str = "R",
) -> AuditEvent:
    """What we SEND to a registry or repository: Export (110106) with Patient (1) and SubmissionSet (1).

    ITI TF-2 3.41.5.1.1 (ITI-41 Document Source) and 3.42.5.1.1 (ITI-42 Integrated Document
    Source/Repository): action R, Source = us (AlternativeUserID our process id), Destination = the
    SOAP endpoint URI (UserIsRequestor false).  RAD-68 is ITI-41 carrying a KOS manifest, so its
    message carries both EventTypeCodes.  ITI-57 (Document Administrator, XDS Metadata Update
    supplement, not in FACTS.md and not checked here) is sent with ``action`` U.
    """
    codes = [TRANSACTION[t] for t in transactions]
    objects = [patient_object(patient_id), submission_set_object(submission_set_uid)]
    return AuditEvent(
        EVENT["export"], action, outcome, [_as(document_source, ROLE["source"]), _as(destination, ROLE["destination"], False)], source, objects,
        event_types=codes, outcome_description=outcome_description,
    )
