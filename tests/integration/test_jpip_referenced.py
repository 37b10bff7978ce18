"""JPIP Referenced (.94 / .95) on every retrieve path of a real ``xdsi serve`` (issue 16 part 3).

The study: two synthetic 512x512 CT images (Explicit VR LE, encoded as JPEG
2000 on demand by the JPIP server), pydicom's JPEG 2000 lossless MR (its
stored codestream is what JPIP serves) and pydicom's YBR JPEG colour image
(never offered: PS3.5 A.6 allows no RGB/YBR_FULL header, and its codestream
would be made on demand).  Requesters that are not our code ask for the
JPIP Referenced syntaxes:

* C-GET from pynetdicom (one context per class, and JPIP plus Explicit VR LE
  in separate contexts so a colour image has somewhere to go);
* C-MOVE to a pynetdicom Storage SCP that accepts only JPIP Referenced for CT
  and MR (and Explicit VR LE for the colour image);
* WADO-RS with ``transfer-syntax=1.2.840.10008.1.2.4.94``;
* RAD-69 built by zeep from the IHE WSDL.

Each header must carry Pixel Data Provider URL ``<public_url>/jpip?target=<SOP
Instance UID>``, no Pixel Data, and the original's image attributes.  A
second server without ``[server] public_url`` must never offer the syntax.
The URL is fetched end to end (JPP-stream decoded by OpenJPEG's own
``opj_jpip_transcode`` and compared with pydicom's decode of the original).
"""

from __future__ import annotations

import io
import shutil
import subprocess
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest
import requests
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.filereader import _read_file_meta_info, read_dataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    SecondaryCaptureImageStorage,
)
from pynetdicom import AE
from requests_toolbelt.multipart import decoder

from tests.support.ids import IHE_WSDL, retrieve_study, zeep_client
from tests.support.retrieve_clients import GetResult, RecordingStorage, c_get_study, c_move_study
from tests.support.server import XdsiProcess
from xdsi.jpip.urls import JPIP_REFERENCED, JPIP_REFERENCED_DEFLATE, parse_target, provider_url
from xdsi.tools.synth import StudySpec, write_study
from xdsi.standards.constants import STATUS_FAILURE, STATUS_PARTIAL_SUCCESS, STATUS_SUCCESS
from xdsi.uids import new_uid

TIMEOUT = 30
REPOSITORY = "1.3.6.1.4.1.21367.13.70.1"
DEST = "JPIPDEST"


@dataclass(frozen=True)
class Item:
    path: Path
    sop_uid: str
    series_uid: str
    sop_class: str
    offered: bool  # a JPIP Referenced header is produced for it


@dataclass
class Study:
    uid: str
    items: list[Item]

    def by_sop(self) -> dict[str, Item]:
        return {i.sop_uid: i for i in self.items}


def _item(path: Path, offered: bool) -> Item:
    ds = dcmread(path, stop_before_pixels=True)
    return Item(path, str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPClassUID), offered)


def _adopt(src: Path, out: Path, spec: StudySpec) -> Path:
    """A pydicom test file in our study: same patient, new series and instance UIDs, its stored syntax kept."""
    ds = dcmread(src)
    ds.PatientID, ds.PatientName, ds.IssuerOfPatientID = spec.patient_id, spec.patient_name, spec.issuer
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = spec.study_uid, new_uid(), new_uid()
    ds.AccessionNumber = spec.accession
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(out, enforce_file_format=True)
    return out


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Study:
    root = tmp_path_factory.mktemp("jpipref-study")
    spec = StudySpec(patient_id="JPIPREF1", accession="JPIPACC1")
    ct = write_study(root / "ct", spec, series=1, per_series=2, rows=512, columns=512)
    mr = _adopt(Path(get_testdata_file("MR_small_jp2klossless.dcm")), root / "mr-j2k.dcm", spec)
    colour = _adopt(Path(get_testdata_file("SC_rgb_dcmtk_+eb+cy+s2.dcm")), root / "sc-ybr-jpeg.dcm", spec)
    items = [_item(p, True) for p in ct] + [_item(mr, True), _item(colour, False)]
    return Study(spec.study_uid, items)


