"""Validation of message bodies against the schemas we serve, with lxml.

spyne's ``validator='lxml'`` rejects valid IHE requests, so every body is
checked here instead, against one compiled schema set covering the IHE
XDS.b / XDS-I.b, ebRS and WADO-WS namespaces.  The schema files are read
from this package only (no network); imports resolve by relative path.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from lxml import etree

from xdsi.wire.xml import make_parser
from xdsi.standards.constants import NS_XDS, NS_IHERAD, NS_LCM, NS_QUERY, NS_RS, NS_WADO

SCHEMA_DIR = Path(__file__).with_name("schemas")
WSDL_DIR = Path(__file__).with_name("wsdl")

_ENTRY = {
    NS_XDS: "IHE/XDS.b_DocumentRepository.xsd",
    NS_IHERAD: "IHE/XDSI.b_ImagingDocumentSource.xsd",
    NS_WADO: "DICOM/dicom.wado.ws.2011.information.xsd",
    NS_RS: "ebRS/rs.xsd",
    NS_LCM: "ebRS/lcm.xsd",
    NS_QUERY: "ebRS/query.xsd",
}


class SchemaInvalid(ValueError):
    """The body does not conform to its schema; the message lists the first problems with line numbers."""


@functools.lru_cache(maxsize=1)
def message_schema() -> etree.XMLSchema:
    """All message namespaces in one compiled schema (compiled once per process)."""
    imports = "".join(
        f'<xs:import namespace="{ns}" schemaLocation="{(SCHEMA_DIR / rel).as_uri()}"/>' for ns, rel in _ENTRY.items()
    )
    doc = f'<xs:schema xmlns:xs="http://www.w3.org/2001/XMLSchema" targetNamespace="urn:xdsi:validation:wrapper">{imports}</xs:schema>'
    root = etree.fromstring(doc.encode(), make_parser(), base_url=(SCHEMA_DIR / "wrapper.xsd").as_uri())
    return etree.XMLSchema(root)


def validate(element: Any) -> None:
    """Raise :class:`SchemaInvalid` unless ``element`` (a message body root) is valid."""
    schema = message_schema()
    # validate a copy as a document of its own: the surrounding envelope is not part of the body's schema
    doc = etree.ElementTree(_detached(element))
    if not schema.validate(doc):
        errors = [f"line {e.line}: {e.message}" for e in list(schema.error_log)[:5]]
        raise SchemaInvalid("; ".join(errors) or "schema validation failed")


def _detached(element: Any) -> Any:
    import copy

    return copy.deepcopy(element)
