"""A RAD-69 Imaging Document Consumer: zeep builds the request, the MTOM answer is streamed to files.

zeep decodes MTOM answers only by holding them whole in memory, so it is
used here for what it does well (a schema-correct SOAP 1.2 + WS-Addressing
request from the WSDL) and the answer is read with :func:`xdsi.wire.multipart.read_parts`:
each attachment goes straight to ``<out>/<SOP Instance UID>.dcm`` as it
arrives.  Works against any conformant Imaging Document Source.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Sequence

import requests
from lxml import etree

from xdsi.wire.soap import parse_xml, readdress
from xdsi.soap.validation import WSDL_DIR
from xdsi.wire.media import parse_content_type
from xdsi.wire.ebrs import RegistryError, parse_registry_response
from xdsi.wire.mtom import MtomError, normalize_cid
from xdsi.wire.multipart import MultipartError, read_parts
from xdsi.standards.constants import ACTION_RAD69, NS_XDS, NS_RS, NS_SOAP12, NS_XOP

IHE = f"{{{NS_XDS}}}"
RS = f"{{{NS_RS}}}"
OP = "ImagingDocumentSource_RetrieveImagingDocumentSet"
DEFAULT_SYNTAXES = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")


@dataclass
class RetrieveReport:
    status: str = ""
    saved: list[Path] = field(default_factory=list)
    errors: list[RegistryError] = field(default_factory=list)
    fault: str | None = None
    bytes: int = 0


def build_request(url: str, study: str, series: dict[str, Sequence[str]], repository_unique_id: str, transfer_syntaxes: Sequence[str] = DEFAULT_SYNTAXES, home_community_id: str | None = None) -> bytes:
    """The RAD-69 envelope, built by zeep from the WSDL, with IHE's WS-Addressing headers (to ``url``)."""
    import zeep

    client = zeep.Client(str(WSDL_DIR / "ImagingDocumentSource.wsdl"), settings=zeep.Settings(strict=True))
    binding = next(iter(next(iter(client.wsdl.services.values())).ports.values())).binding.name
    service = client.create_service(binding, url)

    def doc(sop: str) -> dict[str, str]:
        d = {"RepositoryUniqueId": repository_unique_id, "DocumentUniqueId": sop}
        if home_community_id:
            d = {"HomeCommunityId": home_community_id, **d}
        return d

    env = client.create_message(
        service,
        OP,
        StudyRequest=[{"studyInstanceUID": study, "SeriesRequest": [{"seriesInstanceUID": s, "DocumentRequest": [doc(i) for i in sops]} for s, sops in series.items()]}],
        TransferSyntaxUIDList={"TransferSyntaxUID": list(transfer_syntaxes)},
    )
    readdress(env, ACTION_RAD69, url)
    return etree.tostring(env, xml_declaration=True, encoding="UTF-8")


class _Counting(io.RawIOBase):
    def __init__(self, f: IO[bytes], progress: Callable[[int], None]) -> None:
        self.f, self.progress = f, progress

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        n = self.f.write(b)
        self.progress(len(b))
        return n

    def close(self) -> None:
        self.f.close()
        super().close()