def _load(server: XdsiProcess, study: Study) -> None:
    ae = AE(ae_title="LOADER")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = TIMEOUT
    pairs = sorted({(i.sop_class, str(dcmread(i.path, stop_before_pixels=True).file_meta.TransferSyntaxUID)) for i in study.items})
    for sop_class, ts in pairs:
        ae.add_requested_context(sop_class, [ts])
    assoc = ae.associate(server.host, server.dicom_port, ae_title=server.ae_title)
    assert assoc.is_established
    try:
        for i in study.items:
            assert assoc.send_c_store(i.path).Status == 0x0000
    finally:
        assoc.release()


def _config(path: Path, *, public_url: str | None, dest_port: int) -> Path:
    lines = ["[server]"]
    if public_url:
        lines.append(f'public_url = "{public_url}"')
    lines += ["", f"[peers.{DEST}]", 'host = "127.0.0.1"', f"port = {dest_port}", ""]
    # the JPIP server answers the URL; the test reads its answer with OpenJPEG's JPIP client, which wants
    # tile headers in OpenJPEG's own form
    lines += ["[jpip]", "enabled = true", "openjpeg_tile_headers = true", ""]
    path.write_text("\n".join(lines))
    return path


@pytest.fixture(scope="module")
def destination() -> Iterator[RecordingStorage]:
    """JPIP Referenced only for CT and MR, Explicit VR LE for the colour image."""
    d = RecordingStorage(DEST, [(CTImageStorage, [JPIP_REFERENCED]), (MRImageStorage, [JPIP_REFERENCED_DEFLATE]),
                                (SecondaryCaptureImageStorage, [ExplicitVRLittleEndian])])
    try:
        yield d
    finally:
        d.stop()


@dataclass
class Served:
    proc: XdsiProcess
    public_url: str

    @property
    def ids_url(self) -> str:
        return f"http://127.0.0.1:{self.proc.http_port}/xdsi/ImagingDocumentSource"


def _serve(root: Path, study: Study, destination: RecordingStorage, public: bool) -> XdsiProcess:
    proc = XdsiProcess(root / "data", env={"XDSI_REPOSITORY_UNIQUE_ID": REPOSITORY}, workers=1)
    public_url = f"http://127.0.0.1:{proc.http_port}" if public else None
    proc.config = _config(root / "xdsi.toml", public_url=public_url, dest_port=destination.port)
    proc.start()
    try:
        _load(proc, study)
    except BaseException:
        proc.stop()
        raise
    return proc


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, study: Study, destination: RecordingStorage) -> Iterator[Served]:
    proc = _serve(tmp_path_factory.mktemp("jpipref-served"), study, destination, public=True)
    try:
        yield Served(proc, f"http://127.0.0.1:{proc.http_port}")
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def unpublished(tmp_path_factory: pytest.TempPathFactory, study: Study, destination: RecordingStorage) -> Iterator[XdsiProcess]:
    """The same study on a server without [server] public_url."""
    proc = _serve(tmp_path_factory.mktemp("jpipref-nourl"), study, destination, public=False)
    try:
        yield proc
    finally:
        proc.stop()


# -- checks --------------------------------------------------------------------------------------------------


def header_of(ts: str, raw: bytes) -> Dataset:
    """A data set received in a JPIP Referenced syntax, read by pydicom (.95 inflated first: RFC 1951 raw deflate)."""
    if ts == JPIP_REFERENCED_DEFLATE:
        raw = zlib.decompress(raw, -zlib.MAX_WBITS)
    return read_dataset(io.BytesIO(raw), is_implicit_VR=False, is_little_endian=True)


