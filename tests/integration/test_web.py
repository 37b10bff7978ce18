"""WADO-URI, WADO-RS, QIDO-RS and STOW-RS against a real ``xdsi serve`` with a second partition.

DICOMweb is driven by ``dicomweb-client`` (PyPI), WADO-URI by plain HTTP
(``requests``), C-FIND by pynetdicom against the same process.
"""

from __future__ import annotations

import gzip
import io
import json
import uuid
from pathlib import Path
from typing import Iterator

import numpy as np
import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset
from pydicom.uid import RLELossless
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

from tests.support.stow import stow_raw
from tests.support.server import XdsiProcess, free_port
from xdsi.tools.synth import StudySpec, ct_instance, write_study
from xdsi.uids import new_uid

PARTITION = "RADIO"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[XdsiProcess]:
    base = tmp_path_factory.mktemp("web")
    part_port = free_port()
    cfg = base / "xdsi.toml"
    cfg.write_text(
        f"""
[partitions.radiology]
ae_title = "{PARTITION}"
dicom_port = {part_port}
[[partitions.radiology.tiers]]
name = "fast"
path = "fast"
"""
    )
    proc = XdsiProcess(base / "data", config=cfg).start()
    proc.partition_dicom_port = part_port  # type: ignore[attr-defined]
    try:
        yield proc
    finally:
        proc.stop()


def url(server: XdsiProcess, path: str) -> str:
    return f"http://{server.host}:{server.http_port}{path}"


def dicomweb(server: XdsiProcess, partition: str | None = None) -> DICOMwebClient:
    return DICOMwebClient(url(server, "/dicomweb" + (f"/{partition}" if partition else "")))


def c_find_studies(port: int, ae_title: str, patient_id: str) -> list[str]:
    ae = AE(ae_title="FINDSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", port, ae_title=ae_title)
    assert assoc.is_established
    ident = Dataset()
    ident.QueryRetrieveLevel = "STUDY"
    ident.PatientID = patient_id
    ident.StudyInstanceUID = ""
    out = []
    try:
        for status, ds in assoc.send_c_find(ident, StudyRootQueryRetrieveInformationModelFind):
            if status and status.Status in (0xFF00, 0xFF01) and ds is not None:
                out.append(str(ds.StudyInstanceUID))
    finally:
        assoc.release()
    return out


def _files(tmp_path: Path, spec: StudySpec, **kw: object) -> list[Path]:
    return write_study(tmp_path, spec, **kw)  # type: ignore[arg-type]


def test_stow_with_client_then_c_find_qido_and_byte_exact_wado(server: XdsiProcess, tmp_path: Path) -> None:
    spec = StudySpec(patient_id=f"P{uuid.uuid4().hex[:8]}", patient_name="MÜLLER^ANNA")
    paths = _files(tmp_path, spec, series=2, per_series=3)
    client = dicomweb(server)
    resp = client.store_instances([pydicom.dcmread(p) for p in paths])
    assert len(resp.ReferencedSOPSequence) == 6 and "FailedSOPSequence" not in resp
    assert resp.RetrieveURL.endswith(f"/studies/{spec.study_uid}")

    assert c_find_studies(server.dicom_port, server.ae_title, spec.patient_id) == [spec.study_uid]

    studies = client.search_for_studies(search_filters={"PatientID": spec.patient_id})
    assert len(studies) == 1
    st = Dataset.from_json(studies[0])
    assert st.StudyInstanceUID == spec.study_uid and st.NumberOfStudyRelatedInstances == 6
    assert str(st.PatientName) == "MÜLLER^ANNA" and st.ModalitiesInStudy == "CT"
    assert len(client.search_for_series(spec.study_uid)) == 2
    assert len(client.search_for_instances(spec.study_uid)) == 6
    assert len(client.search_for_instances(spec.study_uid, limit=2, offset=5)) == 1
    # fuzzy matching: a prefix of the given name, any case
    assert client.search_for_studies(search_filters={"PatientName": "ann"}, fuzzymatching=True)
    assert [
        s for s in client.search_for_studies(search_filters={"PatientName": "ann"}) if Dataset.from_json(s).PatientID == spec.patient_id
    ] == []
    # date range and tag-form keys
    hits = client.search_for_studies(search_filters={"00100020": spec.patient_id, "StudyDate": "20240101-20240131"})
    assert len(hits) == 1
    assert client.search_for_studies(search_filters={"PatientID": spec.patient_id, "StudyDate": "20250101-"}) == []

    # byte-exact: what the client sent is what WADO-RS returns (transfer-syntax=*) and what WADO-URI returns
    sent = pydicom.dcmread(paths[0])
    got = client.retrieve_instance(spec.study_uid, sent.SeriesInstanceUID, sent.SOPInstanceUID, media_types=(("application/dicom", "*"),))
    assert got.SOPInstanceUID == sent.SOPInstanceUID and got.PixelData == sent.PixelData
    assert len(client.retrieve_study(spec.study_uid)) == 6


