"""Validation of DICOM PS3.15 A.5 audit messages against the standard's own schema.

``data/dicom-audit-message.rnc`` is the RELAX NG Compact text of PS3.15 A.5.1.1 (current
edition, after CP-2399), transcribed from the standard.  The standard writes its value
annotations as trailing ``##`` comments, which RELAX NG Compact only allows before a
pattern; they are turned into plain comments before parsing (rnc2rng through lxml), which
changes no pattern.  On top of the schema, three rules the schema's datatypes cannot say
but PS3.15 A.5.2 and ATNA require: EventDateTime carries a zone (A.5.2.5: unambiguous
UTC), coded values have non-empty csd-code / codeSystemName / originalText, and base64
fields decode.
"""

from __future__ import annotations

import base64
import functools
import re
from pathlib import Path

from lxml import etree

__all__ = ["check_audit_message", "AuditSchemaError", "schema", "event", "event_types", "wait_for_messages"]

SCHEMA_FILE = Path(__file__).parent / "data" / "dicom-audit-message.rnc"


class AuditSchemaError(AssertionError):
    pass


_DATETIME_WITH_ZONE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)$")
_CODED = ("EventID", "EventTypeCode", "RoleIDCode", "ParticipantObjectIDTypeCode", "MediaType", "AuditSourceTypeCode")


@functools.lru_cache(maxsize=1)
def schema() -> etree.RelaxNG:
    text = SCHEMA_FILE.read_text(encoding="utf-8").replace("##", "#")
    return etree.RelaxNG.from_rnc_string(text)


def check_audit_message(xml: bytes) -> etree._Element:
    """Parse and validate one AuditMessage; raises AuditSchemaError naming the first violation."""
    parser = etree.XMLParser(resolve_entities=False, no_network=True)
    try:
        root = etree.fromstring(xml, parser)
    except etree.XMLSyntaxError as exc:
        raise AuditSchemaError(f"not well-formed XML: {exc}") from None
    rng = schema()
    if not rng.validate(root):
        raise AuditSchemaError(f"PS3.15 A.5.1 schema: {rng.error_log.last_error}")
    when = root.find("EventIdentification").get("EventDateTime", "")  # type: ignore[union-attr]
    if not _DATETIME_WITH_ZONE.match(when):
        raise AuditSchemaError(f"EventDateTime {when!r} has no zone (PS3.15 A.5.2.5 wants UTC, unambiguous)")
    for tag in _CODED:
        for el in root.iter(tag):
            for attr in ("csd-code", "codeSystemName", "originalText"):
                if attr in el.attrib and not el.get(attr, "").strip():
                    raise AuditSchemaError(f"{tag} {attr} is empty")
            if tag != "AuditSourceTypeCode" and not el.get("originalText"):
                raise AuditSchemaError(f"{tag} lacks originalText")
    for q in root.iter("ParticipantObjectQuery"):
        base64.b64decode(q.text or "", validate=True)
    for d in root.iter("ParticipantObjectDetail"):
        base64.b64decode(d.get("value", ""), validate=True)
    return root


def event(r: etree._Element) -> tuple[str, str, str]:
    """(EventID code, EventActionCode, EventOutcomeIndicator) of a message."""
    e = r.find("EventIdentification")
    return e.find("EventID").get("csd-code"), e.get("EventActionCode"), e.get("EventOutcomeIndicator")  # type: ignore[union-attr]


def event_types(r: etree._Element) -> list[tuple[str, str]]:
    return [(t.get("csd-code"), t.get("codeSystemName")) for t in r.findall("EventIdentification/EventTypeCode")]  # type: ignore[misc]


def wait_for_messages(read, pred, count: int, seconds: float = 30.0, context=lambda: "") -> list[etree._Element]:  # type: ignore[no-untyped-def]
    """Exactly ``count`` messages of ``read()`` matching ``pred``, once they are there (then 0.3 s more: no more come)."""
    import time

    deadline = time.monotonic() + seconds
    while True:
        got = [r for r in read() if pred(r)]
        if len(got) >= count or time.monotonic() > deadline:
            time.sleep(0.3)
            got = [r for r in read() if pred(r)]
            assert len(got) == count, f"{len(got)} message(s), expected {count}:\n" + "\n".join(etree.tostring(r).decode() for r in got) + context()
            return got
