"""WADO-WS RetrieveImagingDocumentSetInformation against a real server, checked against pydicom's reading.

There is no official WSDL or schema for this operation; requests are built
by zeep from ours and validated against ours, and the Native DICOM Model
content is validated against PS3.19's RELAX NG (trang-derived) schema.
"""

from __future__ import annotations

from typing import Any

import pytest
from lxml import etree
from pydicom import dcmread
from pydicom.datadict import keyword_for_tag

from tests.support.ids import (
    NIST_REPOSITORY,
    OUR_WSDL,
    RawResponse,
    WadoServer,
    exchange,
    registry_errors,
    status_of,
    wado_server,  # noqa: F401  (fixture)
    zeep_client,
)
from tests.support.standards import STANDARDS
from xdsi.archive.native_xml import to_native_xml
from xdsi.standards.constants import ACTION_INFORMATION, NS_NATIVE_DICOM, NS_WADO, STATUS_FAILURE, STATUS_PARTIAL_SUCCESS, STATUS_SUCCESS

OP = "ImagingDocumentSource_RetrieveImagingDocumentSetInformation"
WADO = f"{{{NS_WADO}}}"
ND = f"{{{NS_NATIVE_DICOM}}}"
RNG = etree.RelaxNG(etree.parse(str(STANDARDS / "dicom-ps3.19" / "NativeDICOM.derived-by-trang.rng")))
XSD = etree.XMLSchema(etree.parse(str(STANDARDS / "dicom-ps3.19" / "NativeDICOM.derived-by-trang.xsd")))


def info(server: WadoServer, docs: list[tuple[str, str, dict[str, Any]]]) -> RawResponse:
    client, service = zeep_client(OUR_WSDL, server.url)
    w = server.wado
    assert w is not None
    series: dict[str, list[dict[str, Any]]] = {}
    for s, sop, extra in docs:
        series.setdefault(s, []).append({"RepositoryUniqueId": NIST_REPOSITORY, "DocumentUniqueId": sop, **extra})
    return exchange(
        client,
        service,
        OP,
        "ours",
        ACTION_INFORMATION,
        StudyRequest=[{"studyInstanceUID": w.study.uid, "SeriesRequest": [{"seriesInstanceUID": s, "DocumentRequest": d} for s, d in series.items()]}],
    )


def responses(resp: RawResponse) -> list[list[Any]]:
    return [list(d.iter(WADO + "XPathResponse")) for d in resp.body.iter(WADO + "DocumentInformationResponse")]


def test_xpath_results_match_pydicom(wado_server: WadoServer) -> None:
    s, sop, f = wado_server.wado.image  # type: ignore[union-attr]
    ds = dcmread(f)
    xpaths = [
        '/NativeDicomModel/DicomAttribute[@keyword="ViewCodeSequence"]/Item[@number=1]/DicomAttribute[@keyword="CodeMeaning"]/Value[@number=1]',
        'string(/NativeDicomModel/DicomAttribute[@keyword="PatientName"]/PersonName[@number=1]/Alphabetic/FamilyName)',
        '/NativeDicomModel/DicomAttribute[@keyword="PatientName"]/PersonName/Alphabetic/GivenName/text()',
        "count(/NativeDicomModel/DicomAttribute)",
        '/NativeDicomModel/DicomAttribute[@tag="00280030"]/Value/text()',
        '/NativeDicomModel/DicomAttribute[@privateCreator="XDSI TEST"]/Value[1]/text()',
        'boolean(/NativeDicomModel/DicomAttribute[@keyword="PixelData"])',
        '/NativeDicomModel/DicomAttribute[@keyword="NoSuchThing"]',
    ]
    resp = info(wado_server, [(s, sop, {"XPath": xpaths})])
    assert status_of(resp.body) == STATUS_SUCCESS
    (got,) = responses(resp)
    assert len(got) == len(xpaths)  # one response per expression, in order
    value = got[0].find(ND + "Value")
    assert value is not None and value.text == ds.ViewCodeSequence[0].CodeMeaning and value.get("number") == "1"
    assert got[1].text == ds.PatientName.family_name == "MÜLLER"
    assert got[2].text == ds.PatientName.given_name
    top_level = [e for e in ds.file_meta if e.tag.element != 0] + [e for e in ds if e.tag != 0x7FE00010 and e.tag.element != 0]
    assert got[3].text == str(len(top_level))
    assert got[4].text == "\\".join(str(v) for v in ds.PixelSpacing)
    assert got[5].text == "private value"
    assert got[6].text == "false"  # non-pixel data only
    assert (got[7].text or "") == "" and len(got[7]) == 0  # no match: empty


def test_whole_model_without_xpath_is_valid_ps319_and_complete(wado_server: WadoServer) -> None:
    s, sop, f = wado_server.wado.image  # type: ignore[union-attr]
    resp = info(wado_server, [(s, sop, {})])
    (got,) = responses(resp)
    (model,) = got[0]
    assert model.tag == ND + "NativeDicomModel"
    assert RNG.validate(etree.ElementTree(model)), RNG.error_log
    assert XSD.validate(etree.ElementTree(model)), XSD.error_log
    ds = dcmread(f)
    by_tag = {a.get("tag"): a for a in model.iterchildren(ND + "DicomAttribute")}
    for elem in ds:
        tag = f"{int(elem.tag):08X}"
        if elem.tag == 0x7FE00010:
            assert tag not in by_tag
            continue
        a = by_tag[tag]
        assert a.get("vr") == elem.VR
        if keyword_for_tag(elem.tag):
            assert a.get("keyword") == elem.keyword
        if elem.VR in ("SQ", "PN") or elem.value in (None, ""):
            continue
        vals = elem.value if elem.VM > 1 else [elem.value]
        assert [v.text for v in a.iterchildren(ND + "Value")] == [str(v) for v in vals], elem.keyword


