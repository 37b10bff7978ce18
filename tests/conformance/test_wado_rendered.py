"""WADO-WS RetrieveRenderedImagingDocumentSet with zeep from dcm4che's WADO-WS WSDL, against a real server.

Every parameter is exercised: each either changes the image as specified
(checked on the decoded pixels) or yields its PS3.18 6.4.4 error code.
"""

from __future__ import annotations

import io
import uuid
from typing import Any

import numpy as np
import pytest
from lxml import etree
from PIL import Image
from pydicom import dcmread

from tests.support.ids import (
    GSPS_CENTER,
    GSPS_WIDTH,
    NIST_REPOSITORY,
    WADO_WSDL,
    RawResponse,
    WadoServer,
    exchange,
    post_raw,
    registry_errors,
    status_of,
    wado_server,  # noqa: F401  (fixture)
    zeep_client,
)
from xdsi.standards.constants import (
    ACTION_RENDERED,
    ACTION_RENDERED_RESPONSE,
    ACTION_RENDERED_SWAPPED,
    ACTION_RENDERED_SWAPPED_RESPONSE,
    NS_SOAP12,
    NS_WADO,
    NS_WADO_SWAPPED,
    STATUS_FAILURE,
    STATUS_SUCCESS,
)

OP = "ImagingDocumentSource_RetrieveRenderedImagingDocumentSet"
WADO = f"{{{NS_WADO}}}"
IHE = "{urn:ihe:iti:xds-b:2007}"


def rendered(server: WadoServer, which: str = "image", content_types: tuple[str, ...] = ("image/png",), **params: Any) -> RawResponse:
    client, service = zeep_client(WADO_WSDL, server.url)
    s, sop, _f = getattr(server.wado, which)
    req = {"RepositoryUniqueId": NIST_REPOSITORY, "DocumentUniqueId": sop, **params, "ContentTypeList": {"ContentType": list(content_types)}}
    return exchange(
        client,
        service,
        OP,
        "wado",
        ACTION_RENDERED,
        StudyRequest=[{"studyInstanceUID": server.wado.study.uid, "SeriesRequest": [{"seriesInstanceUID": s, "RenderedDocumentRequest": [req]}]}],  # type: ignore[union-attr]
    )


def image_of(resp: RawResponse) -> tuple[Any, np.ndarray]:
    (d,) = resp.body.iter(WADO + "RenderedDocumentResponse")
    data = resp.document(d.find(IHE + "Document"))
    img = Image.open(io.BytesIO(data))
    return d, np.asarray(img.convert("L") if img.mode not in ("L",) else img)