def test_byte_exact_round_trip_stow_wado_rs_and_wado_uri(server: XdsiProcess, tmp_path: Path) -> None:
    spec = StudySpec(patient_id=f"P{uuid.uuid4().hex[:8]}")
    paths = _files(tmp_path, spec, per_series=2)
    raw = [p.read_bytes() for p in paths]
    r = stow_raw(server, raw, study=spec.study_uid)
    assert r.status_code == 200, r.text
    ds = pydicom.dcmread(paths[1])
    q = dict(requestType="WADO", studyUID=spec.study_uid, seriesUID=ds.SeriesInstanceUID, objectUID=ds.SOPInstanceUID)
    r = requests.get(url(server, "/wado"), params={**q, "contentType": "application/dicom"}, timeout=30)
    assert r.status_code == 200 and r.headers["Content-Type"] == "application/dicom"
    assert r.content == raw[1]
    client = dicomweb(server)
    r = requests.get(
        url(server, f"/dicomweb/studies/{spec.study_uid}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"),
        headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'},
        timeout=30,
    )
    parts = list(client._decode_multipart_message(r, stream=False))  # the client's own multipart decoder, raw parts
    assert parts == [raw[1]]
    # rendered: default image/jpeg, rows keep aspect
    r = requests.get(url(server, "/wado"), params={**q, "rows": "32", "annotation": "patient,technique"}, timeout=30)
    assert r.status_code == 200 and r.headers["Content-Type"] == "image/jpeg"
    from PIL import Image

    assert Image.open(io.BytesIO(r.content)).size == (32, 32)
    r = requests.get(url(server, "/wado"), params={**q, "contentType": "image/png", "region": "0,0,0.5,0.25"}, timeout=30)
    assert r.status_code == 200 and Image.open(io.BytesIO(r.content)).size == (32, 16)


def test_wado_uri_errors(server: XdsiProcess, tmp_path: Path) -> None:
    spec = StudySpec(patient_id=f"P{uuid.uuid4().hex[:8]}")
    paths = _files(tmp_path, spec, per_series=1)
    assert stow_raw(server, [paths[0].read_bytes()]).status_code == 200
    ds = pydicom.dcmread(paths[0])
    q = dict(requestType="WADO", studyUID=spec.study_uid, seriesUID=ds.SeriesInstanceUID, objectUID=ds.SOPInstanceUID)

    def get(**kw: str) -> requests.Response:
        return requests.get(url(server, "/wado"), params={**q, **kw}, timeout=30)

    for kw, reason in [
        (dict(requestType="WADOX"), "requestType"),
        (dict(objectUID="1.2.03"), "objectUID"),
        (dict(studyUID="../../etc"), "studyUID"),
        (dict(rows="abc"), "rows"),
        (dict(rows="0"), "rows"),
        (dict(windowCenter="40"), "window"),
        (dict(region="0.5,0,0.2,1"), "region"),
        (dict(frameNumber="2"), "frameNumber"),
        (dict(contentType="application/dicom", rows="10"), "rows"),
        (dict(contentType="application/dicom", transferSyntax="1.2.x"), "transferSyntax"),
        (dict(annotation="weather"), "annotation"),
    ]:
        r = get(**kw)
        assert r.status_code == 400, (kw, r.status_code, r.text)
        assert reason in r.text and "299" in r.headers["Warning"]
    r = get(objectUID=new_uid())
    assert r.status_code == 404
    r = get(contentType="application/pdf")
    assert r.status_code == 406 and "contentType" in r.text
    r = get(contentType="application/dicom", transferSyntax="1.2.840.10008.1.2.4.50")
    assert r.status_code == 406
    r = requests.get(url(server, "/wado/NOSUCHAE"), params=q, timeout=30)
    assert r.status_code == 404