def check_header(ds: Dataset, item: Item, public_url: str) -> None:
    """What PS3.5 A.6 and PS3.3 C.7.6.3 ask, and the URL form shared with the JPIP server."""
    original = dcmread(item.path, stop_before_pixels=True)
    assert ds.SOPInstanceUID == item.sop_uid and ds.SOPClassUID == item.sop_class
    assert ds.StudyInstanceUID == original.StudyInstanceUID and ds.PatientID == original.PatientID
    assert "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds
    assert ds["PixelDataProviderURL"].VR == "UR"
    url = str(ds.PixelDataProviderURL)
    assert url == provider_url(public_url, item.sop_uid)
    parts = urlsplit(url)
    assert f"{parts.scheme}://{parts.netloc}" == public_url and parts.path == "/jpip"
    assert parse_target(parse_qs(parts.query)["target"][0]) == item.sop_uid
    for kw in ("Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation", "SamplesPerPixel"):
        assert ds[kw].value == original[kw].value, kw
    assert ds.PhotometricInterpretation in ("MONOCHROME1", "MONOCHROME2", "YBR_ICT", "YBR_RCT")
    assert ds.get("NumberOfFrames") == original.get("NumberOfFrames")


def pixels_of(ds_or_bytes: Any) -> np.ndarray:
    ds = dcmread(io.BytesIO(ds_or_bytes)) if isinstance(ds_or_bytes, bytes) else ds_or_bytes
    return ds.pixel_array


# -- C-GET ---------------------------------------------------------------------------------------------------


CLASSES = (CTImageStorage, MRImageStorage, SecondaryCaptureImageStorage)


def _failed(result: GetResult) -> set[str]:
    uids = result.identifier.get("FailedSOPInstanceUIDList", []) if result.identifier is not None else []
    return {str(u) for u in ([uids] if isinstance(uids, str) else uids)}


@pytest.mark.parametrize("syntax", [JPIP_REFERENCED, JPIP_REFERENCED_DEFLATE])
def test_c_get_accepting_only_jpip_gets_headers(served: Served, study: Study, syntax: str) -> None:
    got = c_get_study(served.proc, [(c, [syntax]) for c in CLASSES], study.uid)
    offered = [i for i in study.items if i.offered]
    assert sorted(got.received) == sorted(i.sop_uid for i in offered)
    for item in offered:
        ts, raw = got.received[item.sop_uid]
        assert ts == syntax
        check_header(header_of(ts, raw), item, served.public_url)
    # the colour image cannot be referenced: a failed sub-operation, listed (PS3.4 C.4.3.3.1), never a bad header
    assert _failed(got) == {i.sop_uid for i in study.items if not i.offered}
    assert got.final.Status == 0xB000


def test_c_get_with_jpip_and_explicit_contexts_sends_pixels_where_jpip_cannot_go(served: Served, study: Study) -> None:
    contexts = [(c, [JPIP_REFERENCED]) for c in CLASSES] + [(c, [ExplicitVRLittleEndian]) for c in CLASSES]
    got = c_get_study(served.proc, contexts, study.uid)
    assert got.final.Status == 0x0000 and sorted(got.received) == sorted(i.sop_uid for i in study.items)
    for item in study.items:
        ts, raw = got.received[item.sop_uid]
        if item.offered:
            assert ts == JPIP_REFERENCED
            check_header(header_of(ts, raw), item, served.public_url)
        else:
            assert ts == ExplicitVRLittleEndian
            ds = read_dataset(io.BytesIO(raw), is_implicit_VR=False, is_little_endian=True)
            ds.file_meta = Dataset()
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            assert np.array_equal(ds.pixel_array, dcmread(item.path).pixel_array)


