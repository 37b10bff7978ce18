"""What a route matches an instance on, and where each attribute comes from.

Most attributes are index columns (one joined query per batch of instances,
no file opened): the calling AE title the instance came from, the SOP class,
the series' modality, body part, institution and station, the study's
description and referring physician.  ``called_aet`` is the AE title of the
archive (main AE or partition) that stored the instance.  ``department``
(Institutional Department Name) is not indexed: it is read from the stored
file's header, and only when some route has a ``department`` condition.

**Order-derived attributes (extension point for HL7).**  ``patient_location``
and ``ordering_physician`` come from the order the RIS sent for the study
(HL7 ORM/OMI), which the routing engine does not store.  A provider
registers a callable with :func:`register_order_lookup`::

    order_attributes(session, accession_number, patient_id) -> {"patient_location": ..., "ordering_physician": ...}

``session`` is a SQLAlchemy session on the archive's index.  When nothing is
registered, ``xdsi.hl7.orders.order_attributes`` is used if that module exists.
An instance for which no order is known (or no provider is installed) does
**not** match a condition on these attributes: a forward is never made on a
guess.

Patterns: a glob (``fnmatch``: ``*``, ``?``, ``[...]``), case-insensitive,
matched against the whole value; ``re:`` starts a regular expression matched
against the whole value (``re.fullmatch``), case-insensitive.  A missing
attribute is the empty string (``""`` and ``*`` match it), except the order
attributes, which are unknown without an order.
"""

from __future__ import annotations

import fnmatch
import importlib
import logging
import re
import threading
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

log = logging.getLogger(__name__)

INDEX_KEYS = frozenset(
    {"calling_aet", "called_aet", "modality", "sop_class", "body_part", "referring_physician", "institution", "station_name", "study_description"}
)
FILE_KEYS = {"department": "InstitutionalDepartmentName"}  # condition -> DICOM keyword read from the stored header
ORDER_KEYS = frozenset({"patient_location", "ordering_physician"})
CONDITION_KEYS = frozenset(INDEX_KEYS | set(FILE_KEYS) | ORDER_KEYS)

OrderLookup = Callable[[Any, str, str], Mapping[str, str] | None]
_lookup: OrderLookup | None = None
_lookup_lock = threading.Lock()
_looked_for_default = False


def register_order_lookup(lookup: OrderLookup | None) -> None:
    """Install the provider of order attributes (the HL7 order store); ``None`` removes it."""
    global _lookup, _looked_for_default
    with _lookup_lock:
        _lookup = lookup
        _looked_for_default = lookup is None  # an explicit None: do not fall back to the default module either


def order_lookup() -> OrderLookup | None:
    """The registered provider, else ``xdsi.hl7.orders.order_attributes`` when that module is installed."""
    global _lookup, _looked_for_default
    with _lookup_lock:
        if _lookup is None and not _looked_for_default:
            _looked_for_default = True
            try:
                _lookup = importlib.import_module("xdsi.hl7.orders").order_attributes
            except (ImportError, AttributeError):
                log.info("routing: no order store (xdsi.hl7.orders) installed; patient_location / ordering_physician never match")
        return _lookup


@dataclass(frozen=True)
class Pattern:
    text: str
    regex: re.Pattern[str]

    def matches(self, value: str) -> bool:
        return self.regex.fullmatch(value) is not None


@dataclass(frozen=True)
class Condition:
    key: str
    patterns: tuple[Pattern, ...]

    def matches(self, value: str | None) -> bool:
        return value is not None and any(p.matches(value) for p in self.patterns)


def compile_patterns(where: str, texts: Sequence[str], error: Callable[[str], Exception]) -> tuple[Pattern, ...]:
    out = []
    for text in texts:
        source = text[3:] if text.startswith("re:") else fnmatch.translate(text)
        try:
            out.append(Pattern(text, re.compile(source, re.IGNORECASE | re.DOTALL)))
        except re.error as exc:
            raise error(f"{where}: {text!r} is not a valid regular expression ({exc})") from None
    return tuple(out)


@dataclass
class Facts:
    """One instance as the rules see it: index values, plus lazily the file header and the order."""

    sop_instance_uid: str
    study_uid: str
    sha256: str
    values: dict[str, str]
    accession_number: str = ""
    patient_id: str = ""
    file_values: Callable[[], Mapping[str, str]] | None = None  # reads FILE_KEYS from the stored header
    order_values: Callable[[], Mapping[str, str] | None] | None = None

    def get(self, key: str) -> str | None:
        if key in self.values:
            return self.values[key]
        if key in FILE_KEYS:
            file_values = self.file_values() if self.file_values is not None else {}
            self.values.update({k: file_values.get(k, "") for k in FILE_KEYS})
            return self.values[key]
        if key in ORDER_KEYS:
            order = self.order_values() if self.order_values is not None else None
            if order is None:
                return None  # no order known: an order condition cannot match
            self.values.update({k: str(order.get(k, "") or "") for k in ORDER_KEYS})
            return self.values[key]
        return ""


def matches(conditions: Sequence[Condition], facts: Facts) -> bool:
    """Every condition matches (the cheap index ones first, as the route lists them sorted by key)."""
    ordered = sorted(conditions, key=lambda c: (c.key in FILE_KEYS or c.key in ORDER_KEYS, c.key))
    return all(c.matches(facts.get(c.key)) for c in ordered)
