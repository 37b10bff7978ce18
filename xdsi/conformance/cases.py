"""The Connectathon Imaging Document Source cases, each a request and the rules its answer must follow.

RAD-69 cases follow NIST's ``ids_2018-48xx`` test kit (4803 good retrieves,
4811 exception cases 01-09, 4820 HomeCommunityId) with the rules they cite:
ITI-43 3.43.5 and ITI TF-3 4.2.4 for status and RegistryErrors, RAD TF-3
4.69.4.2.3 (Gazelle RAD69-005) for transfer syntaxes.  Where NIST accepts any
error code, so does the case; the code ITI TF-3 Table 4.2.4.1-2 recommends is
only advised (a warning).  The WADO-WS cases are basics: one rendered JPEG
and one XPath request, skipped when the target says it does not offer them.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from xdsi.conformance.runner import (
    IHE_WSDL,
    WADO_WSDL,
    Answer,
    Checks,
    Exchange,
    check_transport,
    document_file,
    schema_errors,
)
from xdsi.conformance.subject import Instance, Subject
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from xdsi.standards import constants as C
from xdsi.standards.constants import (
    ACTION_INFORMATION_RESPONSE,
    ACTION_RAD69_RESPONSE,
    ACTION_RENDERED_RESPONSE,
    MIME_DICOM,
    NS_NATIVE_DICOM,
    NS_RS,
    NS_SOAP12,
    NS_WADO,
    NS_XDS,
    OP_INFORMATION,
    OP_RAD69,
    OP_RENDERED,
    SEVERITY_ERROR,
    SEVERITY_WARNING,
    STATUS_FAILURE,
    STATUS_PARTIAL_SUCCESS,
    STATUS_SUCCESS,
    XDS_DOCUMENT_UNIQUE_ID_ERROR,
    XDS_UNKNOWN_REPOSITORY_ID,
)
from xdsi.uids import new_uid

IHE, RS, WADO, ND = f"{{{NS_XDS}}}", f"{{{NS_RS}}}", f"{{{NS_WADO}}}", f"{{{NS_NATIVE_DICOM}}}"
EXPLICIT_LE, IMPLICIT_LE = str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian)
# values of the NIST test kit, not of a standard
NOT_A_SYNTAX = "1.2.840.10008.1.2.1.999"  # ids_2018-4811 case 09
HOME_COMMUNITY = "urn:oid:1.3.6.1.4.1.21367.13.70.200"  # ids_2018-4820
STATUSES = (STATUS_SUCCESS, STATUS_PARTIAL_SUCCESS, STATUS_FAILURE)
# ITI TF-3 Table 4.2.4.1-2 codes a retrieve may carry; PS3.18 6.4.4 adds urn:dicom:wado:00NN
ITI_RETRIEVE_CODES = {
    C.XDS_DOCUMENT_UNIQUE_ID_ERROR, C.XDS_UNKNOWN_REPOSITORY_ID, C.XDS_REPOSITORY_ERROR, C.XDS_REPOSITORY_BUSY,
    C.XDS_REPOSITORY_OUT_OF_RESOURCES, C.XDS_REPOSITORY_METADATA_ERROR, C.XDS_MISSING_DOCUMENT, C.XDS_MISSING_HOME_COMMUNITY_ID,
    C.XDS_UNKNOWN_COMMUNITY, C.XDS_UNAVAILABLE_COMMUNITY, C.XDS_RESULT_NOT_SINGLE_PATIENT,
}  # fmt: skip


class Skip(Exception):
    """The subject or the target cannot support this case (e.g. a single series); not a failure."""


class ToolError(Exception):
    """The request we built is itself invalid: a defect of this tool, never blamed on the target."""


@dataclass
class Context:
    subject: Subject
    exchange: Exchange
    scratch: Path
    max_documents: int = 20


@dataclass(frozen=True)
class Case:
    id: str
    group: str
    title: str
    ref: str
    run: Callable[[Context, Checks], None] = field(compare=False)


# -- RAD-69 requests and answers -------------------------------------------------------------------


@dataclass(frozen=True)
class Req:
    """One DocumentRequest as sent: where it sits, and what the answer must echo."""

    study: str
    series: str
    sop: str
    repository: str
    home_community: str | None = None
    sop_class: str = ""


def req(ctx: Context, series: str, inst: Instance, *, study: str | None = None, repository: str | None = None, hcid: str | None = None) -> Req:
    s = ctx.subject
    return Req(s.study_uid if study is None else study, series, inst.sop_instance_uid, s.repository_unique_id if repository is None else repository, hcid, inst.sop_class_uid)


def rad69(ctx: Context, checks: Checks, reqs: Sequence[Req], syntaxes: Sequence[str] = (EXPLICIT_LE,)) -> Answer | None:
    """Build the RAD-69 request with zeep from the IHE WSDL, check it, send it, and check the transport."""
    studies: dict[str, dict[str, list[dict[str, str]]]] = {}
    for r in reqs:
        d = {"RepositoryUniqueId": r.repository, "DocumentUniqueId": r.sop}
        if r.home_community:
            d = {"HomeCommunityId": r.home_community, **d}
        studies.setdefault(r.study, {}).setdefault(r.series, []).append(d)
    env = ctx.exchange.build(
        IHE_WSDL,
        OP_RAD69,
        StudyRequest=[{"studyInstanceUID": st, "SeriesRequest": [{"seriesInstanceUID": se, "DocumentRequest": docs} for se, docs in ser.items()]} for st, ser in studies.items()],
        TransferSyntaxUIDList={"TransferSyntaxUID": list(syntaxes)},
    )
    errs = schema_errors(env.find(f"{{{NS_SOAP12}}}Body")[0], "ihe")
    if errs:
        raise ToolError(f"the request is invalid against the IHE schema: {errs}")
    answer = ctx.exchange.send(env)
    checks.note(f"{len(reqs)} document(s) requested, answer in {answer.seconds:.2f} s")
    ok = check_transport(answer, checks, response_action=ACTION_RAD69_RESPONSE, body_tag=IHE + "RetrieveDocumentSetResponse", schema_kind="ihe")
    return answer if ok else None


@dataclass
class Registry:
    status: str
    errors: list[dict[str, str]]
    documents: dict[str, Any]  # DocumentUniqueId -> DocumentResponse (or RenderedDocumentResponse ...)


def registry(answer: Answer, checks: Checks, response_tag: str, uid_tag: str) -> Registry | None:
    """The RegistryResponse's status and errors, with ITI TF-3 4.2.4 and Gazelle IHEXDSError rules checked."""
    body = answer.body
    rr = body.find(RS + "RegistryResponse")
    if rr is None:
        rr = body.find(WADO + "RegistryResponse")  # dcm4che's WADO-WS schema: a local element of rs:RegistryResponseType
    if not checks.require(rr is not None, "no RegistryResponse"):
        return None
    status = rr.get("status", "")
    checks.require(status in STATUSES, f"status {status!r} is none of Success, PartialSuccess, Failure (ITI TF-3 4.2.4)")
    errors = []
    for e in rr.iter(RS + "RegistryError"):
        a = dict(e.attrib)
        errors.append(a)
        checks.require(bool(a.get("errorCode")) and bool(a.get("codeContext")) and bool(a.get("severity")), f"RegistryError without errorCode, codeContext or severity: {a}")
        checks.require(a.get("severity") in (SEVERITY_ERROR, SEVERITY_WARNING), f"RegistryError severity {a.get('severity')!r} is neither Error nor Warning")
        checks.require(not (e.text or "").strip() and len(e) == 0, "RegistryError has content; its body shall be empty (Gazelle IHEXDSError)")
        code = a.get("errorCode", "")
        checks.advise(code in ITI_RETRIEVE_CODES or code.startswith("urn:dicom:wado:"), f"errorCode {code!r} is neither in ITI TF-3 Table 4.2.4.1-2 nor a PS3.18 urn:dicom:wado code")
    docs = {d.findtext(uid_tag) or "": d for d in body.iter(response_tag)}
    has_error = any(a.get("severity") == SEVERITY_ERROR for a in errors)
    if status == STATUS_SUCCESS:
        checks.require(not has_error, "status Success with Error-severity RegistryErrors (ITI TF-3 4.2.4)")
    elif status == STATUS_FAILURE:
        checks.require(has_error, "status Failure without an Error-severity RegistryError")
        checks.require(not docs, f"status Failure but {len(docs)} document(s) returned")
    elif status == STATUS_PARTIAL_SUCCESS:
        checks.require(has_error and bool(docs), "status PartialSuccess needs both an error and a returned document")
    if errors:
        checks.note("errors: " + ", ".join(f"{a.get('errorCode')}@{a.get('location', '-')}" for a in errors))
    return Registry(status, errors, docs)