def test_metadata_frames_bulkdata_and_transfer_syntaxes(server: XdsiProcess, tmp_path: Path) -> None:
    spec = StudySpec(patient_id=f"P{uuid.uuid4().hex[:8]}")
    series = new_uid()
    native = ct_instance(spec, series, 1, rows=16, columns=16)
    native.NumberOfFrames = 3
    frames = [np.full((16, 16), v, dtype=np.uint16) + np.arange(16, dtype=np.uint16) for v in (10, 2000, 4000)]
    native.PixelData = b"".join(f.tobytes() for f in frames)
    rle = ct_instance(spec, series, 2, rows=16, columns=16)
    rle_raw = rle.PixelData
    rle.compress(RLELossless)
    bufs = []
    for ds in (native, rle):
        b = io.BytesIO()
        ds.save_as(b, enforce_file_format=True)
        bufs.append(b.getvalue())
    assert stow_raw(server, bufs).status_code == 200
    client = dicomweb(server)

    md = client.retrieve_study_metadata(spec.study_uid)
    assert {Dataset.from_json(m).SOPInstanceUID for m in md} == {native.SOPInstanceUID, rle.SOPInstanceUID}
    bulk = [m["7FE00010"]["BulkDataURI"] for m in md]
    assert all(u.startswith(url(server, f"/dicomweb/studies/{spec.study_uid}/series/{series}/instances/")) for u in bulk)
    r = requests.get(url(server, f"/dicomweb/studies/{spec.study_uid}/metadata"), headers={"Accept-Encoding": "gzip"}, stream=True, timeout=30)
    assert r.headers["Content-Encoding"] == "gzip"
    assert len(json.loads(gzip.decompress(r.raw.read()))) == 2
    r = requests.get(url(server, f"/dicomweb/studies/{spec.study_uid}/metadata"), headers={"Accept": "application/dicom+xml"}, timeout=30)
    assert r.status_code == 406

    # native frames are the stored bytes; RLE frames decoded to native, or sent as stored
    got = client.retrieve_instance_frames(spec.study_uid, series, native.SOPInstanceUID, frame_numbers=[3, 1])
    assert got == [frames[2].tobytes(), frames[0].tobytes()]
    got = client.retrieve_instance_frames(spec.study_uid, series, rle.SOPInstanceUID, frame_numbers=[1])
    assert got == [rle_raw]
    stored = client.retrieve_instance_frames(
        spec.study_uid, series, rle.SOPInstanceUID, frame_numbers=[1], media_types=(("image/dicom-rle", RLELossless),)
    )
    assert stored == [pydicom.encaps.get_frame(rle.PixelData, 0, number_of_frames=1)]
    r = requests.get(url(server, f"/dicomweb/studies/{spec.study_uid}/series/{series}/instances/{native.SOPInstanceUID}/frames/4"), timeout=30)
    assert r.status_code == 404
    r = requests.get(url(server, f"/dicomweb/studies/{spec.study_uid}/series/{series}/instances/{native.SOPInstanceUID}/frames/x"), timeout=30)
    assert r.status_code == 400

    # bulk data with a byte range
    part = client.retrieve_bulkdata(bulk[[Dataset.from_json(m).SOPInstanceUID for m in md].index(native.SOPInstanceUID)], byte_range=(512, 1023))
    assert part == [native.PixelData[512:1024]]

    # the RLE instance asked in Explicit VR Little Endian (or with no transfer-syntax: the PS3.18 default) is
    # transcoded; with "*" (the client's default) it comes as stored
    inst = client.retrieve_instance(spec.study_uid, series, rle.SOPInstanceUID, media_types=(("application/dicom", "1.2.840.10008.1.2.1"),))
    assert inst.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1" and inst.PixelData == rle_raw
    r = requests.get(
        url(server, f"/dicomweb/studies/{spec.study_uid}/series/{series}/instances/{rle.SOPInstanceUID}"),
        headers={"Accept": 'multipart/related; type="application/dicom"'},
        timeout=30,
    )
    assert r.status_code == 200 and "transfer-syntax=1.2.840.10008.1.2.1" in r.text[:400]
    inst = client.retrieve_instance(spec.study_uid, series, rle.SOPInstanceUID, media_types=(("application/dicom", "*"),))
    assert inst.file_meta.TransferSyntaxUID == RLELossless
    r = requests.get(
        url(server, f"/dicomweb/studies/{spec.study_uid}/series/{series}/instances/{rle.SOPInstanceUID}"),
        headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.50'},
        timeout=30,
    )
    assert r.status_code == 406

    # rendered
    png = client.retrieve_instance_rendered(spec.study_uid, series, native.SOPInstanceUID, media_types=("image/png",))
    assert png.startswith(b"\x89PNG")


