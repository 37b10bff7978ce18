"""A structural check of DICOM PS3.15 A.5.1 audit messages, written independently of xdsi.audit.messages.

No copy of the PS3.15 A.5.1 RELAX NG schema is available here (not in /work/shared/standards,
pydicom or pynetdicom), so this checks what the schema requires, from the standard's
text: the element order of AuditMessage, the required attributes, the enumerated
values (EventActionCode, EventOutcomeIndicator, NetworkAccessPointTypeCode,
ParticipantObjectTypeCode/-Role), the coded-value attributes and xs:dateTime with a
zone.  Anything unexpected is an error: the check is closed, like the schema.
"""

from __future__ import annotations

import base64
import re

from lxml import etree

__all__ = ["check_audit_message", "AuditSchemaError"]


class AuditSchemaError(AssertionError):
    pass


_DATETIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)$")
_CODED = {"csd-code", "codeSystemName", "originalText", "displayName"}


def _fail(msg: str) -> None:
    raise AuditSchemaError(msg)


def _attrs(el: etree._Element, required: set[str], optional: set[str]) -> None:
    have = set(el.attrib)
    if required - have:
        _fail(f"{el.tag} lacks {sorted(required - have)}")
    if have - required - optional:
        _fail(f"{el.tag} has unknown attribute(s) {sorted(have - required - optional)}")


def _coded(el: etree._Element) -> None:
    _attrs(el, {"csd-code", "codeSystemName", "originalText"}, {"displayName"})
    if list(el):
        _fail(f"{el.tag} is a coded value and has no children")
    for a in ("csd-code", "codeSystemName", "originalText"):
        if not el.get(a, "").strip():
            _fail(f"{el.tag} {a} is empty")


def _sequence(children: list[etree._Element], pattern: list[tuple[str, int, int | None]], where: str) -> dict[str, list[etree._Element]]:
    """Match children against (tag, min, max) in order; returns them grouped by tag."""
    out: dict[str, list[etree._Element]] = {}
    i = 0
    for tag, lo, hi in pattern:
        group = []
        while i < len(children) and children[i].tag == tag and (hi is None or len(group) < hi):
            group.append(children[i])
            i += 1
        if len(group) < lo:
            _fail(f"{where}: expected {tag} (at least {lo}), found {children[i].tag if i < len(children) else 'end'}")
        out[tag] = group
    if i != len(children):
        _fail(f"{where}: unexpected {children[i].tag} at position {i}")
    return out


def check_audit_message(xml: bytes) -> etree._Element:
    """Parse and check one AuditMessage; raises AuditSchemaError naming the first violation."""
    root = etree.fromstring(xml)
    if root.tag != "AuditMessage":
        _fail(f"root is {root.tag}, not AuditMessage")
    _attrs(root, set(), set())
    parts = _sequence(
        list(root),
        [("EventIdentification", 1, 1), ("ActiveParticipant", 1, None), ("AuditSourceIdentification", 1, 1), ("ParticipantObjectIdentification", 0, None)],
        "AuditMessage",
    )
    ev = parts["EventIdentification"][0]
    _attrs(ev, {"EventDateTime", "EventOutcomeIndicator"}, {"EventActionCode"})
    if ev.get("EventActionCode") not in (None, "C", "R", "U", "D", "E"):
        _fail(f"EventActionCode {ev.get('EventActionCode')!r}")
    if ev.get("EventOutcomeIndicator") not in ("0", "4", "8", "12"):
        _fail(f"EventOutcomeIndicator {ev.get('EventOutcomeIndicator')!r}")
    if not _DATETIME.match(ev.get("EventDateTime", "")):
        _fail(f"EventDateTime {ev.get('EventDateTime')!r} is not an xs:dateTime with a zone")
    evp = _sequence(list(ev), [("EventID", 1, 1), ("EventTypeCode", 0, None), ("EventOutcomeDescription", 0, 1)], "EventIdentification")
    for c in evp["EventID"] + evp["EventTypeCode"]:
        _coded(c)
    for ap in parts["ActiveParticipant"]:
        _attrs(ap, {"UserID", "UserIsRequestor"}, {"AlternativeUserID", "UserName", "NetworkAccessPointID", "NetworkAccessPointTypeCode", "MediaType"})
        if ap.get("UserIsRequestor") not in ("true", "false"):
            _fail(f"UserIsRequestor {ap.get('UserIsRequestor')!r}")
        if ap.get("NetworkAccessPointTypeCode") not in (None, "1", "2", "3", "4", "5"):
            _fail(f"NetworkAccessPointTypeCode {ap.get('NetworkAccessPointTypeCode')!r}")
        if ("NetworkAccessPointID" in ap.attrib) != ("NetworkAccessPointTypeCode" in ap.attrib):
            _fail("NetworkAccessPointID and NetworkAccessPointTypeCode go together")
        app = _sequence(list(ap), [("RoleIDCode", 0, None), ("MediaIdentifier", 0, 1)], "ActiveParticipant")
        for c in app["RoleIDCode"]:
            _coded(c)
    src = parts["AuditSourceIdentification"][0]
    _attrs(src, {"AuditSourceID"}, {"AuditEnterpriseSiteID"})
    for c in _sequence(list(src), [("AuditSourceTypeCode", 0, None)], "AuditSourceIdentification")["AuditSourceTypeCode"]:
        _coded(c)
    for po in parts["ParticipantObjectIdentification"]:
        _attrs(po, {"ParticipantObjectID"}, {"ParticipantObjectTypeCode", "ParticipantObjectTypeCodeRole", "ParticipantObjectDataLifeCycle", "ParticipantObjectSensitivity"})
        if po.get("ParticipantObjectTypeCode") not in (None, "1", "2", "3", "4"):
            _fail(f"ParticipantObjectTypeCode {po.get('ParticipantObjectTypeCode')!r}")
        role = po.get("ParticipantObjectTypeCodeRole")
        if role is not None and not (role.isdigit() and 1 <= int(role) <= 24):
            _fail(f"ParticipantObjectTypeCodeRole {role!r}")
        kids = list(po)
        name_or_query = [k for k in kids if k.tag in ("ParticipantObjectName", "ParticipantObjectQuery")]
        pattern: list[tuple[str, int, int | None]] = [("ParticipantObjectIDTypeCode", 1, 1)]
        if name_or_query:
            pattern.append((name_or_query[0].tag, 1, 1))
        pattern += [("ParticipantObjectDetail", 0, None), ("ParticipantObjectDescription", 0, None), ("SOPClass", 0, None), ("Accession", 0, None),
                    ("MPPS", 0, None), ("ParticipantObjectContainsStudy", 0, 1), ("Encrypted", 0, 1), ("Anonymized", 0, 1)]
        pop = _sequence(kids, pattern, "ParticipantObjectIdentification")
        _coded(pop["ParticipantObjectIDTypeCode"][0])
        for q in pop.get("ParticipantObjectQuery", []):
            base64.b64decode(q.text or "", validate=True)
        for d in pop["ParticipantObjectDetail"]:
            _attrs(d, {"type", "value"}, set())
            base64.b64decode(d.get("value", ""), validate=True)
        for sc in pop["SOPClass"]:
            _attrs(sc, {"UID"}, {"NumberOfInstances"})
            _sequence(list(sc), [("Instance", 0, None)], "SOPClass")
        for cs in pop["ParticipantObjectContainsStudy"]:
            for sid in _sequence(list(cs), [("StudyIDs", 1, None)], "ParticipantObjectContainsStudy")["StudyIDs"]:
                _attrs(sid, {"UID"}, set())
    return root
