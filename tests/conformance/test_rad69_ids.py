"""RAD-69 Retrieve Imaging Document Set against a real ``xdsi serve``: the NIST ids_2018 cases and Gazelle rules.

Requests are built by zeep from the official IHE WSDL; every request and
every response body is validated against the official IHE schemas.  The
MTOM answers are decoded with requests_toolbelt, not with our own reader.
"""

from __future__ import annotations

from typing import Any

import pytest
from lxml import etree

from tests.support.ids import (
    IHE_WSDL,
    NIST_REPOSITORY,
    IdsServer,
    RawResponse,
    assert_valid,
    dicom_of,
    ids_server,  # noqa: F401  (fixture)
    post_raw,
    registry_errors,
    status_of,
    zeep_client,
)
from xdsi.standards.constants import (
    ACTION_RAD69,
    ACTION_RAD69_LEGACY,
    ACTION_RAD69_RESPONSE,
    NS_XDS,
    NS_SOAP12,
    NS_WSA,
    SEVERITY_ERROR,
    STATUS_FAILURE,
    STATUS_PARTIAL_SUCCESS,
    STATUS_SUCCESS,
    XDS_DOCUMENT_UNIQUE_ID_ERROR,
    XDS_REPOSITORY_ERROR,
    XDS_UNKNOWN_REPOSITORY_ID,
)

OP = "ImagingDocumentSource_RetrieveImagingDocumentSet"
EXPLICIT = "1.2.840.10008.1.2.1"
IHE = f"{{{NS_XDS}}}"


def doc(sop: str, repo: str = NIST_REPOSITORY, hcid: str | None = None) -> dict[str, Any]:
    d: dict[str, Any] = {"RepositoryUniqueId": repo, "DocumentUniqueId": sop}
    if hcid is not None:
        d["HomeCommunityId"] = hcid
    return d


