"""Every retrieve path on a compressing tier, against a real ``xdsi serve`` (issue 16).

The study (a CT, an MR with 12 bits in 16, an RGB image, a 12-bit multi-frame
image and an SR) is stored, then ``xdsi migrate`` moves it onto a tier with
``compress = "htj2k-lossless"`` (recall off, so every answer is read from that
tier).  C-GET (pynetdicom requester), WADO-RS (dicomweb-client's decoder) and
RAD-69 (zeep from the IHE WSDL, MTOM decoded by requests_toolbelt) then get
the stored HTJ2K file unchanged when they accept it, and a conversion when
they ask for Explicit VR Little Endian; pixels always equal pydicom's decoding
of what was sent in.  ``xdsi status`` reports the bytes the tier saves.
"""

from __future__ import annotations

import io
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from lxml import etree
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.pixels import pixel_array
from pydicom.uid import BasicTextSRStorage, ExplicitVRLittleEndian, HTJ2KLosslessRPCL
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet

from tests.support.ids import IHE_WSDL, NIST_REPOSITORY, post_raw, status_of, zeep_client
from tests.support.server import XdsiProcess
from tests.support.environ import environ_with
from tests.unit.test_tier_compress import study_files
from xdsi.standards.constants import ACTION_RAD69, NS_XDS, STATUS_SUCCESS

IHE = f"{{{NS_XDS}}}"
TIMEOUT = 30


@dataclass
class Held:
    proc: XdsiProcess
    files: dict[str, Path]
    study_uid: str
    status: str

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.proc.http_port}{path}"

    def sop(self, name: str) -> str:
        return str(dcmread(self.files[name], stop_before_pixels=True).SOPInstanceUID)


@pytest.fixture(scope="module")
def held(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Held]:
    tmp = tmp_path_factory.mktemp("tiercompress")
    files = {k: v for k, v in study_files(tmp / "in").items() if k != "rle"}
    data = tmp / "data"
    cfg = tmp / "xdsi.toml"
    cfg.write_text(
        "[storage]\nrecall_on_read = false\n"
        f'[[storage.tiers]]\nname = "cache"\npath = "{tmp / "cache"}"\nmigrate_after_days = 0\n'
        f'[[storage.tiers]]\nname = "archive"\npath = "{tmp / "archive"}"\ncompress = "htj2k-lossless"\n'
    )
    env = environ_with(XDSI_REPOSITORY_UNIQUE_ID=NIST_REPOSITORY)

    def xdsi(*args: str) -> str:
        r = subprocess.run([sys.executable, "-m", "xdsi", *args, "--data-dir", str(data), "--config", str(cfg)],
                           capture_output=True, text=True, timeout=120, env=env)
        assert r.returncode == 0, r.stdout + r.stderr
        return r.stdout

    xdsi("import", *map(str, files.values()))
    migrated = xdsi("migrate")
    assert "compressed 4 file(s)" in migrated and "unchanged 1 file(s): no pixel data" in migrated, migrated
    status = xdsi("status")
    assert not list((tmp / "cache").rglob("*.dcm"))
    proc = XdsiProcess(data, config=cfg, env={"XDSI_REPOSITORY_UNIQUE_ID": NIST_REPOSITORY}).start()
    try:
        yield Held(proc, files, str(dcmread(files["ct"], stop_before_pixels=True).StudyInstanceUID), status)
    finally:
        proc.stop()


def _same_pixels(got: Dataset, sent: Path) -> None:
    want = dcmread(sent)
    assert got.SOPInstanceUID == want.SOPInstanceUID
    assert np.array_equal(got.pixel_array, want.pixel_array)


def test_status_shows_the_bytes_saved(held: Held) -> None:
    line = next(ln for ln in held.status.splitlines() if "stored compressed" in ln)
    assert "compress htj2k-lossless: 4 file(s) stored compressed" in line and "saved" in line
    r = requests.get(held.url("/status"), timeout=TIMEOUT).json()
    sizes = sum(p.stat().st_size for k, p in held.files.items() if k != "sr")
    assert r["tiers"]["archive"]["compressed_files"] == 4
    assert 0 < r["tiers"]["archive"]["bytes_saved"] < sizes