def test_a_peer_cannot_store_a_jpip_referenced_data_set(served: Served, study: Study) -> None:
    """Storage contexts (we are SCP) never accept JPIP Referenced: the archive keeps no instance without its pixels."""
    ae = AE(ae_title="STORER")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = TIMEOUT
    ae.add_requested_context(CTImageStorage, [JPIP_REFERENCED])
    ae.add_requested_context(MRImageStorage, [JPIP_REFERENCED, ExplicitVRLittleEndian])
    assoc = ae.associate(served.proc.host, served.proc.dicom_port, ae_title=served.proc.ae_title)
    assert assoc.is_established
    try:
        by_class = {str(cx.abstract_syntax): str(cx.transfer_syntax[0]) for cx in assoc.accepted_contexts}
        assert CTImageStorage not in by_class
        assert by_class[MRImageStorage] == ExplicitVRLittleEndian
    finally:
        assoc.release()


# -- C-MOVE --------------------------------------------------------------------------------------------------


def test_c_move_to_a_destination_accepting_only_jpip(served: Served, study: Study, destination: RecordingStorage) -> None:
    destination.received.clear()
    responses = c_move_study(served.proc, study.uid, DEST)
    assert responses[-1][0].Status == 0x0000, responses[-1]
    assert sorted(destination.received) == sorted(i.sop_uid for i in study.items)
    for item in study.items:
        ts, raw = destination.received[item.sop_uid]
        if item.sop_class == CTImageStorage:
            assert ts == JPIP_REFERENCED
        elif item.sop_class == MRImageStorage:
            assert ts == JPIP_REFERENCED_DEFLATE
        else:
            assert ts == ExplicitVRLittleEndian
            continue
        check_header(header_of(ts, raw), item, served.public_url)


# -- WADO-RS -------------------------------------------------------------------------------------------------


def wado_rs(base: str, item: Item, study_uid: str, syntax: str) -> requests.Response:
    url = f"{base}/dicomweb/studies/{study_uid}/series/{item.series_uid}/instances/{item.sop_uid}"
    return requests.get(url, headers={"Accept": f'multipart/related; type="application/dicom"; transfer-syntax={syntax}'}, timeout=TIMEOUT)


@pytest.mark.parametrize("syntax", [JPIP_REFERENCED, JPIP_REFERENCED_DEFLATE])
def test_wado_rs_transfer_syntax_jpip(served: Served, study: Study, syntax: str) -> None:
    base = f"http://127.0.0.1:{served.proc.http_port}"
    for item in study.items:
        r = wado_rs(base, item, study.uid, syntax)
        if not item.offered:
            assert r.status_code == 406, r.text[:500]
            continue
        assert r.status_code == 200, r.text[:500]
        (part,) = decoder.MultipartDecoder.from_response(r).parts
        assert part.headers[b"Content-Type"].decode() == f"application/dicom; transfer-syntax={syntax}"
        data = part.content
        meta_end = 144 + int.from_bytes(data[140:144], "little")
        assert _read_file_meta_info(io.BytesIO(data[132:])).TransferSyntaxUID == syntax
        check_header(header_of(syntax, data[meta_end:]), item, served.public_url)


# -- RAD-69 --------------------------------------------------------------------------------------------------


def rad69(ids_url: str, study: Study, syntaxes: list[str]) -> Any:
    client, service = zeep_client(IHE_WSDL, ids_url)
    return retrieve_study(service, study.uid, [(i.series_uid, i.sop_uid) for i in study.items], REPOSITORY, syntaxes)


def test_rad69_jpip_referenced(served: Served, study: Study) -> None:
    res = rad69(served.ids_url, study, [JPIP_REFERENCED])
    assert res.RegistryResponse.status == STATUS_PARTIAL_SUCCESS
    docs = {d.DocumentUniqueId: d for d in res.DocumentResponse}
    assert sorted(docs) == sorted(i.sop_uid for i in study.items if i.offered)
    for item in study.items:
        if not item.offered:
            errors = res.RegistryResponse.RegistryErrorList.RegistryError
            assert [e.location for e in errors] == [item.sop_uid]
            continue
        d = docs[item.sop_uid]
        assert d.mimeType == "application/dicom"
        ds = dcmread(io.BytesIO(d.Document))
        assert ds.file_meta.TransferSyntaxUID == JPIP_REFERENCED
        check_header(ds, item, served.public_url)