def test_stow_statuses_and_reasons(server: XdsiProcess, tmp_path: Path) -> None:
    spec = StudySpec(patient_id=f"P{uuid.uuid4().hex[:8]}")
    paths = _files(tmp_path, spec, per_series=2)
    good, other = paths[0].read_bytes(), paths[1].read_bytes()
    # mixed: one good instance, one garbage part -> 202 with a failed-SOP item and a reason
    r = stow_raw(server, [good, b"not dicom at all"])
    assert r.status_code == 202, r.text
    body = Dataset.from_json(r.json())
    assert len(body.ReferencedSOPSequence) == 1 and len(body.FailedSOPSequence) == 1
    assert body.FailedSOPSequence[0].FailureReason == 0xC000
    assert any("malformed" in w or "dataset" in w for w in r.headers.get("Warning", "").split(","))
    # all fail: wrong study for the target -> 409 with 0xA900
    r = stow_raw(server, [other], study=new_uid())
    assert r.status_code == 409
    body = Dataset.from_json(r.json())
    assert body.FailedSOPSequence[0].FailureReason == 0xA900
    assert body.FailedSOPSequence[0].ReferencedSOPInstanceUID == pydicom.dcmread(paths[1]).SOPInstanceUID
    # unsupported media type and bad requests
    r = stow_raw(server, [good], ctype="application/dicom+json")
    assert r.status_code == 415
    r = requests.post(url(server, "/dicomweb/studies"), data=good, headers={"Content-Type": "application/dicom"}, timeout=30)
    assert r.status_code == 415
    r = requests.post(url(server, "/dicomweb/studies"), data=b"garbage", headers={"Content-Type": "multipart/related; type=\"application/dicom\"; boundary=zz"}, timeout=30)
    assert r.status_code == 400
    r = stow_raw(server, [good], study="1.2.3.abc")
    assert r.status_code == 400 and "UID" in r.text
    # path UID validation on retrieve
    r = requests.get(url(server, "/dicomweb/studies/1.2.3.-4"), timeout=30)
    assert r.status_code == 400
    r = requests.get(url(server, f"/dicomweb/studies/{new_uid()}"), timeout=30)
    assert r.status_code == 404
    r = requests.get(url(server, "/dicomweb/studies"), params={"NoSuchKeyword": "x"}, timeout=30)
    assert r.status_code == 400
    r = requests.get(url(server, "/dicomweb/studies"), params={"StudyInstanceUID": "1.02"}, timeout=30)
    assert r.status_code == 400
    r = requests.get(url(server, "/dicomweb/studies"), headers={"Accept": "application/dicom+xml"}, timeout=30)
    assert r.status_code == 406


