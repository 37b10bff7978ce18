"""ebRS RegistryResponse / RegistryErrorList elements (ITI TF-3 4.2.4), for every XDS answer we build."""

from __future__ import annotations

from typing import Any, Iterable, Protocol

from lxml import etree

from xdsi.xdsconst import NS_RS, SEVERITY_ERROR, SEVERITY_WARNING

RS = f"{{{NS_RS}}}"


class ErrorLike(Protocol):
    error_code: str
    code_context: str
    location: str | None
    severity: str


def registry_response(status: str, errors: Iterable[ErrorLike] = (), *, tag: str = RS + "RegistryResponse", parent: Any = None) -> Any:
    """``<rs:RegistryResponse status=...>`` with a RegistryErrorList when there are errors or warnings.

    ``highestSeverity`` is set; each RegistryError has errorCode, codeContext,
    severity, optional location, and an empty body (Gazelle IHEXDSError checks).
    """
    el = etree.Element(tag, nsmap={"rs": NS_RS}) if parent is None else etree.SubElement(parent, tag, nsmap={"rs": NS_RS})
    el.set("status", status)
    errors = list(errors)
    if errors:
        lst = etree.SubElement(el, RS + "RegistryErrorList")
        lst.set("highestSeverity", SEVERITY_ERROR if any(e.severity == SEVERITY_ERROR for e in errors) else SEVERITY_WARNING)
        for e in errors:
            re_ = etree.SubElement(lst, RS + "RegistryError")
            re_.set("errorCode", e.error_code)
            re_.set("codeContext", e.code_context)
            re_.set("severity", e.severity)
            if e.location:
                re_.set("location", e.location)
    return el