def expected_window(server: WadoServer, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 linear window on the modality values, to 0..255."""
    ds = dcmread(server.wado.image[2])  # type: ignore[union-attr]
    x = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    lo, hi = center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
    y = ((x - (center - 0.5)) / (width - 1) + 0.5) * 255
    return np.where(x <= lo, 0, np.where(x > hi, 255, y))


def error_codes(resp: RawResponse) -> list[str]:
    return [e["errorCode"] for e in registry_errors(resp.body)]


def test_png_default_is_full_size_with_the_image_window(wado_server: WadoServer) -> None:
    resp = rendered(wado_server)
    assert status_of(resp.body) == STATUS_SUCCESS
    d, img = image_of(resp)
    assert img.shape == (64, 128)
    assert d.findtext(WADO + "SourceDocumentUniqueId") == wado_server.wado.image[1]  # type: ignore[union-attr]
    assert d.findtext(IHE + "mimeType") == "image/png"
    assert (d.findtext(WADO + "Rows"), d.findtext(WADO + "Columns")) == ("64", "128")
    assert d.find(WADO + "FrameNumber") is None  # not requested, not returned
    # the image's own window (40/400)
    assert np.abs(img.astype(int) - expected_window(wado_server, 40, 400)).max() <= 1


def test_explicit_window(wado_server: WadoServer) -> None:
    resp = rendered(wado_server, WindowCenter="1000", WindowWidth="2000")
    d, img = image_of(resp)
    assert np.abs(img.astype(int) - expected_window(wado_server, 1000, 2000)).max() <= 1
    assert (d.findtext(WADO + "WindowCenter"), d.findtext(WADO + "WindowWidth")) == ("1000", "2000")


def test_rows_columns_keep_aspect(wado_server: WadoServer) -> None:
    _d, img = image_of(rendered(wado_server, Rows="32"))
    assert img.shape == (32, 64)
    d, img = image_of(rendered(wado_server, Rows="50", Columns="50"))
    assert img.shape == (25, 50)
    assert (d.findtext(WADO + "Rows"), d.findtext(WADO + "Columns")) == ("25", "50")


def test_region(wado_server: WadoServer) -> None:
    d, img = image_of(rendered(wado_server, Region="0.5,0,1,0.5", WindowCenter="1000", WindowWidth="2000"))
    assert img.shape == (32, 64)
    full = expected_window(wado_server, 1000, 2000)
    assert np.abs(img.astype(int) - full[:32, 64:]).max() <= 1
    assert d.findtext(WADO + "Region") == "0.5,0,1,0.5"


def test_jpeg_quality_and_gif(wado_server: WadoServer) -> None:
    low = rendered(wado_server, content_types=("image/jpeg",), ImageQuality="5")
    high = rendered(wado_server, content_types=("image/jpeg",), ImageQuality="95")
    size = {k: len(next(iter(r.attachments.values()))) for k, r in (("low", low), ("high", high))}
    assert size["low"] < size["high"]
    _d, img = image_of(high)
    assert np.abs(img.astype(int) - expected_window(wado_server, 40, 400)).mean() < 3
    resp = rendered(wado_server, content_types=("image/gif",))
    d, img = image_of(resp)
    assert d.findtext(IHE + "mimeType") == "image/gif" and img.shape == (64, 128)
    # the first supported type of the list is used
    d, _ = image_of(rendered(wado_server, content_types=("application/dicom", "image/jpeg", "image/png")))
    assert d.findtext(IHE + "mimeType") == "image/jpeg"


def test_annotation_burns_text_in(wado_server: WadoServer) -> None:
    _d, plain = image_of(rendered(wado_server, Rows="256", WindowCenter="5000", WindowWidth="10"))
    d, ann = image_of(rendered(wado_server, Rows="256", WindowCenter="5000", WindowWidth="10", Annotation="patient,technique"))
    assert d.findtext(WADO + "Annotation") == "patient,technique"
    assert plain.max() == 0  # all below the window: black
    assert ann.max() == 255 and (ann > 0).sum() > 50  # white text on it


def test_frame_number(wado_server: WadoServer) -> None:
    d, img = image_of(rendered(wado_server, "multiframe", FrameNumber="2", WindowCenter="1000", WindowWidth="4000"))
    assert d.findtext(WADO + "FrameNumber") == "2"
    # frame k holds stored 1000*k everywhere: HU 1000*k-1024
    expect = expected_window_value(2000 - 1024, 1000, 4000)
    assert abs(int(img[0, 0]) - expect) <= 1 and img.min() == img.max()
    resp = rendered(wado_server, "multiframe", FrameNumber="4")
    assert status_of(resp.body) == STATUS_FAILURE and error_codes(resp) == ["urn:dicom:wado:0018"]


def expected_window_value(x: float, center: float, width: float) -> int:
    return int(round(((x - (center - 0.5)) / (width - 1) + 0.5) * 255))


def test_presentation_state_is_applied(wado_server: WadoServer) -> None:
    w = wado_server.wado
    assert w is not None
    d, img = image_of(rendered(wado_server, PresentationUID=w.gsps[1], PresentationSeriesUID=w.gsps[0]))
    assert np.abs(img.astype(int) - expected_window(wado_server, GSPS_CENTER, GSPS_WIDTH)).max() <= 1
    assert d.findtext(WADO + "PresentationUID") == w.gsps[1]
    resp = rendered(wado_server, PresentationUID="1.2.3.4.5", PresentationSeriesUID=w.gsps[0])
    assert error_codes(resp) == ["urn:dicom:wado:0019"]
    resp = rendered(wado_server, PresentationUID=w.gsps[1], PresentationSeriesUID=w.image[0])
    assert error_codes(resp) == ["urn:dicom:wado:0020"]
    resp = rendered(wado_server, PresentationUID=w.multiframe[1], PresentationSeriesUID=w.multiframe[0])
    assert error_codes(resp) == ["urn:dicom:wado:0009"]


@pytest.mark.parametrize(
    "params,code",
    [
        ({"WindowCenter": "40"}, "urn:dicom:wado:0012"),
        ({"Rows": "zero"}, "urn:dicom:wado:0012"),
        ({"Rows": "0"}, "urn:dicom:wado:0012"),
        ({"Region": "0.5,0.5,0.2,0.9"}, "urn:dicom:wado:0012"),
        ({"ImageQuality": "101"}, "urn:dicom:wado:0012"),
        ({"ImageQuality": "50"}, "urn:dicom:wado:0012"),  # PNG has no quality
        ({"Annotation": "everything"}, "urn:dicom:wado:0012"),
        ({"Anonymize": "yes"}, "urn:dicom:wado:0002"),
        ({"PresentationUID": "1.2.3"}, "urn:dicom:wado:0012"),  # without its series
        ({"CharsetList": {"Charset": ["<bad>"]}}, "urn:dicom:wado:0012"),
        ({"FrameNumber": "2"}, "urn:dicom:wado:0018"),  # single-frame image
    ],
)
def test_bad_parameters_get_their_error(wado_server: WadoServer, params: dict[str, Any], code: str) -> None:
    resp = rendered(wado_server, **params)
    assert status_of(resp.body) == STATUS_FAILURE
    assert error_codes(resp) == [code]
    assert registry_errors(resp.body)[0]["location"] == wado_server.wado.image[1]  # type: ignore[union-attr]


def test_unsupported_content_type(wado_server: WadoServer) -> None:
    resp = rendered(wado_server, content_types=("application/dicom", "text/html"))
    assert error_codes(resp) == ["urn:dicom:wado:0006"]


def test_charset_is_accepted(wado_server: WadoServer) -> None:
    resp = rendered(wado_server, CharsetList={"Charset": ["UTF-8"]})
    assert status_of(resp.body) == STATUS_SUCCESS


def test_not_renderable_object(wado_server: WadoServer) -> None:
    w = wado_server.wado
    assert w is not None
    client, service = zeep_client(WADO_WSDL, wado_server.url)
    req = {"RepositoryUniqueId": NIST_REPOSITORY, "DocumentUniqueId": w.gsps[1], "ContentTypeList": {"ContentType": ["image/jpeg"]}}
    resp = exchange(client, service, OP, "wado", ACTION_RENDERED, StudyRequest=[{"studyInstanceUID": w.study.uid, "SeriesRequest": [{"seriesInstanceUID": w.gsps[0], "RenderedDocumentRequest": [req]}]}])
    assert error_codes(resp) == ["urn:dicom:wado:0014"]


def test_legacy_swapped_namespace_and_action(wado_server: WadoServer) -> None:
    w = wado_server.wado
    assert w is not None
    s, sop, _f = w.image
    msg_id = f"urn:uuid:{uuid.uuid4()}"
    env = (
        f'<s:Envelope xmlns:s="{NS_SOAP12}" xmlns:a="http://www.w3.org/2005/08/addressing"><s:Header>'
        f'<a:Action s:mustUnderstand="1">{ACTION_RENDERED_SWAPPED}</a:Action><a:MessageID>{msg_id}</a:MessageID></s:Header><s:Body>'
        f'<w:RetrieveRenderedImagingDocumentSetRequest xmlns:w="{NS_WADO_SWAPPED}" xmlns:ihe="urn:ihe:iti:xds-b:2007">'
        f'<w:StudyRequest studyInstanceUID="{w.study.uid}"><w:SeriesRequest seriesInstanceUID="{s}"><w:RenderedDocumentRequest>'
        f"<ihe:RepositoryUniqueId>{NIST_REPOSITORY}</ihe:RepositoryUniqueId><ihe:DocumentUniqueId>{sop}</ihe:DocumentUniqueId>"
        f"<w:Rows>16</w:Rows><w:ContentTypeList><w:ContentType>image/jpeg</w:ContentType></w:ContentTypeList>"
        f"</w:RenderedDocumentRequest></w:SeriesRequest></w:StudyRequest></w:RetrieveRenderedImagingDocumentSetRequest></s:Body></s:Envelope>"
    )
    resp = post_raw(wado_server.url, env.encode(), action=ACTION_RENDERED_SWAPPED)
    assert resp.header("Action").text == ACTION_RENDERED_SWAPPED_RESPONSE
    assert resp.body.tag == f"{{{NS_WADO_SWAPPED}}}RetrieveRenderedImagingDocumentSetResponse"
    rr = resp.body.find(f"{{{NS_WADO_SWAPPED}}}RegistryResponse")
    assert rr.get("status") == STATUS_SUCCESS
    (d,) = resp.body.iter(f"{{{NS_WADO_SWAPPED}}}RenderedDocumentResponse")
    img = Image.open(io.BytesIO(resp.document(d.find(IHE + "Document"))))
    assert img.format == "JPEG" and img.size == (32, 16)
    assert etree.QName(resp.body).localname == "RetrieveRenderedImagingDocumentSetResponse"


@pytest.mark.parametrize(
    ("action", "namespace", "response_action"),
    [
        (ACTION_RENDERED_SWAPPED, NS_WADO, ACTION_RENDERED_SWAPPED_RESPONSE),  # the legacy action, a standard body
        (ACTION_RENDERED, NS_WADO_SWAPPED, ACTION_RENDERED_RESPONSE),  # the standard action, a swapped body
        (ACTION_RENDERED, NS_WADO, ACTION_RENDERED_RESPONSE),
        (ACTION_RENDERED_SWAPPED, NS_WADO_SWAPPED, ACTION_RENDERED_SWAPPED_RESPONSE),
    ],
)
def test_answer_in_the_namespace_of_the_request_body(wado_server: WadoServer, action: str, namespace: str, response_action: str) -> None:
    """The response body is in the namespace the request body used, whatever the action; the reply action follows the action."""
    w = wado_server.wado
    assert w is not None
    s, sop, _f = w.image
    env = (
        f'<s:Envelope xmlns:s="{NS_SOAP12}" xmlns:a="http://www.w3.org/2005/08/addressing"><s:Header>'
        f'<a:Action s:mustUnderstand="1">{action}</a:Action><a:MessageID>urn:uuid:{uuid.uuid4()}</a:MessageID></s:Header><s:Body>'
        f'<w:RetrieveRenderedImagingDocumentSetRequest xmlns:w="{namespace}" xmlns:ihe="urn:ihe:iti:xds-b:2007">'
        f'<w:StudyRequest studyInstanceUID="{w.study.uid}"><w:SeriesRequest seriesInstanceUID="{s}"><w:RenderedDocumentRequest>'
        f"<ihe:RepositoryUniqueId>{NIST_REPOSITORY}</ihe:RepositoryUniqueId><ihe:DocumentUniqueId>{sop}</ihe:DocumentUniqueId>"
        f"<w:Rows>16</w:Rows><w:ContentTypeList><w:ContentType>image/jpeg</w:ContentType></w:ContentTypeList>"
        f"</w:RenderedDocumentRequest></w:SeriesRequest></w:StudyRequest></w:RetrieveRenderedImagingDocumentSetRequest></s:Body></s:Envelope>"
    )
    resp = post_raw(wado_server.url, env.encode(), action=action)
    assert resp.header("Action").text == response_action
    assert resp.body.tag == f"{{{namespace}}}RetrieveRenderedImagingDocumentSetResponse"
    assert resp.body.find(f"{{{namespace}}}RegistryResponse").get("status") == STATUS_SUCCESS
    (d,) = resp.body.iter(f"{{{namespace}}}RenderedDocumentResponse")
    assert d.findtext(f"{{{namespace}}}SourceDocumentUniqueId") == sop
    other = NS_WADO_SWAPPED if namespace == NS_WADO else NS_WADO
    assert not [e for e in resp.body.iter() if isinstance(e.tag, str) and e.tag.startswith(f"{{{other}}}")]
    img = Image.open(io.BytesIO(resp.document(d.find(IHE + "Document"))))
    assert img.format == "JPEG" and img.size == (32, 16)