def test_partitions_are_isolated(server: XdsiProcess, tmp_path: Path) -> None:
    spec = StudySpec(patient_id=f"P{uuid.uuid4().hex[:8]}")
    paths = _files(tmp_path, spec, per_series=2)
    part = dicomweb(server, PARTITION)
    resp = part.store_instances([pydicom.dcmread(p) for p in paths])
    assert len(resp.ReferencedSOPSequence) == 2
    assf = f"/dicomweb/{PARTITION}/studies/{spec.study_uid}"
    assert resp.RetrieveURL == url(server, assf)

    assert len(part.search_for_studies(search_filters={"PatientID": spec.patient_id})) == 1
    main = dicomweb(server)
    assert main.search_for_studies(search_filters={"PatientID": spec.patient_id}) == []
    assert requests.get(url(server, f"/dicomweb/studies/{spec.study_uid}/metadata"), timeout=30).status_code == 404
    ds = pydicom.dcmread(paths[0])
    q = dict(requestType="WADO", studyUID=spec.study_uid, seriesUID=ds.SeriesInstanceUID, objectUID=ds.SOPInstanceUID, contentType="application/dicom")
    assert requests.get(url(server, "/wado"), params=q, timeout=30).status_code == 404
    r = requests.get(url(server, f"/wado/{PARTITION}"), params=q, timeout=30)
    assert r.status_code == 200 and pydicom.dcmread(io.BytesIO(r.content)).SOPInstanceUID == ds.SOPInstanceUID
    # the partition's own DICOM AE sees it; the main AE does not
    assert c_find_studies(server.partition_dicom_port, PARTITION, spec.patient_id) == [spec.study_uid]  # type: ignore[attr-defined]
    assert c_find_studies(server.dicom_port, server.ae_title, spec.patient_id) == []
    # and the bytes live in the partition's own tier
    assert list((server.data_dir / "partitions" / "radiology" / "fast" / spec.study_uid).rglob("*.dcm"))
    assert not (server.data_dir / "storage" / "cache" / spec.study_uid).exists()


def test_partition_reached_by_called_ae_title_on_the_main_port(server: XdsiProcess, tmp_path: Path) -> None:
    """One listener, several AE titles: the called AE title picks the partition."""
    from pydicom.uid import CTImageStorage

    spec = StudySpec(patient_id=f"P{uuid.uuid4().hex[:8]}")
    paths = _files(tmp_path, spec, per_series=2)
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", server.dicom_port, ae_title=PARTITION)
    assert assoc.is_established
    try:
        for p in paths:
            assert assoc.send_c_store(pydicom.dcmread(p)).Status == 0x0000
    finally:
        assoc.release()
    assert c_find_studies(server.dicom_port, PARTITION, spec.patient_id) == [spec.study_uid]
    assert c_find_studies(server.dicom_port, server.ae_title, spec.patient_id) == []
    assert c_find_studies(server.partition_dicom_port, PARTITION, spec.patient_id) == [spec.study_uid]  # type: ignore[attr-defined]
    assert len(dicomweb(server, PARTITION).search_for_studies(search_filters={"PatientID": spec.patient_id})) == 1
    assert dicomweb(server).search_for_studies(search_filters={"PatientID": spec.patient_id}) == []