def expect_documents(ctx: Context, checks: Checks, answer: Answer, reg: Registry, reqs: Sequence[Req], syntaxes: Sequence[str]) -> None:
    """ids_2018-4803: every requested document back, echoed as sent, a valid DICOM file of that instance."""
    from pydicom import dcmread

    want = {r.sop: r for r in reqs}
    checks.require(set(reg.documents) == set(want), f"documents returned {sorted(reg.documents)} != requested {sorted(want)}")
    patients: dict[tuple[str, str], list[str]] = {}
    for uid, d in reg.documents.items():
        r = want.get(uid)
        if r is None:
            continue
        checks.require(d.findtext(IHE + "RepositoryUniqueId") == r.repository, f"{uid}: RepositoryUniqueId {d.findtext(IHE + 'RepositoryUniqueId')!r} is not the one requested")
        hc = d.find(IHE + "HomeCommunityId")
        if r.home_community:
            checks.require(hc is not None and hc.text == r.home_community, f"{uid}: HomeCommunityId not echoed (ids_2018-4820)")
        else:
            checks.require(hc is None, f"{uid}: HomeCommunityId returned although none was sent (ids_2018-4820)")
        checks.require(d.findtext(IHE + "mimeType") == MIME_DICOM, f"{uid}: mimeType {d.findtext(IHE + 'mimeType')!r}, expected {MIME_DICOM}")
        doc = d.find(IHE + "Document")
        path = document_file(answer, doc, ctx.scratch, uid) if doc is not None else None
        if not checks.require(path is not None and path.exists(), f"{uid}: no document content"):
            continue
        try:
            ds = dcmread(path, stop_before_pixels=True)  # a PS3.10 file: preamble, DICM, file meta
        except Exception as exc:  # noqa: BLE001
            checks.require(False, f"{uid}: not a DICOM PS3.10 file ({str(exc)[:120]})")
            continue
        checks.require(str(ds.get("SOPInstanceUID", "")) == uid, f"{uid}: the file holds SOP Instance {ds.get('SOPInstanceUID')}")
        checks.require(str(ds.get("StudyInstanceUID", "")) == r.study, f"{uid}: the file's Study Instance UID is {ds.get('StudyInstanceUID')}")
        checks.require(str(ds.get("SeriesInstanceUID", "")) == r.series, f"{uid}: the file's Series Instance UID is {ds.get('SeriesInstanceUID')}")
        if r.sop_class:
            checks.require(str(ds.get("SOPClassUID", "")) == r.sop_class, f"{uid}: SOP Class {ds.get('SOPClassUID')} differs from the manifest's {r.sop_class}")
        ts = str(ds.file_meta.get("TransferSyntaxUID", "")) if hasattr(ds, "file_meta") else ""
        checks.require(ts in syntaxes, f"{uid}: returned in transfer syntax {ts or 'none'}, not one of those requested {list(syntaxes)} (RAD TF-3 4.69.4.2.3)")
        patients.setdefault((str(ds.get("PatientID", "")), str(ds.get("IssuerOfPatientID", ""))), []).append(uid)
        if ctx.subject.patient_id:
            checks.advise(str(ds.get("PatientID", "")) == ctx.subject.patient_id, f"{uid}: Patient ID {ds.get('PatientID')!r} differs from the manifest's {ctx.subject.patient_id!r}")


    # one study, one patient: documents of one answer under two patients would be a patient-safety defect
    checks.require(len(patients) <= 1, f"the documents of one study carry different patients: {patients}")


