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

__all__ = ["check_audit_message", "AuditSchemaError", "schema"]

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