def test_cors_is_off_by_default(server: XdsiProcess) -> None:
    """No [http] cors_origins: no CORS header on any answer, and a preflight is not answered."""
    origin = {"Origin": "http://viewer.example.org"}
    r = requests.options(url(server, "/dicomweb/studies"), headers={**origin, "Access-Control-Request-Method": "GET"}, timeout=30)
    assert r.status_code == 405 and not any(k.lower().startswith("access-control-") for k in r.headers)
    for path in ("/dicomweb/studies", "/dicomweb/studies/1.2.03", "/wado"):
        r = requests.get(url(server, path), headers=origin, timeout=30)
        assert not any(k.lower().startswith("access-control-") for k in r.headers), (path, r.headers)


def test_unquoted_media_type_parameters_are_read(server: XdsiProcess, tmp_path: Path) -> None:
    """``type=application/dicom`` and a boundary with '=' sent unquoted (as many peers do) work for STOW-RS and WADO-RS."""
    spec = StudySpec(patient_id=f"P{uuid.uuid4().hex[:8]}")
    (path,) = _files(tmp_path, spec, per_series=1)[:1]
    raw = path.read_bytes()
    boundary = "----=_Part_0_" + uuid.uuid4().hex
    body = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + raw + f"\r\n--{boundary}--\r\n".encode()
    r = requests.post(
        url(server, "/dicomweb/studies"),
        data=body,
        headers={"Content-Type": f"multipart/related; type=application/dicom; boundary={boundary}", "Accept": "application/dicom+json"},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    ds = pydicom.dcmread(path)
    r = requests.get(
        url(server, f"/dicomweb/studies/{spec.study_uid}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"),
        headers={"Accept": "multipart/related; type=application/dicom; transfer-syntax=*"},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    assert list(dicomweb(server)._decode_multipart_message(r, stream=False)) == [raw]


def test_whole_study_and_frames_are_sent_byte_exact_with_a_content_length(server: XdsiProcess, tmp_path: Path) -> None:
    """WADO-RS answers made of stored files (sent by sendfile on plain HTTP) carry an exact Content-Length and the stored bytes."""
    spec = StudySpec(patient_id=f"P{uuid.uuid4().hex[:8]}")
    paths = _files(tmp_path, spec, series=2, per_series=3)
    raw = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p.read_bytes() for p in paths}
    assert stow_raw(server, list(raw.values()), study=spec.study_uid).status_code == 200
    client = dicomweb(server)
    r = requests.get(url(server, f"/dicomweb/studies/{spec.study_uid}"),
                     headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}, timeout=30)  # fmt: skip
    assert r.status_code == 200 and "Transfer-Encoding" not in r.headers
    assert int(r.headers["Content-Length"]) == len(r.content)
    parts = list(client._decode_multipart_message(r, stream=False))
    assert sorted(parts) == sorted(raw.values())
    # HEAD: the same length, no body
    h = requests.head(r.url, headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}, timeout=30)
    assert h.status_code == 200 and h.headers["Content-Length"] == r.headers["Content-Length"] and h.content == b""
    # a frame: the stored pixel bytes, pydicom's own reading of the original
    ds = pydicom.dcmread(paths[4])
    r = requests.get(url(server, f"/dicomweb/studies/{spec.study_uid}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}/frames/1"),
                     headers={"Accept": 'multipart/related; type="application/octet-stream"; transfer-syntax=*'}, timeout=30)  # fmt: skip
    assert r.status_code == 200 and int(r.headers["Content-Length"]) == len(r.content)
    assert list(client._decode_multipart_message(r, stream=False)) == [ds.PixelData]
    assert np.array_equal(np.frombuffer(ds.PixelData, dtype="<u2").reshape(ds.Rows, ds.Columns), ds.pixel_array)
    # an instance under the wrong series is not found, by the one-query lookup as before
    other = pydicom.dcmread(paths[0])
    if other.SeriesInstanceUID != ds.SeriesInstanceUID:
        r = requests.get(url(server, f"/dicomweb/studies/{spec.study_uid}/series/{other.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}/frames/1"),
                         headers={"Accept": 'multipart/related; type="application/octet-stream"'}, timeout=30)  # fmt: skip
        assert r.status_code == 404
