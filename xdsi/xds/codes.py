"""The affinity domain's code lists: every coded value xdsi puts into XDS metadata comes from here.

Registries reject a code outside the affinity domain's list (or a coding scheme
they do not know), so the list is configuration, loaded from a codes file in
the shape affinity domains publish (the ``<Codes>`` document of the IHE
Connectathon and the NIST toolkit).  A metadata builder asks this table for a
code by (CodeType, code) and gets its display name and coding scheme, or a
:class:`CodeNotInDomain` error that names the file to fix; nothing is sent
with a code the domain does not list.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lxml import etree

from xdsi.wire.xml import make_parser

DEFAULT_CODES_FILE = Path(__file__).with_name("data") / "codes.xml"  # the affinity-domain codes shipped with xdsi


class CodesFileError(ValueError):
    """The codes file cannot be read or is not a ``<Codes>`` document."""


class CodeNotInDomain(LookupError):
    """A coded value that the affinity domain's list does not contain."""


@dataclass(frozen=True)
class Code:
    code: str
    scheme: str  # codingScheme (an OID in most affinity domains)
    display: str


class CodeTable:
    """The code lists of one affinity domain, by CodeType name."""

    def __init__(self, types: dict[str, dict[tuple[str, str], Code]], schemes: dict[str, str], authorities: list[str], source: str) -> None:
        self._types = types
        self.class_schemes = schemes  # CodeType name -> classScheme UUID as the file gives it
        self.assigning_authorities = authorities  # "&OID&ISO" strings
        self.source = source

    @classmethod
    def load(cls, path: Path | str | None = None) -> "CodeTable":
        p = Path(path) if path else DEFAULT_CODES_FILE
        try:
            root = etree.parse(str(p), make_parser()).getroot()
        except (OSError, etree.XMLSyntaxError) as exc:
            raise CodesFileError(f"{p}: {exc}") from None
        if etree.QName(root).localname != "Codes":
            raise CodesFileError(f"{p}: root element is <{etree.QName(root).localname}>, not <Codes>")
        types: dict[str, dict[tuple[str, str], Code]] = {}
        schemes: dict[str, str] = {}
        for ct in root.iter("{*}CodeType"):
            name = ct.get("name") or ""
            if ct.get("classScheme"):
                schemes[name] = ct.get("classScheme", "")
            entries = types.setdefault(name, {})
            for c in ct.iter("{*}Code"):
                code = (c.get("code") or "").strip()
                if not code:
                    continue
                scheme = (c.get("codingScheme") or "").strip()
                entries[(code, scheme)] = Code(code, scheme, (c.get("display") or code).strip())
        authorities = [a.get("id", "") for a in root.iter("{*}AssigningAuthority") if a.get("id")]
        return cls(types, schemes, authorities, str(p))

    def codes(self, code_type: str) -> list[Code]:
        return list(self._types.get(code_type, {}).values())

    def has_type(self, code_type: str) -> bool:
        return code_type in self._types

    def find(self, code_type: str, code: str, scheme: str | None = None) -> Code | None:
        entries = self._types.get(code_type, {})
        if scheme is not None:
            return entries.get((code, scheme))
        matches = [c for (v, _), c in entries.items() if v == code]
        return matches[0] if len(matches) == 1 else None

    def get(self, code_type: str, code: str, scheme: str | None = None) -> Code:
        """The listed code, or :class:`CodeNotInDomain` saying which list and file lack it."""
        if code_type not in self._types:
            raise CodeNotInDomain(f"the codes file {self.source} has no {code_type} list")
        found = self.find(code_type, code, scheme)
        if found is None:
            what = f"{code!r}" + (f" (scheme {scheme})" if scheme else "")
            raise CodeNotInDomain(f"{code_type} {what} is not in the affinity domain's list ({self.source})")
        return found

    def contains(self, code_type: str, code: str, scheme: str) -> bool:
        return (code, scheme) in self._types.get(code_type, {})