def test_converter_output_is_valid_for_varied_datasets(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The converter alone, on datasets with every awkward VR: valid PS3.19 each time."""
    from pydicom.dataset import Dataset

    from xdsi.tools.synth import StudySpec, ct_instance

    ds = ct_instance(StudySpec(patient_name="Yamada^Tarou=山田^太郎=やまだ^たろう"), "1.2.3", 1)
    ds.SpecificCharacterSet = ["ISO 2022 IR 6", "ISO 2022 IR 87"]
    ds.FrameIncrementPointer = 0x00181063  # AT
    ds.add_new(0x00189089, "FD", [0.5, 1.5, -2.0])
    ds.add_new(0x00090010, "LO", "CREATOR")
    ds.add_new(0x00091011, "OB", b"\x00\x01\x02\x03")
    ds.add_new(0x00091012, "UN", b"\xff" * 100000)  # above the inline limit: BulkData
    ds.add_new(0x00081030, "LO", "bad\x01char")
    inner = Dataset()
    inner.CodeValue = "1"
    inner.ReferencedSOPSequence = [Dataset()]
    ds.ProcedureCodeSequence = [inner, Dataset()]
    for namespace in (NS_NATIVE_DICOM,):
        x = to_native_xml(ds, namespace=namespace)
        assert RNG.validate(etree.ElementTree(x)), RNG.error_log
    names = x.find(f'{ND}DicomAttribute[@keyword="PatientName"]/{ND}PersonName')
    assert names.findtext(f"{ND}Ideographic/{ND}FamilyName") == "山田"
    assert x.find(f'{ND}DicomAttribute[@tag="00280009"]/{ND}Value').text == "00181063"
    assert x.find(f'{ND}DicomAttribute[@tag="00091011"]').get("privateCreator") == "CREATOR"
    assert x.find(f'{ND}DicomAttribute[@tag="00091012"]/{ND}BulkData') is not None


def test_frame_number_and_home_community(wado_server: WadoServer) -> None:
    s, sop, _f = wado_server.wado.multiframe  # type: ignore[union-attr]
    hcid = "urn:oid:1.3.6.1.4.1.21367.13.70.200"
    resp = info(wado_server, [(s, sop, {"HomeCommunityId": hcid, "FrameNumber": "2", "XPath": ['string(/NativeDicomModel/DicomAttribute[@keyword="NumberOfFrames"]/Value)']})])
    (d,) = resp.body.iter(WADO + "DocumentInformationResponse")
    assert d.findtext("{urn:ihe:iti:xds-b:2007}HomeCommunityId") == hcid
    assert d.findtext(WADO + "FrameNumber") == "2"
    assert d.findtext(f"{WADO}XPathResponseList/{WADO}XPathResponse") == "3"
    resp = info(wado_server, [(s, sop, {"FrameNumber": "4", "XPath": ["1"]})])
    assert status_of(resp.body) == STATUS_FAILURE
    assert [e["errorCode"] for e in registry_errors(resp.body)] == ["urn:dicom:wado:0018"]
    resp = info(wado_server, [(s, sop, {"XPath": ["1"]})])
    (d,) = resp.body.iter(WADO + "DocumentInformationResponse")
    assert d.find("{urn:ihe:iti:xds-b:2007}HomeCommunityId") is None and d.find(WADO + "FrameNumber") is None


@pytest.mark.parametrize(
    "expr",
    [
        "//*[//*[//*]]",  # nested whole-tree scans
        "/NativeDicomModel/DicomAttribute[count(/NativeDicomModel/DicomAttribute) > 1]",  # absolute path in a predicate
        "//DicomAttribute[descendant::Value]",
        're:test(//Value, "x")',  # extension function
        "document('file:///etc/passwd')",
        "/NativeDicomModel/" + "DicomAttribute/" * 200 + "Value",  # too long
        "/NativeDicomModel[",  # syntax
        "",
    ],
)
def test_refused_xpath_is_a_registry_error(wado_server: WadoServer, expr: str) -> None:
    s, sop, _f = wado_server.wado.image  # type: ignore[union-attr]
    s2, sop2, _f2 = wado_server.wado.multiframe  # type: ignore[union-attr]
    resp = info(wado_server, [(s, sop, {"XPath": [expr]}), (s2, sop2, {"XPath": ["count(//Value)"]})])
    assert status_of(resp.body) == STATUS_PARTIAL_SUCCESS
    errs = registry_errors(resp.body)
    assert [(e["errorCode"], e["location"]) for e in errs] == [("urn:dicom:wado:0012", sop)]
    assert len(responses(resp)) == 1


def test_identity_errors_as_for_rad69(wado_server: WadoServer) -> None:
    s, sop, _f = wado_server.wado.image  # type: ignore[union-attr]
    s2, _sop2, _f2 = wado_server.wado.multiframe  # type: ignore[union-attr]
    resp = info(wado_server, [(s, "1.2.3.4", {}), (s2, sop, {})])
    assert status_of(resp.body) == STATUS_FAILURE
    assert [e["errorCode"] for e in registry_errors(resp.body)] == ["XDSDocumentUniqueIdError", "urn:dicom:wado:0010"]