def expect_failure(checks: Checks, reg: Registry, location: str, *, code: str | None = None, advised_code: str | None = None, location_required: bool = True) -> None:
    """ids_2018-4811: status Failure, an Error-severity RegistryError, nothing returned."""
    checks.require(reg.status == STATUS_FAILURE, f"status {reg.status.rsplit(':', 1)[-1]!r}, expected Failure")
    checks.require(any(a.get("severity") == SEVERITY_ERROR for a in reg.errors), "no Error-severity RegistryError")
    checks.require(not reg.documents, f"{len(reg.documents)} document(s) returned for a request that must fail")
    located = any(a.get("location") == location for a in reg.errors)
    text = f"no RegistryError with location = the DocumentUniqueId {location} (ITI-43 3.43.5)"
    checks.require(located, text) if location_required else checks.advise(located, text)
    codes = [a.get("errorCode", "") for a in reg.errors]
    if code:
        checks.require(code in codes, f"errorCode {codes} lacks {code}")
    if advised_code:
        checks.advise(advised_code in codes, f"errorCode {codes}; ITI TF-3 Table 4.2.4.1-2 has {advised_code} for this")


def _rad69_registry(ctx: Context, checks: Checks, reqs: Sequence[Req], syntaxes: Sequence[str] = (EXPLICIT_LE,)) -> tuple[Answer, Registry] | None:
    answer = rad69(ctx, checks, reqs, syntaxes)
    if answer is None:
        return None
    reg = registry(answer, checks, IHE + "DocumentResponse", IHE + "DocumentUniqueId")
    return None if reg is None else (answer, reg)


