"""The one ebRS RegistryResponse model (ITI TF-3 4.2.4): what we answer and what registries answer us.

A :class:`RegistryError` is the same value whether the Imaging Document
Source reports it for a document (RAD-69, ITI-43, WADO-WS), the repository of
our manifests does, or a registry sent it back to the publisher; its field
names are the schema's attributes (``errorCode``, ``codeContext``,
``location``, ``severity``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

from xdsi.standards.constants import NS_RS, SEVERITY_ERROR, STATUS_FAILURE, STATUS_PARTIAL_SUCCESS, STATUS_SUCCESS

RS = f"{{{NS_RS}}}"


@dataclass(frozen=True)
class RegistryError:
    error_code: str
    code_context: str
    location: str | None = None
    severity: str = SEVERITY_ERROR

    @property
    def is_error(self) -> bool:
        return self.severity == SEVERITY_ERROR


def response_status(documents: int, errors: Iterable[RegistryError]) -> str:
    """ITI TF-3 4.2.4: Success without errors, Failure with errors and nothing returned, else PartialSuccess."""
    if not any(e.is_error for e in errors):
        return STATUS_SUCCESS
    return STATUS_PARTIAL_SUCCESS if documents else STATUS_FAILURE


@dataclass
class RegistryResult:
    """A registry's or repository's answer as received: status, errors, and the SOAP envelope text."""

    status: str
    errors: list[RegistryError] = field(default_factory=list)
    raw: str = ""

    @property
    def success(self) -> bool:
        return self.status == STATUS_SUCCESS

    def error_text(self) -> str:
        return "; ".join(f"{e.error_code}: {e.code_context}" + (f" [{e.location}]" if e.location else "") for e in self.errors)


def parse_registry_response(el: Any) -> RegistryResult:
    """A ``RegistryResponse`` element (or any element holding one, like ``RetrieveDocumentSetResponse``)."""
    rr = el if el.tag.endswith("RegistryResponse") else next(el.iter(RS + "RegistryResponse"), el)
    errors = [
        RegistryError(
            error_code=e.get("errorCode", ""),
            code_context=e.get("codeContext", ""),
            location=e.get("location") or None,
            severity=e.get("severity", ""),
        )
        for e in rr.iter(RS + "RegistryError")
    ]
    return RegistryResult(status=rr.get("status", ""), errors=errors)