def test_rad69_jpip_then_explicit_gives_pixels_for_the_rest(served: Served, study: Study) -> None:
    res = rad69(served.ids_url, study, [JPIP_REFERENCED, ExplicitVRLittleEndian])
    assert res.RegistryResponse.status == STATUS_SUCCESS
    docs = {d.DocumentUniqueId: dcmread(io.BytesIO(d.Document)) for d in res.DocumentResponse}
    for item in study.items:
        ds = docs[item.sop_uid]
        if item.offered:
            assert ds.file_meta.TransferSyntaxUID == JPIP_REFERENCED
            check_header(ds, item, served.public_url)
        else:
            assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
            assert np.array_equal(ds.pixel_array, dcmread(item.path).pixel_array)


# -- no public URL: never offered ----------------------------------------------------------------------------


def test_without_public_url_jpip_is_never_offered(unpublished: XdsiProcess, study: Study) -> None:
    # C-GET: the JPIP-only contexts are refused, so nothing can be sent on them
    got = c_get_study(unpublished, [(c, [JPIP_REFERENCED]) for c in CLASSES], study.uid)
    assert got.received == {}
    assert _failed(got) == {i.sop_uid for i in study.items}
    # ... and with Explicit VR LE beside it, pixels for everything
    got = c_get_study(unpublished, [(c, [JPIP_REFERENCED]) for c in CLASSES] + [(c, [ExplicitVRLittleEndian]) for c in CLASSES], study.uid)
    assert {ts for ts, _ in got.received.values()} == {ExplicitVRLittleEndian}
    assert len(got.received) == len(study.items)
    # WADO-RS: 406; RAD-69: a RegistryError per instance
    item = study.items[0]
    assert wado_rs(f"http://127.0.0.1:{unpublished.http_port}", item, study.uid, JPIP_REFERENCED).status_code == 406
    res = rad69(f"http://127.0.0.1:{unpublished.http_port}/xdsi/ImagingDocumentSource", study, [JPIP_REFERENCED])
    assert res.RegistryResponse.status == STATUS_FAILURE
    assert not res.DocumentResponse


# -- end to end: the URL answers with the image ---------------------------------------------------------------


@pytest.mark.skipif(shutil.which("/usr/bin/opj_jpip_transcode") is None, reason="OpenJPEG's JPIP tools (libopenjpip-dec-server) are not installed")
def test_provider_url_serves_the_image(served: Served, study: Study, tmp_path: Path) -> None:
    """The header's URL, asked for the whole image as a JPP-stream, decodes (OpenJPEG) to pydicom's decode of the original."""
    import imagecodecs

    got = c_get_study(served.proc, [(c, [JPIP_REFERENCED]) for c in CLASSES], study.uid)
    for item in (i for i in study.items if i.offered):
        ds = header_of(*got.received[item.sop_uid])
        url = f"{ds.PixelDataProviderURL}&fsiz={int(ds.Columns)},{int(ds.Rows)}&type=jpp-stream"
        r = requests.get(url, timeout=TIMEOUT)
        assert r.status_code == 200, r.text[:500]
        assert r.headers["Content-Type"].startswith("image/jpp-stream")
        jpp, j2k = tmp_path / f"{item.sop_uid}.jpp", tmp_path / f"{item.sop_uid}.j2k"
        jpp.write_bytes(r.content)
        subprocess.run(["/usr/bin/opj_jpip_transcode", str(jpp), str(j2k)], check=True, capture_output=True, timeout=TIMEOUT)
        decoded = imagecodecs.jpeg2k_decode(j2k.read_bytes())
        original = dcmread(item.path).pixel_array
        assert np.array_equal(decoded.astype(original.dtype), original), f"{item.sop_uid}: JPIP pixels differ from the original"