def good(reqs_of: Callable[[Context], list[Req]], syntaxes: Sequence[str] = (EXPLICIT_LE,)) -> Callable[[Context, Checks], None]:
    def run(ctx: Context, checks: Checks) -> None:
        reqs = reqs_of(ctx)
        got = _rad69_registry(ctx, checks, reqs, syntaxes)
        if got is None:
            return
        answer, reg = got
        checks.require(reg.status == STATUS_SUCCESS, f"status {reg.status.rsplit(':', 1)[-1]!r}, expected Success")
        expect_documents(ctx, checks, answer, reg, reqs, syntaxes)

    return run


def bad(reqs_of: Callable[[Context], list[Req]], *, syntaxes: Sequence[str] = (EXPLICIT_LE,), code: str | None = None, advised_code: str | None = None, document_level: bool = True) -> Callable[[Context, Checks], None]:
    def run(ctx: Context, checks: Checks) -> None:
        reqs = reqs_of(ctx)
        got = _rad69_registry(ctx, checks, reqs, syntaxes)
        if got is not None:
            expect_failure(checks, got[1], reqs[0].sop, code=code, advised_code=advised_code, location_required=document_level)

    return run


# -- what each case requests -----------------------------------------------------------------------


def _single(ctx: Context) -> list[Req]:
    s, i = ctx.subject.first()
    return [req(ctx, s, i)]


def _one_series(ctx: Context) -> list[Req]:
    s, items = max(ctx.subject.series.items(), key=lambda kv: len(kv[1]))
    if len(items) < 2:
        raise Skip("no series with two instances")
    return [req(ctx, s, i) for i in items[: ctx.max_documents]]


def _several_series(ctx: Context) -> list[Req]:
    series = ctx.subject.series
    if len(series) < 2:
        raise Skip("the study has a single series")
    picked = [req(ctx, s, items[0]) for s, items in series.items()][: ctx.max_documents]
    rest = [req(ctx, s, i) for s, items in series.items() for i in items[1:]]
    return picked + rest[: max(0, ctx.max_documents - len(picked))]


def _home_community(ctx: Context) -> list[Req]:
    items = ctx.subject.instances()
    out = [req(ctx, items[0][0], items[0][1], hcid=HOME_COMMUNITY)]
    if len(items) > 1:
        out.append(req(ctx, items[1][0], items[1][1]))
    return out


def _wrong_repository(ctx: Context) -> list[Req]:
    s, i = ctx.subject.first()
    return [req(ctx, s, i, repository=new_uid())]


def _unknown_instance(ctx: Context) -> list[Req]:
    s, _ = ctx.subject.first()
    return [req(ctx, s, Instance(new_uid()))]


def _other_series(ctx: Context) -> list[Req]:
    if len(ctx.subject.series) < 2:
        raise Skip("the study has a single series")
    (s1, items1), (s2, _) = list(ctx.subject.series.items())[:2]
    return [req(ctx, s2, items1[0])]


def _unknown_study(ctx: Context) -> list[Req]:
    s, i = ctx.subject.first()
    return [req(ctx, s, i, study=new_uid())]


def _other_study(ctx: Context) -> list[Req]:
    if not ctx.subject.other_study_uid:
        raise Skip("no other study on the target is known (--other-study UID)")
    s, i = ctx.subject.first()
    return [req(ctx, s, i, study=ctx.subject.other_study_uid)]