def study_req(study_uid: str, series: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    return {
        "studyInstanceUID": study_uid,
        "SeriesRequest": [{"seriesInstanceUID": s, "DocumentRequest": docs} for s, docs in series.items()],
    }


def rad69(server: IdsServer, studies: list[dict[str, Any]], syntaxes: list[str] = [EXPLICIT], action: str | None = None) -> RawResponse:  # noqa: B006
    """Build the request with zeep from the official WSDL, validate it, send it, validate the answer."""
    client, service = zeep_client(IHE_WSDL, server.url)
    env = client.create_message(service, OP, StudyRequest=studies, TransferSyntaxUIDList={"TransferSyntaxUID": syntaxes})
    body = env.find(f"{{{NS_SOAP12}}}Body")[0]
    assert_valid(body, "ihe")
    if action is not None:
        env.find(f".//{{{NS_WSA}}}Action").text = action
    msg_id = env.find(f".//{{{NS_WSA}}}MessageID").text
    resp = post_raw(server.url, etree.tostring(env, xml_declaration=True, encoding="UTF-8"), action=action or ACTION_RAD69)
    assert resp.http.status_code == 200, resp.http.text[:2000]
    assert etree.QName(resp.body).localname == "RetrieveDocumentSetResponse"
    assert_valid(resp.body, "ihe")
    # WS-Addressing on the answer: Action (mustUnderstand) and RelatesTo the request's MessageID
    act = resp.header("Action")
    assert act is not None and act.text == ACTION_RAD69_RESPONSE
    assert act.get(f"{{{NS_SOAP12}}}mustUnderstand") in ("1", "true")
    assert resp.header("RelatesTo").text == msg_id
    assert f'action="{ACTION_RAD69_RESPONSE}"' in resp.http.headers["Content-Type"]
    return resp


def docs_by_uid(resp: RawResponse) -> dict[str, Any]:
    return {d.findtext(IHE + "DocumentUniqueId"): d for d in resp.body.iter(IHE + "DocumentResponse")}


def assert_failure(resp: RawResponse, location: str) -> list[dict[str, str]]:
    """ids_2018-4811: status Failure, non-empty RegistryErrorList, no DocumentResponse, location = the document."""
    assert status_of(resp.body) == STATUS_FAILURE
    errs = registry_errors(resp.body)
    assert errs, "a Failure needs a RegistryErrorList"
    assert not docs_by_uid(resp)
    for e in errs:
        assert e["severity"] == SEVERITY_ERROR and e["errorCode"] and e["codeContext"]
    assert [e.get("location") for e in errs] == [location]
    # RegistryError bodies are empty (Gazelle IHEXDSError)
    for e in resp.body.iter("{urn:oasis:names:tc:ebxml-regrep:xsd:rs:3.0}RegistryError"):
        assert e.text is None and len(e) == 0
    return errs


# -- ids_2018-4803: happy path ---------------------------------------------------------------------


def test_4803_whole_study_byte_exact(ids_server: IdsServer) -> None:
    st = ids_server.studies[0]
    series = {s: [doc(sop) for sop, _f in items] for s, items in st.series.items()}
    resp = rad69(ids_server, [study_req(st.uid, series)])
    assert status_of(resp.body) == STATUS_SUCCESS
    assert registry_errors(resp.body) == []
    got = docs_by_uid(resp)
    files = {sop: f for items in st.series.values() for sop, f in items}
    assert set(got) == set(files)
    for sop, d in got.items():
        assert d.findtext(IHE + "RepositoryUniqueId") == NIST_REPOSITORY
        assert d.find(IHE + "HomeCommunityId") is None  # not sent, so not returned (4820)
        assert d.findtext(IHE + "mimeType") == "application/dicom"
        data = resp.document(d.find(IHE + "Document"))
        assert data == files[sop].read_bytes()  # headers unmodified: the stored file, byte for byte
        ds = dicom_of(data)
        assert ds.SOPInstanceUID == sop and ds.StudyInstanceUID == st.uid
        assert ds.PatientID == st.spec.patient_id and ds.PatientSex == st.spec.sex
        assert ds.PatientBirthDate == st.spec.birth_date


def test_4803_with_zeep_decoding(ids_server: IdsServer) -> None:
    """The same retrieval through zeep's own call path and MTOM decoding."""
    st = ids_server.studies[1]
    series_uid, items = next(iter(st.series.items()))
    client, service = zeep_client(IHE_WSDL, ids_server.url)
    res = getattr(service, OP)(
        StudyRequest=[study_req(st.uid, {series_uid: [doc(sop) for sop, _ in items]})],
        TransferSyntaxUIDList={"TransferSyntaxUID": [EXPLICIT, "1.2.840.10008.1.2"]},
    )
    assert res.RegistryResponse.status == STATUS_SUCCESS
    assert sorted(d.DocumentUniqueId for d in res.DocumentResponse) == sorted(sop for sop, _ in items)
    for d in res.DocumentResponse:
        f = dict(items)[d.DocumentUniqueId]
        assert d.Document == f.read_bytes()


def test_legacy_action_is_accepted(ids_server: IdsServer) -> None:
    st = ids_server.studies[0]
    series_uid, items = next(iter(st.series.items()))
    resp = rad69(ids_server, [study_req(st.uid, {series_uid: [doc(items[0][0])]})], action=ACTION_RAD69_LEGACY)
    assert status_of(resp.body) == STATUS_SUCCESS and len(docs_by_uid(resp)) == 1


# -- ids_2018-4811: exception cases ----------------------------------------------------------------


def test_4811_01_wrong_repository(ids_server: IdsServer) -> None:
    st = ids_server.studies[0]
    series_uid, items = next(iter(st.series.items()))
    resp = rad69(ids_server, [study_req(st.uid, {series_uid: [doc(items[0][0], repo="1.3.6.1.4.1.21367.13.80.999")]})])
    errs = assert_failure(resp, items[0][0])
    assert errs[0]["errorCode"] == XDS_UNKNOWN_REPOSITORY_ID


def test_4811_02_unknown_sop_instance(ids_server: IdsServer) -> None:
    st = ids_server.studies[0]
    series_uid = next(iter(st.series))
    resp = rad69(ids_server, [study_req(st.uid, {series_uid: [doc("1.2.3.4.5.6.7.8.9")]})])
    errs = assert_failure(resp, "1.2.3.4.5.6.7.8.9")
    assert errs[0]["errorCode"] == XDS_DOCUMENT_UNIQUE_ID_ERROR


def test_4811_03_sop_in_a_different_series(ids_server: IdsServer) -> None:
    st = ids_server.studies[0]
    (s1, items1), (s2, _items2) = list(st.series.items())
    resp = rad69(ids_server, [study_req(st.uid, {s2: [doc(items1[0][0])]})])
    errs = assert_failure(resp, items1[0][0])
    assert errs[0]["errorCode"] == XDS_DOCUMENT_UNIQUE_ID_ERROR  # ITI TF-3 Table 4.2.4.1-2, not the WADO-WS 0010


def test_4811_04_sop_in_a_different_study(ids_server: IdsServer) -> None:
    a, b = ids_server.studies
    series_a, items_a = next(iter(a.series.items()))
    # the instance and its series are right, the study is another one the archive holds
    resp = rad69(ids_server, [study_req(b.uid, {series_a: [doc(items_a[0][0])]})])
    errs = assert_failure(resp, items_a[0][0])
    assert errs[0]["errorCode"] == XDS_DOCUMENT_UNIQUE_ID_ERROR
    # and with the other study's series as well
    series_b = next(iter(b.series))
    resp = rad69(ids_server, [study_req(b.uid, {series_b: [doc(items_a[0][0])]})])
    assert assert_failure(resp, items_a[0][0])[0]["errorCode"] == XDS_DOCUMENT_UNIQUE_ID_ERROR


@pytest.mark.parametrize("case", ["05_empty_study", "06_empty_series", "07_both_empty"])
def test_4811_05_06_07_empty_uids(ids_server: IdsServer, case: str) -> None:
    st = ids_server.studies[0]
    series_uid, items = next(iter(st.series.items()))
    study = "" if case != "06_empty_series" else st.uid
    series = "" if case != "05_empty_study" else series_uid
    resp = rad69(ids_server, [study_req(study, {series: [doc(items[0][0])]})])
    errs = assert_failure(resp, items[0][0])
    assert errs[0]["errorCode"] == "urn:dicom:wado:0012"


def test_4811_08_empty_transfer_syntax(ids_server: IdsServer) -> None:
    st = ids_server.studies[0]
    series_uid, items = next(iter(st.series.items()))
    resp = rad69(ids_server, [study_req(st.uid, {series_uid: [doc(items[0][0])]})], syntaxes=[""])
    errs = assert_failure(resp, items[0][0])
    assert errs[0]["errorCode"] == "urn:dicom:wado:0012"


def test_4811_09_unsupported_transfer_syntax(ids_server: IdsServer) -> None:
    st = ids_server.studies[0]
    series_uid, items = next(iter(st.series.items()))
    resp = rad69(ids_server, [study_req(st.uid, {series_uid: [doc(items[0][0])]})], syntaxes=["1.2.840.10008.1.2.1.999"])
    errs = assert_failure(resp, items[0][0])
    assert errs[0]["errorCode"] == XDS_REPOSITORY_ERROR  # no specific IHE code; NIST's IDS simulator answers this one


# -- ids_2018-4820: HomeCommunityId ----------------------------------------------------------------


def test_4820_home_community_id_echoed_only_when_sent(ids_server: IdsServer) -> None:
    st = ids_server.studies[0]
    series_uid, items = next(iter(st.series.items()))
    hcid = "urn:oid:1.3.6.1.4.1.21367.13.70.200"
    resp = rad69(ids_server, [study_req(st.uid, {series_uid: [doc(items[0][0], hcid=hcid), doc(items[1][0])]})])
    got = docs_by_uid(resp)
    assert got[items[0][0]].findtext(IHE + "HomeCommunityId") == hcid
    assert got[items[1][0]].find(IHE + "HomeCommunityId") is None


# -- status rules ----------------------------------------------------------------------------------


def test_partial_success_returns_good_documents_and_errors_for_the_rest(ids_server: IdsServer) -> None:
    st = ids_server.studies[0]
    series_uid, items = next(iter(st.series.items()))
    resp = rad69(ids_server, [study_req(st.uid, {series_uid: [doc(items[0][0]), doc("1.2.3.999"), doc(items[1][0], repo="9.9")]})])
    assert status_of(resp.body) == STATUS_PARTIAL_SUCCESS
    assert set(docs_by_uid(resp)) == {items[0][0]}
    errs = registry_errors(resp.body)
    assert [(e["location"], e["errorCode"]) for e in errs] == [("1.2.3.999", XDS_DOCUMENT_UNIQUE_ID_ERROR), (items[1][0], XDS_UNKNOWN_REPOSITORY_ID)]
    rel = resp.body.find("{urn:oasis:names:tc:ebxml-regrep:xsd:rs:3.0}RegistryResponse/{urn:oasis:names:tc:ebxml-regrep:xsd:rs:3.0}RegistryErrorList")
    assert rel.get("highestSeverity") == SEVERITY_ERROR


def test_several_studies_in_one_request(ids_server: IdsServer) -> None:
    reqs = []
    want = set()
    for st in ids_server.studies:
        series_uid, items = next(iter(st.series.items()))
        reqs.append(study_req(st.uid, {series_uid: [doc(items[0][0])]}))
        want.add(items[0][0])
    resp = rad69(ids_server, reqs)
    assert status_of(resp.body) == STATUS_SUCCESS and set(docs_by_uid(resp)) == want
