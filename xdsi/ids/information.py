"""WADO-WS RetrieveImagingDocumentSetInformation: XPath over each instance's non-pixel data (PS3.18-2016e 6.4.3).

Each requested instance is read without its pixel data, converted to the
PS3.19 Native DICOM Model, and every requested XPath is evaluated on it in
request order.  A document whose expression is refused, whose result is too
large, or whose FrameNumber is not a frame of it, gets a RegistryError and
no response (the RAD-69 status rules apply).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Sequence


from xdsi.archive.native_xml import NativeModelError, to_native_xml
from xdsi.archive.retrieve import NotAvailable
from xdsi.ids.model import DocumentRequest, RegistryError, response_status
from xdsi.ids.service import ImagingDocumentSource
from xdsi.ids.xpath import MAX_EXPRESSIONS, ResultTooLarge, XPathRefused, XPathResult, check, evaluate
from xdsi.xdsconst import (
    WADO_FRAME_OUT_OF_RANGE,
    WADO_INVALID_PARAMETER,
    WADO_PROCESSING_FAILURE,
    WADO_SIZE_EXCEEDS_LIMITS,
    XDS_DOCUMENT_UNIQUE_ID_ERROR,
)

log = logging.getLogger(__name__)

MAX_DOCUMENTS = 1000
MAX_SECONDS = 60.0  # wall-clock budget of one request's evaluations


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


def retrieve_information(ids: ImagingDocumentSource, requests: Sequence[InformationRequest]) -> InformationResult:
    out = InformationResult()
    if len(requests) > MAX_DOCUMENTS:
        for r in requests:
            out.errors.append(RegistryError(WADO_SIZE_EXCEEDS_LIMITS, f"more than {MAX_DOCUMENTS} documents in one request", r.document.document_unique_id or None))
        return out
    resolved, errors = ids.resolve([r.document for r in requests])
    out.errors.extend(errors)
    by_request = {id(x.request): x for x in resolved}
    deadline = time.monotonic() + MAX_SECONDS
    for r in requests:
        item = by_request.get(id(r.document))
        if item is None:
            continue
        loc = r.document.document_unique_id
        # the expressions first: a refused one costs no file read
        try:
            exprs = [check(x) for x in r.xpaths] or ["/NativeDicomModel"]
            if len(exprs) > MAX_EXPRESSIONS:
                raise XPathRefused(f"more than {MAX_EXPRESSIONS} XPath expressions for one document")
        except XPathRefused as exc:
            out.errors.append(RegistryError(WADO_INVALID_PARAMETER, f"XPath: {exc}", loc))
            continue
        if time.monotonic() > deadline:
            out.errors.append(RegistryError(WADO_SIZE_EXCEEDS_LIMITS, "the request's processing time budget is spent", loc))
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
            results = [evaluate(tree, e) for e in exprs]
        except (XPathRefused, NativeModelError) as exc:
            out.errors.append(RegistryError(WADO_INVALID_PARAMETER if isinstance(exc, XPathRefused) else WADO_PROCESSING_FAILURE, str(exc), loc))
            continue
        except ResultTooLarge as exc:
            out.errors.append(RegistryError(WADO_SIZE_EXCEEDS_LIMITS, str(exc), loc))
            continue
        out.documents.append(DocumentInformation(r, results))
    return out