def _unknown_series(ctx: Context) -> list[Req]:
    _, i = ctx.subject.first()
    return [req(ctx, new_uid(), i)]


def _empty(study: bool, series: bool) -> Callable[[Context], list[Req]]:
    def reqs(ctx: Context) -> list[Req]:
        s, i = ctx.subject.first()
        return [req(ctx, "" if series else s, i, study="" if study else None)]

    return reqs


def _partial(ctx: Context, checks: Checks) -> None:
    s, i = ctx.subject.first()
    known, unknown = req(ctx, s, i), req(ctx, s, Instance(new_uid()))
    got = _rad69_registry(ctx, checks, [known, unknown])
    if got is None:
        return
    answer, reg = got
    checks.require(reg.status == STATUS_PARTIAL_SUCCESS, f"status {reg.status.rsplit(':', 1)[-1]!r}, expected PartialSuccess")
    checks.require(any(a.get("location") == unknown.sop and a.get("severity") == SEVERITY_ERROR for a in reg.errors), "no Error with location = the unknown DocumentUniqueId")
    checks.require(not any(a.get("location") == known.sop and a.get("severity") == SEVERITY_ERROR for a in reg.errors), "an Error for the known document")
    reg.documents.pop(unknown.sop, None)  # reported by the set comparison below if present
    expect_documents(ctx, checks, answer, reg, [known], (EXPLICIT_LE,))
    rel = answer.body.find(f"{RS}RegistryResponse/{RS}RegistryErrorList")
    if rel is not None and rel.get("highestSeverity"):
        checks.require(rel.get("highestSeverity") == SEVERITY_ERROR, f"highestSeverity {rel.get('highestSeverity')!r} with an Error in the list")


def _any_listed_syntax(ctx: Context, checks: Checks) -> None:
    """RAD69-005: encoded in a listed syntax or refused with an error; never another syntax."""
    reqs = _single(ctx)
    got = _rad69_registry(ctx, checks, reqs, (IMPLICIT_LE,))
    if got is None:
        return
    answer, reg = got
    if reg.status == STATUS_SUCCESS:
        expect_documents(ctx, checks, answer, reg, reqs, (IMPLICIT_LE,))
    else:
        expect_failure(checks, reg, reqs[0].sop)
        checks.note("the target refused Implicit VR Little Endian (allowed: it shall then answer an error)")


# -- WADO-WS ---------------------------------------------------------------------------------------


def _offered(answer: Answer) -> None:
    """A target that does not offer the operation says so with a fault; PS3.18 6.4 asks for one of three."""
    if answer.is_fault and any(v.endswith("ActionNotSupported") for v in answer.fault_subcodes()):
        raise Skip(f"the target does not offer it: {answer.fault_text()[:160]}")


def _rendered(ctx: Context, checks: Checks, sop: str | None = None) -> tuple[Answer, Registry, str] | None:
    pick = ctx.subject.image()
    if pick is None:
        raise Skip("no instance of an image storage SOP class to render")
    series, inst = pick
    uid = sop or inst.sop_instance_uid
    env = ctx.exchange.build(
        WADO_WSDL,
        OP_RENDERED,
        StudyRequest=[{
            "studyInstanceUID": ctx.subject.study_uid,
            "SeriesRequest": [{"seriesInstanceUID": series, "RenderedDocumentRequest": [{
                "RepositoryUniqueId": ctx.subject.repository_unique_id, "DocumentUniqueId": uid, "ContentTypeList": {"ContentType": ["image/jpeg"]},
            }]}],
        }],
    )  # fmt: skip
    errs = schema_errors(env.find(f"{{{NS_SOAP12}}}Body")[0], "wado")
    if errs:
        raise ToolError(f"the rendered request is invalid against the WADO-WS schema: {errs}")
    answer = ctx.exchange.send(env)
    _offered(answer)
    if not check_transport(answer, checks, response_action=ACTION_RENDERED_RESPONSE, body_tag=WADO + "RetrieveRenderedImagingDocumentSetResponse", schema_kind="wado"):
        return None
    reg = registry(answer, checks, WADO + "RenderedDocumentResponse", WADO + "SourceDocumentUniqueId")
    return None if reg is None else (answer, reg, uid)


