"""DICOM UID validation and generation.

A UID is the only piece of request text that ever becomes part of a file path
or a query key, so it is checked here, once, against PS3.5 9.1: 1-64
characters, digits and dots, no empty component, no leading zero in a
multi-digit component.
"""

from __future__ import annotations

import re
import uuid

_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


class InvalidUID(ValueError):
    """Raised for text that is not a syntactically valid DICOM UID."""


def is_valid_uid(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value) <= 64 and _UID_RE.match(value) is not None


def validate_uid(value: object, what: str = "UID") -> str:
    """Return ``value`` (stripped of DICOM's trailing NUL/space padding) or raise :class:`InvalidUID`."""
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if isinstance(value, str):
        value = value.rstrip("\x00 ")
    if not is_valid_uid(value):
        raise InvalidUID(f"{what} {value!r} is not a valid DICOM UID")
    return value  # type: ignore[return-value]


def new_uid() -> str:
    """A new UID under the 2.25 (UUID-derived) root: globally unique without a registered org root."""
    return f"2.25.{uuid.uuid4().int}"
