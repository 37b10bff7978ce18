"""WADO-WS RetrieveImagingDocumentSetInformation: XPath over each instance's non-pixel data (PS3.18-2016e 6.4.3).

Each requested instance is read without its pixel data, converted to the
PS3.19 Native DICOM Model, and every requested XPath is evaluated on it in
request order.  A document whose expression is refused, whose result is too
large, whose evaluation passes its time budget, or whose FrameNumber is not a
frame of it, gets a RegistryError and no response (the RAD-69 status rules
apply).  Evaluation runs in :mod:`xdsi.ids.xpath_pool` workers, bounded by
``[limits]`` (time per document and per request, result bytes per document and
per response, expressions per document and per request).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Sequence

from lxml import etree


from xdsi.archive.native_xml import NativeModelError, to_native_xml
from xdsi.archive.retrieve import NotAvailable
from xdsi.wire.ebrs import RegistryError, response_status
from xdsi.ids.model import DocumentRequest
from xdsi.ids.service import ImagingDocumentSource
from xdsi.config import LimitsSettings
from xdsi.ids.xpath import MAX_TREE_NODES, XPathRefused, XPathResult, check
from xdsi.ids.xpath_pool import XPathBudgetExceeded, XPathPool, XPathPoolBusy, XPathWorkerFailed, shared_pool
from xdsi.wire.xml import make_parser
from xdsi.standards.constants import (
    WADO_FRAME_OUT_OF_RANGE,
    WADO_INVALID_PARAMETER,
    WADO_PROCESSING_FAILURE,
    WADO_SIZE_EXCEEDS_LIMITS,
    XDS_DOCUMENT_UNIQUE_ID_ERROR,
    XDS_REPOSITORY_BUSY,
)

log = logging.getLogger(__name__)

MAX_DOCUMENTS = 1000


@dataclass(frozen=True)
class InformationRequest:
    document: DocumentRequest
    xpaths: tuple[str, ...] = ()  # none: the whole model, as if "/NativeDicomModel" had been asked
    frame_number: str | None = None


@dataclass
class DocumentInformation:
    request: InformationRequest
    results: list[XPathResult]


@dataclass
class InformationResult:
    documents: list[DocumentInformation] = field(default_factory=list)
    errors: list[RegistryError] = field(default_factory=list)

    @property
    def status(self) -> str:
        return response_status(len(self.documents), self.errors)


def _parse_results(raw: tuple[tuple[str, tuple[bytes, ...]], ...]) -> list[XPathResult]:
    parser = make_parser()
    return [XPathResult(text, [etree.fromstring(b, parser) for b in els]) for text, els in raw]


def retrieve_information(
    ids: ImagingDocumentSource,
    requests: Sequence[InformationRequest],
    limits: LimitsSettings | None = None,
    pool: XPathPool | None = None,
) -> InformationResult:
    limits = limits or LimitsSettings()
    pool = pool or shared_pool(limits)
    out = InformationResult()
    if len(requests) > MAX_DOCUMENTS:
        for r in requests:
            out.errors.append(RegistryError(WADO_SIZE_EXCEEDS_LIMITS, f"more than {MAX_DOCUMENTS} documents in one request", r.document.document_unique_id or None))
        return out
    total = sum(len(r.xpaths) for r in requests)
    if total > limits.xpath_per_request:
        for r in requests:
            out.errors.append(RegistryError(WADO_SIZE_EXCEEDS_LIMITS, f"{total} XPath expressions in one request, more than {limits.xpath_per_request}", r.document.document_unique_id or None))
        return out
    resolved, errors = ids.resolve([r.document for r in requests])
    out.errors.extend(errors)
    by_request = {id(x.request): x for x in resolved}
    deadline = time.monotonic() + limits.xpath_request_seconds
    response_left = limits.xpath_response_bytes
    for r in requests:
        item = by_request.get(id(r.document))
        if item is None:
            continue
        loc = r.document.document_unique_id
        # the expressions first: a refused one costs no file read
        try:
            if len(r.xpaths) > limits.xpath_per_document:
                raise XPathRefused(f"more than {limits.xpath_per_document} XPath expressions for one document")
            exprs = [check(x, limits.xpath_max_length) for x in r.xpaths] or ["/NativeDicomModel"]
        except XPathRefused as exc:
            out.errors.append(RegistryError(WADO_INVALID_PARAMETER, f"XPath: {exc}", loc))
            continue
        left = deadline - time.monotonic()
        if left <= 0:
            out.errors.append(RegistryError(WADO_SIZE_EXCEEDS_LIMITS, f"the request's XPath time budget ({limits.xpath_request_seconds:g} s) is spent", loc))
            continue
        if response_left <= 0:
            out.errors.append(RegistryError(WADO_SIZE_EXCEEDS_LIMITS, f"the response's XPath result budget ({limits.xpath_response_bytes} bytes) is spent", loc))
            continue
        try:
            ds = ids.retrieve.header(item.ref)
        except (NotAvailable, OSError) as exc:
            out.errors.append(RegistryError(XDS_DOCUMENT_UNIQUE_ID_ERROR, f"instance {loc} cannot be read: {exc}", loc))
            continue
        except Exception as exc:
            out.errors.append(RegistryError(WADO_PROCESSING_FAILURE, f"instance {loc} cannot be parsed: {exc}", loc))
            continue
        frame: int | None = None
        if r.frame_number is not None:
            try:
                frame = int(r.frame_number.strip())
            except ValueError:
                out.errors.append(RegistryError(WADO_INVALID_PARAMETER, f"FrameNumber {r.frame_number[:40]!r} is not an integer", loc))
                continue
            frames = int(ds.get("NumberOfFrames", 1) or 1) if "Rows" in ds else 0
            if not 1 <= frame <= frames:
                out.errors.append(RegistryError(WADO_FRAME_OUT_OF_RANGE, f"frame {frame} requested, the instance has {frames}", loc))
                continue
        try:
            tree = to_native_xml(ds, namespace=None, frame=frame)
        except NativeModelError as exc:
            out.errors.append(RegistryError(WADO_PROCESSING_FAILURE, str(exc), loc))
            continue
        n = sum(1 for _ in tree.iter())
        if n > MAX_TREE_NODES:
            out.errors.append(RegistryError(WADO_SIZE_EXCEEDS_LIMITS, f"the dataset has {n} XML nodes, more than {MAX_TREE_NODES}", loc))
            continue
        left = deadline - time.monotonic()
        try:
            answer = pool.evaluate(
                etree.tostring(tree),
                exprs,
                seconds=max(0.05, min(limits.xpath_seconds, left)),
                max_bytes=min(limits.xpath_result_bytes, response_left),
                wait=max(0.0, left),
            )
        except XPathBudgetExceeded as exc:
            out.errors.append(RegistryError(WADO_SIZE_EXCEEDS_LIMITS, str(exc), loc))
            continue
        except XPathPoolBusy as exc:
            out.errors.append(RegistryError(XDS_REPOSITORY_BUSY, f"{exc}; try again later", loc))
            continue
        except XPathWorkerFailed as exc:
            out.errors.append(RegistryError(WADO_PROCESSING_FAILURE, str(exc), loc))
            continue
        if answer.kind == "refused":
            out.errors.append(RegistryError(WADO_INVALID_PARAMETER, answer.message, loc))
            continue
        if answer.kind != "ok":
            out.errors.append(RegistryError(WADO_SIZE_EXCEEDS_LIMITS, answer.message, loc))
            continue
        response_left -= sum(len(t.encode()) + sum(len(b) for b in els) for t, els in answer.results)
        out.documents.append(DocumentInformation(r, _parse_results(answer.results)))
    return out
