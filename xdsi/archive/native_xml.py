"""DICOM datasets as the PS3.19 A.1 Native DICOM Model XML (non-pixel data only).

Used by WADO-WS RetrieveImagingDocumentSetInformation, whose XPath
expressions are evaluated on this form.  Rules followed (PS3.19 A.1.5/A.1.6):
``DicomAttribute`` with ``tag`` (8 upper-case hex digits), ``vr``,
``keyword`` for public attributes and ``privateCreator`` for private ones;
values as ``Value@number``, person names as ``PersonName@number`` with
Alphabetic/Ideographic/Phonetic component groups, sequences as
``Item@number``, small binary values as ``InlineBinary``.  Group lengths are
left out; so is Pixel Data (this is the non-pixel view).  Binary values
above ``inline_limit`` appear as ``BulkData`` with an opaque ``uuid``: they
are not retrievable through this model.

The root carries no ``xml:space="preserve"``: PS3.19's own RELAX NG schema
does not allow that attribute, and the output is validated against it.
"""

from __future__ import annotations

import base64
import re
import uuid
from typing import Any

from lxml import etree
from pydicom.datadict import keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from xdsi.standards.constants import NS_NATIVE_DICOM

PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})
BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
VALID_VRS = frozenset(
    "AE AS AT CS DA DS DT FL FD IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR US UT UV".split()
)
MAX_DEPTH = 32
_XML_BAD = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")
PN_COMPONENTS = ("FamilyName", "GivenName", "MiddleName", "NamePrefix", "NameSuffix")


class NativeModelError(ValueError):
    """The dataset cannot be expressed (too deeply nested)."""


def _clean(text: str) -> str:
    """Characters XML 1.0 cannot carry become U+FFFD; nothing else changes."""
    return _XML_BAD.sub("\ufffd", text)


def _vr(elem: DataElement, ds: Dataset) -> str:
    vr = str(elem.VR)
    if vr in VALID_VRS:
        return vr
    if vr == "US or SS":
        return "SS" if int(ds.get("PixelRepresentation", 0) or 0) == 1 else "US"
    if vr in ("OB or OW", "US or OW"):
        return "OW"
    if vr == "US or SS or OW":
        return "OW"
    return "UN"


def _private_creator(ds: Dataset, tag: int) -> str | None:
    group, elem = tag >> 16, tag & 0xFFFF
    if not group % 2 or elem < 0x1000:
        return None
    creator = ds.get(Tag(group, elem >> 8))
    return None if creator is None else str(creator.value).strip()


def _values(elem: DataElement) -> list[Any]:
    v = elem.value
    if v is None or v == "":
        return []
    if isinstance(v, (list, tuple)) or v.__class__.__name__ == "MultiValue":
        return list(v)
    return [v]


def _text(v: Any, vr: str) -> str:
    if vr == "AT":
        return f"{int(v):08X}"
    if vr in ("FL", "FD"):
        return repr(float(v))
    return _clean(str(v))


def _person_name(parent: Any, number: int, value: Any, ns: str) -> None:
    pn = etree.SubElement(parent, ns + "PersonName", number=str(number))
    groups = str(value).split("=")
    for name, group in zip(("Alphabetic", "Ideographic", "Phonetic"), groups):
        if not group:
            continue
        g = etree.SubElement(pn, ns + name)
        for comp_name, comp in zip(PN_COMPONENTS, group.split("^")):
            if comp:
                etree.SubElement(g, ns + comp_name).text = _clean(comp)


def _attribute(parent: Any, ds: Dataset, elem: DataElement, ns: str, depth: int, inline_limit: int, frame: int | None) -> None:
    tag = int(elem.tag)
    vr = _vr(elem, ds)
    attrs = {"tag": f"{tag:08X}", "vr": vr}
    kw = keyword_for_tag(tag) if not (tag >> 16) % 2 else ""
    if kw:
        attrs["keyword"] = kw
    creator = _private_creator(ds, tag)
    if creator is not None:
        attrs["privateCreator"] = _clean(creator)
    el = etree.SubElement(parent, ns + "DicomAttribute", attrs)
    if vr == "SQ":
        items = list(elem.value or [])
        numbered = list(enumerate(items, start=1))
        if frame is not None and tag == 0x52009230:  # PerFrameFunctionalGroupsSequence: only the asked frame
            numbered = [(n, it) for n, it in numbered if n == frame]
        for n, item in numbered:
            it = etree.SubElement(el, ns + "Item", number=str(n))
            _dataset(it, item, ns, depth + 1, inline_limit, None)
        return
    if vr in BINARY_VRS or (vr in ("OW",) and isinstance(elem.value, bytes)):
        data = elem.value if isinstance(elem.value, (bytes, bytearray)) else b""
        if not data:
            return
        if len(data) <= inline_limit:
            etree.SubElement(el, ns + "InlineBinary").text = base64.b64encode(bytes(data)).decode("ascii")
        else:
            etree.SubElement(el, ns + "BulkData", uuid=str(uuid.uuid4()))
        return
    values = _values(elem)
    for n, v in enumerate(values, start=1):
        if vr == "PN":
            _person_name(el, n, v, ns)
        else:
            val = etree.SubElement(el, ns + "Value", number=str(n))
            val.text = _text(v, vr) if v is not None and v != "" else None


def _dataset(parent: Any, ds: Dataset, ns: str, depth: int, inline_limit: int, frame: int | None) -> None:
    if depth > MAX_DEPTH:
        raise NativeModelError(f"sequences nested deeper than {MAX_DEPTH} levels")
    for elem in ds:
        tag = int(elem.tag)
        if tag & 0xFFFF == 0 or tag in PIXEL_TAGS:
            continue  # group lengths, pixel data
        _attribute(parent, ds, elem, ns, depth, inline_limit, frame)


def to_native_xml(ds: Dataset, *, namespace: str | None = NS_NATIVE_DICOM, include_meta: bool = True, inline_limit: int = 64 * 1024, frame: int | None = None) -> Any:
    """``<NativeDicomModel>`` for ``ds`` (file meta first when present and ``include_meta``).

    ``namespace=None`` builds the same tree without a namespace, the form on
    which PS3.19's own XPath examples (``/NativeDicomModel/DicomAttribute``) match.
    ``frame`` keeps only that frame's item of a Per-Frame Functional Groups Sequence.
    """
    ns = f"{{{namespace}}}" if namespace else ""
    root = etree.Element(ns + "NativeDicomModel", nsmap={None: namespace} if namespace else None)
    meta = getattr(ds, "file_meta", None)
    if include_meta and meta is not None:
        _dataset(root, meta, ns, 0, inline_limit, None)
    _dataset(root, ds, ns, 0, inline_limit, frame)
    return root