def _rendered_jpeg(ctx: Context, checks: Checks) -> None:
    from PIL import Image

    got = _rendered(ctx, checks)
    if got is None:
        return
    answer, reg, uid = got
    checks.require(reg.status == STATUS_SUCCESS, f"status {reg.status.rsplit(':', 1)[-1]!r}, expected Success")
    if not checks.require(set(reg.documents) == {uid}, f"RenderedDocumentResponse for {sorted(reg.documents)}, expected [{uid}] (wado:SourceDocumentUniqueId)"):
        return
    d = reg.documents[uid]
    checks.require(d.findtext(IHE + "RepositoryUniqueId") == ctx.subject.repository_unique_id, "RepositoryUniqueId not echoed")
    checks.require(d.findtext(IHE + "mimeType") == "image/jpeg", f"mimeType {d.findtext(IHE + 'mimeType')!r}, expected image/jpeg")
    doc = d.find(IHE + "Document")
    path = document_file(answer, doc, ctx.scratch, uid) if doc is not None else None
    if not checks.require(path is not None and path.exists(), "no rendered document"):
        return
    try:
        with Image.open(io.BytesIO(path.read_bytes())) as img:  # type: ignore[union-attr]
            fmt, size = img.format, img.size
            img.load()
    except Exception as exc:  # noqa: BLE001
        checks.require(False, f"the rendered document is not an image ({str(exc)[:120]})")
        return
    checks.require(fmt == "JPEG", f"the rendered document is {fmt}, expected JPEG")
    checks.note(f"rendered {size[0]}x{size[1]} JPEG")
    rows, cols = d.findtext(WADO + "Rows"), d.findtext(WADO + "Columns")
    if rows and cols:
        checks.advise((rows, cols) == (str(size[1]), str(size[0])), f"wado:Rows/Columns {rows}x{cols} are not the image's {size[1]}x{size[0]} (the actual values used, PS3.18 6.4.2)")


def _rendered_unknown(ctx: Context, checks: Checks) -> None:
    missing = new_uid()
    got = _rendered(ctx, checks, missing)
    if got is not None:
        expect_failure(checks, got[1], missing)


def _information(ctx: Context, checks: Checks) -> None:
    series, inst = ctx.subject.first()
    uid = inst.sop_instance_uid
    xpaths = [
        '/NativeDicomModel/DicomAttribute[@keyword="SOPInstanceUID"]/Value[@number=1]',
        'string(/NativeDicomModel/DicomAttribute[@tag="0020000D"]/Value[@number=1])',
    ]
    env = ctx.exchange.build(
        WADO_WSDL,
        OP_INFORMATION,
        StudyRequest=[{
            "studyInstanceUID": ctx.subject.study_uid,
            "SeriesRequest": [{"seriesInstanceUID": series, "DocumentRequest": [{
                "RepositoryUniqueId": ctx.subject.repository_unique_id, "DocumentUniqueId": uid, "XPath": xpaths,
            }]}],
        }],
    )  # fmt: skip
    errs = schema_errors(env.find(f"{{{NS_SOAP12}}}Body")[0], "information")
    if errs:
        raise ToolError(f"the information request is invalid against its schema: {errs}")
    answer = ctx.exchange.send(env)
    _offered(answer)
    if not check_transport(answer, checks, response_action=ACTION_INFORMATION_RESPONSE, body_tag=WADO + "RetrieveImagingDocumentSetInformationResponse", schema_kind="information"):
        return
    reg = registry(answer, checks, WADO + "DocumentInformationResponse", IHE + "DocumentUniqueId")
    if reg is None:
        return
    checks.require(reg.status == STATUS_SUCCESS, f"status {reg.status.rsplit(':', 1)[-1]!r}, expected Success")
    if not checks.require(set(reg.documents) == {uid}, f"DocumentInformationResponse for {sorted(reg.documents)}, expected [{uid}]"):
        return
    got = list(reg.documents[uid].iter(WADO + "XPathResponse"))
    if not checks.require(len(got) == len(xpaths), f"{len(got)} XPathResponse(s) for {len(xpaths)} XPath expressions (one each, in order)"):
        return
    value = got[0].find(ND + "Value")
    first = (value.text if value is not None else got[0].text) or ""
    checks.require(first.strip() == uid, f"XPath SOPInstanceUID answered {first!r}, expected {uid}")
    checks.require((got[1].text or "").strip() == ctx.subject.study_uid, f"XPath Study Instance UID answered {got[1].text!r}")