def _c_get(held: Held, syntaxes: list[str]) -> dict[str, tuple[str, Dataset]]:
    got: dict[str, tuple[str, Dataset]] = {}

    def on_store(event: Any) -> int:
        ds = dcmread(io.BytesIO(event.encoded_dataset(include_meta=True)))
        got[str(ds.SOPInstanceUID)] = (str(event.context.transfer_syntax), ds)
        return 0x0000

    classes = sorted({str(dcmread(p, stop_before_pixels=True).SOPClassUID) for p in held.files.values()})
    ae = AE(ae_title="GETTER")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = TIMEOUT
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    for c in classes:  # a report is not an image: a requester offers it the native syntaxes
        ae.add_requested_context(c, [ExplicitVRLittleEndian] if c == BasicTextSRStorage else syntaxes)
    assoc = ae.associate(held.proc.host, held.proc.dicom_port, ae_title="XDSI", ext_neg=[build_role(c, scp_role=True) for c in classes],
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    q = Dataset()
    q.QueryRetrieveLevel, q.StudyInstanceUID = "STUDY", held.study_uid
    try:
        final = list(assoc.send_c_get(q, StudyRootQueryRetrieveInformationModelGet))[-1][0]
    finally:
        assoc.release()
    assert final.Status == 0x0000 and final.NumberOfCompletedSuboperations == len(held.files)
    return got


def test_c_get_stored_htj2k_or_converted(held: Held) -> None:
    stored = _c_get(held, [HTJ2KLosslessRPCL, ExplicitVRLittleEndian])
    native = _c_get(held, [ExplicitVRLittleEndian])
    for name, path in held.files.items():
        uid = held.sop(name)
        ts, ds = stored[uid]
        assert ts == (ExplicitVRLittleEndian if name == "sr" else HTJ2KLosslessRPCL)
        ts2, ds2 = native[uid]
        assert ts2 == ExplicitVRLittleEndian
        if name != "sr":
            _same_pixels(ds, path)
            _same_pixels(ds2, path)
            assert np.array_equal(pixel_array(ds, raw=True), pixel_array(dcmread(path), raw=True))


def test_wado_rs_stored_or_converted(held: Held) -> None:
    from requests_toolbelt.multipart.decoder import MultipartDecoder

    for ts in (HTJ2KLosslessRPCL, ExplicitVRLittleEndian):
        for name in ("ct", "rgb", "mf12"):
            ds = dcmread(held.files[name], stop_before_pixels=True)
            r = requests.get(
                held.url(f"/dicomweb/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"),
                headers={"Accept": f'multipart/related; type="application/dicom"; transfer-syntax={ts}'}, timeout=TIMEOUT,
            )
            assert r.status_code == 200, r.text
            (part,) = MultipartDecoder(r.content, r.headers["Content-Type"]).parts
            assert f"transfer-syntax={ts}" in part.headers[b"Content-Type"].decode()
            got = dcmread(io.BytesIO(part.content))
            assert got.file_meta.TransferSyntaxUID == ts
            _same_pixels(got, held.files[name])
    # the metadata is rebuilt from the compressed file (its checksum changed): Pixel Data is encapsulated, OB
    client = DICOMwebClient(held.url("/dicomweb"))
    meta = client.retrieve_instance_metadata(held.study_uid, str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
    assert meta["7FE00010"]["vr"] == "OB" and meta["00280100"]["Value"] == [16]


def test_rad69_stored_or_converted(held: Held) -> None:
    url = held.url("/xdsi/ImagingDocumentSource")
    client, service = zeep_client(IHE_WSDL, url)
    names = ("ct", "mr", "rgb")
    for ts in (HTJ2KLosslessRPCL, ExplicitVRLittleEndian):
        series: dict[str, list[dict[str, str]]] = {}
        for n in names:
            ds = dcmread(held.files[n], stop_before_pixels=True)
            series.setdefault(str(ds.SeriesInstanceUID), []).append({"RepositoryUniqueId": NIST_REPOSITORY, "DocumentUniqueId": str(ds.SOPInstanceUID)})
        req = [{"studyInstanceUID": held.study_uid, "SeriesRequest": [{"seriesInstanceUID": s, "DocumentRequest": d} for s, d in series.items()]}]
        env = client.create_message(service, "ImagingDocumentSource_RetrieveImagingDocumentSet", StudyRequest=req,
                                    TransferSyntaxUIDList={"TransferSyntaxUID": [ts]})
        resp = post_raw(url, etree.tostring(env, xml_declaration=True, encoding="UTF-8"), action=ACTION_RAD69)
        assert resp.http.status_code == 200 and status_of(resp.body) == STATUS_SUCCESS
        docs = {d.findtext(IHE + "DocumentUniqueId"): resp.document(d.find(IHE + "Document")) for d in resp.body.iter(IHE + "DocumentResponse")}
        assert set(docs) == {held.sop(n) for n in names}
        for n in names:
            got = dcmread(io.BytesIO(docs[held.sop(n)]))
            assert got.file_meta.TransferSyntaxUID == ts
            _same_pixels(got, held.files[n])
