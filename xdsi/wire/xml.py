"""The one hardened lxml parser configuration for every XML xdsi reads (requests, schemas, code lists, results).

No entity resolution (billion laughs, XXE), no network access, no DTD loading and no huge trees,
whatever the caller: :func:`make_parser` refuses an override that would turn one of these back on,
so a caller can ask for comment removal or blank-text removal but cannot weaken the parser.
:func:`parse_untrusted` also refuses a DOCTYPE outright (SOAP 1.2 Part 1 section 5 forbids one, and
no IHE or DICOM message needs one).
"""

from __future__ import annotations

import threading
from typing import Any

from lxml import etree

HARDENED: dict[str, bool] = {"resolve_entities": False, "no_network": True, "load_dtd": False, "huge_tree": False}
#: option values that would undo the hardening; ``dtd_validation`` and ``attribute_defaults`` load the DTD
_UNSAFE: dict[str, object] = {"resolve_entities": True, "no_network": False, "load_dtd": True, "huge_tree": True, "dtd_validation": True, "attribute_defaults": True}


class UntrustedXml(ValueError):
    """XML from outside that is refused: not well-formed, or carrying a document type declaration."""


class NotWellFormed(UntrustedXml):
    """The bytes are not well-formed XML (the message is lxml's)."""


class DoctypeRefused(UntrustedXml):
    """The document has a DOCTYPE; it is refused rather than parsed around."""


def make_parser(**overrides: Any) -> etree.XMLParser:
    """A new ``etree.XMLParser`` with the hardened defaults plus ``overrides`` (e.g. ``remove_comments=True``).

    Raises ``ValueError`` for an override that would re-enable entities, network, DTD loading or huge trees.
    """
    for k, v in overrides.items():
        if k in _UNSAFE and v == _UNSAFE[k]:
            raise ValueError(f"make_parser: {k}={v!r} would weaken the hardened parser")
    return etree.XMLParser(**{**HARDENED, **overrides})


_local = threading.local()


def _parser(overrides: dict[str, Any]) -> etree.XMLParser:
    """One parser per thread and option set: lxml serialises concurrent use of one parser instance."""
    cache: dict[tuple[tuple[str, Any], ...], etree.XMLParser] = _local.__dict__.setdefault("parsers", {})
    key = tuple(sorted(overrides.items()))
    p = cache.get(key)
    if p is None:
        p = cache[key] = make_parser(**overrides)
    return p


def parse_untrusted(data: bytes, **overrides: Any) -> Any:
    """Parse XML that came from outside into its root element; raises :class:`NotWellFormed` or :class:`DoctypeRefused`."""
    try:
        root = etree.fromstring(data, _parser(overrides))
    except etree.XMLSyntaxError as exc:
        raise NotWellFormed(str(exc)) from None
    if root.getroottree().docinfo.doctype:
        raise DoctypeRefused("the document has a document type declaration")
    return root
