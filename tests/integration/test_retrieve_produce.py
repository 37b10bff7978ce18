"""Issue 8 items 3 and 5 against a real ``xdsi serve``: nothing is announced before its bytes exist; frames
as viewers ask for them; CORS.

The archive holds a synthetic CT (Explicit VR LE), pydicom's own YBR_FULL JPEG
Baseline colour image, and a J2K image whose codestream no decoder can read.
RAD-69 is built by zeep from the official IHE WSDL and its MTOM answer decoded
by requests_toolbelt; DICOMweb multipart answers by dicomweb-client's own
decoder; pixels are compared with pydicom's decoding of the original.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from lxml import etree
from pydicom import dcmread
from pydicom.encaps import get_frame

from tests.support.ids import IHE_WSDL, NIST_REPOSITORY, post_raw, populate, registry_errors, status_of, zeep_client
from tests.support.server import XdsiProcess
from tests.unit.test_produce import corrupt_j2k, jpeg_colour
from xdsi.tools.synth import StudySpec, write_study
from xdsi.standards.constants import ACTION_RAD69, NS_XDS, STATUS_PARTIAL_SUCCESS, XDS_REPOSITORY_ERROR

EXPLICIT = "1.2.840.10008.1.2.1"
VIEWER = "http://viewer.example.org:3000"
IHE = f"{{{NS_XDS}}}"


@dataclass
class Held:
    proc: XdsiProcess
    ct: Path
    jpeg: Path
    corrupt: Path

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.proc.http_port}{path}"

    def instance(self, f: Path) -> str:
        ds = dcmread(f, stop_before_pixels=True)
        return f"/dicomweb/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"


@pytest.fixture(scope="module")
def held(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Held]:
    tmp = tmp_path_factory.mktemp("produce")
    ct = write_study(tmp / "ct", StudySpec(), series=1, per_series=1)[0]
    jpeg, corrupt = jpeg_colour(tmp), corrupt_j2k(tmp)
    populate(tmp / "data", [ct, jpeg, corrupt])
    cfg = tmp / "xdsi.toml"
    cfg.write_text(f'[http]\ncors_origins = ["{VIEWER}"]\n')
    proc = XdsiProcess(tmp / "data", config=cfg, env={"XDSI_REPOSITORY_UNIQUE_ID": NIST_REPOSITORY}).start()
    try:
        yield Held(proc, ct, jpeg, corrupt)
    finally:
        proc.stop()


def _doc_request(f: Path) -> dict[str, Any]:
    ds = dcmread(f, stop_before_pixels=True)
    return {
        "studyInstanceUID": ds.StudyInstanceUID,
        "SeriesRequest": [
            {"seriesInstanceUID": ds.SeriesInstanceUID, "DocumentRequest": [{"RepositoryUniqueId": NIST_REPOSITORY, "DocumentUniqueId": ds.SOPInstanceUID}]}
        ],
    }


def test_rad69_undecodable_instance_is_a_registry_error_and_the_others_arrive_intact(held: Held) -> None:
    url = held.url("/xdsi/ImagingDocumentSource")
    client, service = zeep_client(IHE_WSDL, url)
    files = [held.ct, held.corrupt, held.jpeg]
    env = client.create_message(
        service, "ImagingDocumentSource_RetrieveImagingDocumentSet",
        StudyRequest=[_doc_request(f) for f in files], TransferSyntaxUIDList={"TransferSyntaxUID": [EXPLICIT]},
    )  # fmt: skip
    resp = post_raw(url, etree.tostring(env, xml_declaration=True, encoding="UTF-8"), action=ACTION_RAD69)
    assert resp.http.status_code == 200
    assert status_of(resp.body) == STATUS_PARTIAL_SUCCESS
    bad = dcmread(held.corrupt, stop_before_pixels=True).SOPInstanceUID
    errs = registry_errors(resp.body)
    assert [(e["errorCode"], e["location"]) for e in errs] == [(XDS_REPOSITORY_ERROR, bad)]
    docs = {d.findtext(IHE + "DocumentUniqueId"): resp.document(d.find(IHE + "Document")) for d in resp.body.iter(IHE + "DocumentResponse")}
    ct_uid, jpeg_uid = (dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in (held.ct, held.jpeg))
    assert set(docs) == {ct_uid, jpeg_uid}
    assert docs[ct_uid] == held.ct.read_bytes()  # stored in the requested syntax: the stored file, byte for byte
    out, src = dcmread(io.BytesIO(docs[jpeg_uid])), dcmread(held.jpeg)
    assert out.file_meta.TransferSyntaxUID == EXPLICIT and out.SOPInstanceUID == jpeg_uid
    assert np.array_equal(out.pixel_array, src.pixel_array)  # pydicom's RGB decode of the stored JPEG
    assert len(resp.attachments) == 2  # no attachment for the refused document, nothing cut
    assert not list((held.proc.data_dir / "tmp").glob("*.spool")), "spools are removed once sent"


def test_wado_rs_and_wado_uri_refuse_before_the_status_line(held: Held) -> None:
    r = requests.get(
        held.url(held.instance(held.corrupt)), headers={"Accept": f'multipart/related; type="application/dicom"; transfer-syntax={EXPLICIT}'}, timeout=30
    )
    assert r.status_code == 406 and "convert" in r.text and "299" in r.headers["Warning"]
    ds = dcmread(held.corrupt, stop_before_pixels=True)
    q = dict(requestType="WADO", studyUID=ds.StudyInstanceUID, seriesUID=ds.SeriesInstanceUID, objectUID=ds.SOPInstanceUID, contentType="application/dicom")
    r = requests.get(held.url("/wado"), params=q, timeout=30)
    assert r.status_code == 406 and "convert" in r.text
    r = requests.get(held.url("/wado"), params={**q, "transferSyntax": "1.2.840.10008.1.2.4.90"}, timeout=30)
    assert r.status_code == 200 and r.content == held.corrupt.read_bytes()
    r = requests.get(held.url(held.instance(held.corrupt) + "/frames/1"), headers={"Accept": 'multipart/related; type="application/octet-stream"'}, timeout=30)
    assert r.status_code == 406 and r.text.strip()
    # a converted instance is produced first and streamed with its length known
    r = requests.get(held.url("/wado"), params={**q, "objectUID": dcmread(held.jpeg).SOPInstanceUID, "seriesUID": dcmread(held.jpeg).SeriesInstanceUID, "studyUID": dcmread(held.jpeg).StudyInstanceUID}, timeout=30)
    assert r.status_code == 200 and int(r.headers["Content-Length"]) == len(r.content)
    assert np.array_equal(dcmread(io.BytesIO(r.content)).pixel_array, dcmread(held.jpeg).pixel_array)


def test_frames_of_a_colour_jpeg_as_viewers_ask_for_them(held: Held) -> None:
    src = dcmread(held.jpeg)
    client = DICOMwebClient(held.url("/dicomweb"))
    url = held.url(held.instance(held.jpeg) + "/frames/1")
    # what OHIF sends: the stored JPEG bitstream, labelled with its real media type and transfer syntax
    r = requests.get(url, headers={"Accept": 'multipart/related; type="application/octet-stream"; transfer-syntax=*'}, timeout=30)
    assert r.status_code == 200
    part_headers = r.content.split(b"\r\n\r\n", 1)[0].decode()
    assert "Content-Type: image/jpeg; transfer-syntax=1.2.840.10008.1.2.4.50" in part_headers
    parts = list(client._decode_multipart_message(r, stream=False))
    assert parts == [get_frame(src.PixelData, 0, number_of_frames=1)]
    assert parts[0][:2] == b"\xff\xd8"  # a JPEG stream, not decoded pixels
    # a native request: decoded, colour as RGB, equal to pydicom's decode
    native = client.retrieve_instance_frames(
        src.StudyInstanceUID, src.SeriesInstanceUID, src.SOPInstanceUID, frame_numbers=[1], media_types=(("application/octet-stream", EXPLICIT),)
    )
    assert native == [np.ascontiguousarray(src.pixel_array).tobytes()]
    # and the image media type of Table 8.7.3-5 itself
    r = requests.get(url, headers={"Accept": 'multipart/related; type="image/jpeg"'}, timeout=30)
    assert r.status_code == 200 and list(client._decode_multipart_message(r, stream=False)) == parts


def test_cors_preflight_and_headers_on_answers_and_errors(held: Held) -> None:
    inst = held.url(held.instance(held.jpeg) + "/frames/1")
    r = requests.options(
        inst, headers={"Origin": VIEWER, "Access-Control-Request-Method": "GET", "Access-Control-Request-Headers": "accept, authorization"}, timeout=30
    )
    assert r.status_code == 204
    assert r.headers["Access-Control-Allow-Origin"] == VIEWER
    allowed = {h.strip().lower() for h in r.headers["Access-Control-Allow-Headers"].split(",")}
    assert {"accept", "content-type", "authorization", "range"} <= allowed
    assert "GET" in r.headers["Access-Control-Allow-Methods"] and int(r.headers["Access-Control-Max-Age"]) > 0
    for path, status in [
        (held.instance(held.jpeg) + "/frames/1", 200),
        (held.instance(held.jpeg) + "/frames/9", 404),
        ("/dicomweb/studies/1.2.03", 400),
    ]:
        r = requests.get(held.url(path), headers={"Origin": VIEWER, "Accept": 'multipart/related; type="application/octet-stream"; transfer-syntax=*'}, timeout=30)
        assert r.status_code == status, path
        assert r.headers["Access-Control-Allow-Origin"] == VIEWER and "Origin" in r.headers["Vary"]
        assert "Warning" in r.headers["Access-Control-Expose-Headers"] and "Content-Range" in r.headers["Access-Control-Expose-Headers"]
    r = requests.get(held.url("/wado"), params={"requestType": "WADO"}, headers={"Origin": VIEWER}, timeout=30)
    assert r.status_code == 400 and r.headers["Access-Control-Allow-Origin"] == VIEWER
    # an origin not on the list gets no CORS headers; the browser withholds the answer
    r = requests.get(held.url("/dicomweb/studies/1.2.03"), headers={"Origin": "http://evil.example"}, timeout=30)
    assert "Access-Control-Allow-Origin" not in r.headers
    r = requests.options(inst, headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "GET"}, timeout=30)
    assert "Access-Control-Allow-Origin" not in r.headers and r.status_code == 405