def retrieve(
    url: str,
    study: str,
    series: dict[str, Sequence[str]],
    out_dir: Path,
    *,
    repository_unique_id: str,
    transfer_syntaxes: Sequence[str] = DEFAULT_SYNTAXES,
    progress: Callable[[int], None] = lambda n: None,
    on_document: Callable[[Path], None] = lambda p: None,
    timeout: float = 600,
    session: requests.Session | None = None,
) -> RetrieveReport:
    """Send RAD-69 and save each returned document as it is read; nothing is held whole in memory."""
    out_dir.mkdir(parents=True, exist_ok=True)
    envelope = build_request(url, study, series, repository_unique_id, transfer_syntaxes)
    http = session or requests.Session()
    report = RetrieveReport()
    resp = http.post(
        url,
        data=envelope,
        headers={"Content-Type": f'application/soap+xml; charset=UTF-8; action="{ACTION_RAD69}"'},
        stream=True,
        timeout=timeout,
    )
    try:
        media, params = parse_content_type(resp.headers.get("Content-Type", ""))
        root_buf = io.BytesIO()
        state: dict[str, Any] = {"root": None, "targets": {}}
        open_files: list[IO[bytes]] = []

        def parse_root() -> None:
            root = parse_xml(root_buf.getvalue())
            state["root"] = root
            for d in root.iter(IHE + "DocumentResponse"):
                uid = d.findtext(IHE + "DocumentUniqueId") or ""
                doc = d.find(IHE + "Document")
                inc = doc.find(f"{{{NS_XOP}}}Include") if doc is not None else None
                if inc is not None:
                    state["targets"][normalize_cid(inc.get("href", ""))] = uid
                elif doc is not None and (doc.text or "").strip():  # inline base64
                    _save(out_dir, uid, base64.b64decode(doc.text), report, on_document)

        def sink(headers: dict[str, str]) -> IO[bytes]:
            if not open_files:  # the root part comes first (ITI TF-2 V.9; every IHE stack does this)
                open_files.append(root_buf)
                return root_buf
            if state["root"] is None:
                parse_root()
            cid = normalize_cid(headers.get("content-id", ""))
            uid = state["targets"].get(cid)
            name = _safe_name(uid or cid or f"part{len(open_files)}")
            path = out_dir / f"{name}.dcm"
            f = _Counting(open(path, "wb"), lambda n: (progress(n), _add(report, n)))
            open_files.append(f)  # type: ignore[arg-type]
            report.saved.append(path)
            return f  # type: ignore[return-value]

        if media == "multipart/related":
            raw = resp.raw
            raw.decode_content = True
            try:
                read_parts(raw, params.get("boundary", ""), sink, read_size=256 * 1024)
            except MultipartError as exc:
                raise MtomError(f"malformed MTOM answer: {exc}") from None
            finally:
                for f in open_files[1:]:
                    f.close()
            for p in report.saved:
                on_document(p)
            if state["root"] is None:
                parse_root()
        else:
            for chunk in resp.iter_content(256 * 1024):
                root_buf.write(chunk)
            parse_root()
    finally:
        resp.close()
    root = state["root"]
    body = root.find(f"{{{NS_SOAP12}}}Body")
    payload = body[0] if body is not None and len(body) else None
    if payload is not None and etree.QName(payload).localname == "Fault":
        report.fault = " ".join(t.strip() for t in payload.itertext() if t.strip())
        return report
    if payload is not None:
        answer = parse_registry_response(payload)
        report.status, report.errors = answer.status, answer.errors
    return report


def _add(report: RetrieveReport, n: int) -> None:
    report.bytes += n


def _safe_name(uid: str) -> str:
    """A file name from a UID or Content-ID that cannot leave the output folder."""
    keep = "".join(c if c.isalnum() or c in ".-_@" else "_" for c in uid)[:128].lstrip(".")
    return keep or "document"


def _save(out_dir: Path, uid: str, data: bytes, report: RetrieveReport, on_document: Callable[[Path], None]) -> None:
    path = out_dir / f"{_safe_name(uid)}.dcm"
    path.write_bytes(data)
    report.saved.append(path)
    report.bytes += len(data)
    on_document(path)


def series_from_manifest(path: Path, study: str) -> dict[str, list[str]]:
    """Series and instance UIDs of ``study`` from a KOS manifest's Current Requested Procedure Evidence."""
    from pydicom import dcmread

    ds = dcmread(path)
    out: dict[str, list[str]] = {}
    for st in ds.get("CurrentRequestedProcedureEvidenceSequence", []):
        if str(st.get("StudyInstanceUID", "")) != study:
            continue
        for se in st.get("ReferencedSeriesSequence", []):
            out.setdefault(str(se.SeriesInstanceUID), []).extend(str(r.ReferencedSOPInstanceUID) for r in se.get("ReferencedSOPSequence", []))
    return out


__all__ = ["retrieve", "build_request", "series_from_manifest", "RetrieveReport", "MtomError"]