# -- the catalogue ---------------------------------------------------------------------------------

NIST = "NIST ids_2018"
CASES: tuple[Case, ...] = (
    Case("rad69-4803a-single", "RAD-69", "good retrieve: one instance", f"{NIST}-4803a; ITI-43 3.43.5", good(_single)),
    Case("rad69-4803b-series", "RAD-69", "good retrieve: several instances of one series", f"{NIST}-4803b", good(_one_series)),
    Case("rad69-4803c-study", "RAD-69", "good retrieve: instances of several series", f"{NIST}-4803c", good(_several_series)),
    Case("rad69-4820-home-community", "RAD-69", "HomeCommunityId echoed when sent, absent when not", f"{NIST}-4820", good(_home_community)),
    Case("rad69-transfer-syntax", "RAD-69", "only Implicit VR LE accepted: returned in it, or refused", "RAD TF-3 4.69.4.2.3 (Gazelle RAD69-005)", _any_listed_syntax),
    Case("rad69-4811-01-repository", "RAD-69", "wrong repositoryUniqueId: XDSUnknownRepositoryId", f"{NIST}-4811 case 01; ITI TF-3 Table 4.2.4.1-2", bad(_wrong_repository, code=XDS_UNKNOWN_REPOSITORY_ID)),
    Case("rad69-4811-02-unknown-instance", "RAD-69", "unknown SOP Instance UID", f"{NIST}-4811 case 02", bad(_unknown_instance, advised_code=XDS_DOCUMENT_UNIQUE_ID_ERROR)),
    Case("rad69-4811-03-other-series", "RAD-69", "instance requested under another series of the study", f"{NIST}-4811 case 03", bad(_other_series)),
    Case("rad69-4811-04-other-study", "RAD-69", "instance and its series requested under another study", f"{NIST}-4811 case 04", bad(_other_study)),
    Case("rad69-4811-04-unknown-study", "RAD-69", "instance requested under an unknown study", f"{NIST}-4811 case 04 (unknown study)", bad(_unknown_study)),
    Case("rad69-unknown-series", "RAD-69", "instance requested under an unknown series", f"{NIST}-4811 cases 03/04", bad(_unknown_series)),
    Case("rad69-4811-05-empty-study", "RAD-69", "empty studyInstanceUID", f"{NIST}-4811 case 05", bad(_empty(True, False), document_level=False)),
    Case("rad69-4811-06-empty-series", "RAD-69", "empty seriesInstanceUID", f"{NIST}-4811 case 06", bad(_empty(False, True), document_level=False)),
    Case("rad69-4811-07-empty-both", "RAD-69", "empty study and series UIDs", f"{NIST}-4811 case 07", bad(_empty(True, True), document_level=False)),
    Case("rad69-4811-08-empty-syntax", "RAD-69", "empty TransferSyntaxUID", f"{NIST}-4811 case 08", bad(_single, syntaxes=("",), document_level=False)),
    Case("rad69-4811-09-unsupported-syntax", "RAD-69", f"transfer syntax {NOT_A_SYNTAX} only", f"{NIST}-4811 case 09; RAD TF-3 4.69.4.2.3", bad(_single, syntaxes=(NOT_A_SYNTAX,), document_level=False)),
    Case("rad69-partial-success", "RAD-69", "known and unknown instance: PartialSuccess", "ITI TF-3 4.2.4; ITI-43 3.43.5", _partial),
    Case("wado-rendered-jpeg", "WADO-WS", "RetrieveRendered: one image as JPEG", "PS3.18-2019a 6.4.2", _rendered_jpeg),
    Case("wado-rendered-unknown", "WADO-WS", "RetrieveRendered: unknown instance fails", "PS3.18-2019a 6.4.2/6.4.4", _rendered_unknown),
    Case("wado-information-xpath", "WADO-WS", "RetrieveImagingDocumentSetInformation: two XPath values", "PS3.18-2016e 6.4.3", _information),
)


def by_id() -> dict[str, Case]:
    return {c.id: c for c in CASES}


__all__ = ["CASES", "Case", "Context", "Skip", "ToolError", "by_id"]
