"""WADO-RS frames as HTJ2K (issue 16 part 4) against a real ``xdsi serve``: converted on the fly or as stored, with HTTP Range.

Every pixel check compares with pydicom's own decoding of the original file.
Progressive retrieval is checked with a decoder that is not ours: Debian's
OpenJPEG (``opj_decompress -r``) decodes the first bytes of an HTJ2K RPCL
frame, fetched by Range up to the end of a resolution level's tile-part (the
TLM marker in the main header says where), to exactly what it gets from the
whole frame at that reduction.  Stored-HTJ2K instances are encoded here with
imagecodecs (OpenJPH), a peer encoder, as a modality or another archive would
send them.
"""

from __future__ import annotations

import struct
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import requests
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, get_frame
from pydicom.pixels import pixel_array
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, UID

from tests.support.stow import stow_raw
from tests.support.server import XdsiProcess
from xdsi.tools.synth import StudySpec, ct_instance
from xdsi.uids import new_uid

HTJ2K_LOSSLESS = "1.2.840.10008.1.2.4.201"
HTJ2K_RPCL = "1.2.840.10008.1.2.4.202"
HTJ2K = "1.2.840.10008.1.2.4.203"
OPJ_DECOMPRESS = "/usr/bin/opj_decompress"


def _htj2k_encoder_registered() -> bool:
    from pydicom.pixels import get_encoder

    try:
        import xdsi.archive.htj2k  # noqa: F401  (j2ktier's plugin registers itself on import)
    except ImportError:
        return False
    try:
        return bool(get_encoder(HTJ2K_RPCL).is_available)
    except (NotImplementedError, ValueError):
        return False


needs_htj2k_encoder = pytest.mark.skipif(not _htj2k_encoder_registered(), reason="xdsi.archive.htj2k (j2ktier) is not merged yet")


# -- the objects ------------------------------------------------------------------------------------

def phantom(rows: int = 512, columns: int = 512, seed: int = 1) -> np.ndarray:
    """A CT-like slice in HU-offset units (int16): air, a body ellipse, a bone ring, organs and noise.

    Smooth regions and edges like a real slice, so HTJ2K compresses it as it
    would a CT and its low resolution levels are a small part of the frame.
    """
    y, x = np.mgrid[0:rows, 0:columns].astype(np.float64)
    cy, cx = rows / 2, columns / 2
    img = np.full((rows, columns), -1000.0)
    body = ((x - cx) / (0.42 * columns)) ** 2 + ((y - cy) / (0.34 * rows)) ** 2 <= 1
    img[body] = 40
    ring = np.abs(np.hypot(x - cx, y - cy) - 0.2 * rows) < 0.02 * rows
    img[ring & body] = 900
    for ox, oy, r, v in ((-0.15, -0.05, 0.08, -850), (0.15, -0.05, 0.08, -850), (0.0, 0.12, 0.05, 60)):
        img[np.hypot(x - cx - ox * columns, y - cy - oy * rows) < r * rows] = v
    img += np.random.default_rng(seed).normal(0, 12, img.shape)
    return np.clip(img, -1024, 3071).astype(np.int16)


def ct_dataset(study: StudySpec, series: str, number: int, pixels: np.ndarray) -> Dataset:
    ds = ct_instance(study, series, number, rows=pixels.shape[0], columns=pixels.shape[1])
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = 0
    ds.PixelData = pixels.astype("<i2").tobytes()
    return ds


def twelve_bit(study: StudySpec, series: str) -> Dataset:
    """12 bits stored in 16 allocated, unsigned (an MR-like range 0..4095)."""
    pixels = (phantom(256, 256, seed=7).astype(np.int32) + 1024).clip(0, 4095).astype(np.uint16)
    ds = ct_instance(study, series, 1, rows=256, columns=256)
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 12, 11, 0
    ds.PixelData = pixels.astype("<u2").tobytes()
    return ds


def restudied(name: str, study: StudySpec) -> Dataset:
    """A pydicom test file as an instance of our study (pixels and transfer syntax untouched)."""
    ds = dcmread(get_testdata_file(name))
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study.study_uid, new_uid(), new_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientID, ds.PatientName = study.patient_id, study.patient_name
    return ds


def as_stored_htj2k(ds: Dataset) -> Dataset:
    """``ds`` encoded by a peer (imagecodecs' OpenJPH) as HTJ2K lossless RPCL: RPCL order, TLM, a tile-part per resolution."""
    import imagecodecs

    out = ds.copy()
    arr = ds.pixel_array
    frames = arr if int(ds.get("NumberOfFrames", 1) or 1) > 1 else arr[None]
    out.PixelData = encapsulate([imagecodecs.htj2k_encode(f, reversible=True, tlm=True, tilepart=1) for f in frames])
    out["PixelData"].VR = "OB"
    out.file_meta.TransferSyntaxUID = UID(HTJ2K_RPCL)
    out.SOPInstanceUID = new_uid()
    out.file_meta.MediaStorageSOPInstanceUID = out.SOPInstanceUID
    return out


@dataclass
class Held:
    """One instance we stored: its WADO-RS URL and the original file (the reference for every pixel check)."""

    key: str
    ds: Dataset
    path: Path

    @property
    def frames(self) -> int:
        return int(self.ds.get("NumberOfFrames", 1) or 1)

    def reference(self, index: int) -> np.ndarray:
        return pixel_array(self.path, index=index)  # pydicom's decoding of the original


@dataclass
class Env:
    server: XdsiProcess
    held: dict[str, Held]

    def frame_url(self, key: str, frames: str = "1") -> str:
        h = self.held[key]
        ds = h.ds
        return (
            f"http://127.0.0.1:{self.server.http_port}/dicomweb/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
            f"/instances/{ds.SOPInstanceUID}/frames/{frames}"
        )


def _stow(server: XdsiProcess, paths: list[Path]) -> None:
    r = stow_raw(server, [p.read_bytes() for p in paths], timeout=120)
    assert r.status_code == 200, r.text


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    base = tmp_path_factory.mktemp("htj2k")
    study = StudySpec(patient_id=f"HT{uuid.uuid4().hex[:6]}", patient_name="HTJ2K^FRAMES")
    series = new_uid()
    datasets = {
        "ct512": ct_dataset(study, series, 1, phantom()),
        "bits12": twelve_bit(study, new_uid()),
        "mr": restudied("MR_small.dcm", study),
        "rgb": restudied("examples_rgb_color.dcm", study),
        "rle2": restudied("SC_rgb_rle_2frame.dcm", study),  # RGB, 2 frames, RLE Lossless
        "j2k_ybr": restudied("examples_jpeg2k.dcm", study),  # YBR_RCT JPEG 2000: decodes to RGB
    }
    datasets["ct512_htj2k"] = as_stored_htj2k(datasets["ct512"])
    datasets["rle2_htj2k"] = as_stored_htj2k(datasets["rle2"])
    held: dict[str, Held] = {}
    for key, ds in datasets.items():
        path = base / f"{key}.dcm"
        ds.save_as(path, enforce_file_format=True)
        held[key] = Held(key, dcmread(path), path)
    server = XdsiProcess(base / "data").start()
    try:
        _stow(server, [h.path for h in held.values()])
        yield Env(server, held)
    finally:
        server.stop()


# -- reading answers --------------------------------------------------------------------------------

def parts(r: requests.Response) -> list[tuple[dict[str, str], bytes]]:
    """The parts of a multipart/related answer, parsed by the standard library's email parser (not ours)."""
    import email
    import email.policy

    msg = email.message_from_bytes(
        b"Content-Type: " + r.headers["Content-Type"].encode() + b"\r\n\r\n" + r.content, policy=email.policy.HTTP
    )
    assert msg.is_multipart(), r.headers["Content-Type"]
    out = []
    for p in msg.iter_parts():
        headers = {k.lower(): str(v) for k, v in p.items()}
        headers["content-type"] = f"{p.get_content_type()}; transfer-syntax={p.get_param('transfer-syntax')}"  # unquoted
        out.append((headers, p.get_payload(decode=True)))
    return out


def decode_frame(h: Held, bitstream: bytes, ts: str) -> np.ndarray:
    """pydicom's decoding of one returned frame, described by the instance's own attributes."""
    ds = dcmread(h.path, stop_before_pixels=True)
    ds.file_meta.TransferSyntaxUID = UID(ts)
    ds.NumberOfFrames = 1
    if UID(ts).is_compressed:
        ds.PixelData = encapsulate([bitstream])
        ds["PixelData"].VR = "OB"
    else:
        ds.PixelData = bitstream
    if "PlanarConfiguration" in ds:
        ds.PlanarConfiguration = 0
    return ds.pixel_array


def markers(cs: bytes) -> tuple[dict[int, bytes], list[tuple[int, int]]]:
    """Main-header marker segments of a JPEG 2000 codestream (by marker) and its tile-parts as (offset, length)."""
    assert cs[:2] == b"\xff\x4f", "no SOC marker"
    main: dict[int, bytes] = {}
    i = 2
    while True:
        (m,) = struct.unpack(">H", cs[i : i + 2])
        if m == 0xFF90:
            break
        (n,) = struct.unpack(">H", cs[i + 2 : i + 4])
        main[m] = cs[i + 4 : i + 2 + n]
        i += 2 + n
    tile_parts = []
    while i < len(cs) and cs[i : i + 2] == b"\xff\x90":
        (psot,) = struct.unpack(">I", cs[i + 6 : i + 10])
        tile_parts.append((i, psot))
        i += psot
    return main, tile_parts


def tlm_lengths(tlm: bytes) -> list[int]:
    """Tile-part lengths from a TLM marker segment (ISO/IEC 15444-1 A.7.1)."""
    stlm = tlm[1]
    st, sp = (stlm >> 4) & 0x3, 4 if (stlm >> 6) & 1 else 2
    body, out = tlm[2:], []
    step = st + sp
    for k in range(0, len(body), step):
        out.append(int.from_bytes(body[k + st : k + step], "big"))
    return out


def opj_reduce(tmp: Path, codestream: bytes, reduce: int, dtype: str) -> np.ndarray:
    """Debian's OpenJPEG decoding of a codestream at 2**-reduce resolution (raw little-endian samples)."""
    src, out = tmp / f"cs-{uuid.uuid4().hex}.j2k", tmp / f"out-{uuid.uuid4().hex}.rawl"
    src.write_bytes(codestream)
    p = subprocess.run([OPJ_DECOMPRESS, "-i", str(src), "-o", str(out), "-r", str(reduce)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout[-500:] + p.stderr[-500:]
    return np.fromfile(out, dtype=dtype)


ACCEPT_HTJ2K_RPCL = f'multipart/related; type="image/jphc"; transfer-syntax={HTJ2K_RPCL}'


# -- converted on the fly ---------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["ct512", "bits12", "mr", "rgb", "rle2"])
def test_jpeg2000_lossless_frames_converted_on_the_fly(env: Env, key: str) -> None:
    """Frames of an instance not stored as JPEG 2000, asked for in it: pydicom decodes each to the original pixels."""
    h = env.held[key]
    numbers = ",".join(str(i + 1) for i in range(h.frames))
    r = requests.get(env.frame_url(key, numbers), headers={"Accept": f'multipart/related; type="image/jp2"; transfer-syntax={JPEG2000Lossless}'}, timeout=60)
    assert r.status_code == 200, r.text
    got = parts(r)
    assert len(got) == h.frames
    for i, (headers, data) in enumerate(got):
        assert headers["content-type"] == f"image/jp2; transfer-syntax={JPEG2000Lossless}"
        assert np.array_equal(decode_frame(h, data, str(JPEG2000Lossless)), h.reference(i)), f"{key} frame {i + 1}"


@needs_htj2k_encoder
@pytest.mark.parametrize("ts", [HTJ2K_LOSSLESS, HTJ2K_RPCL, HTJ2K])
@pytest.mark.parametrize("key", ["ct512", "bits12", "mr", "rgb", "rle2"])
def test_htj2k_frames_converted_on_the_fly(env: Env, key: str, ts: str) -> None:
    """Frames asked for in HTJ2K (.201/.202/.203) from an instance stored otherwise: the original pixels, per pydicom."""
    h = env.held[key]
    numbers = ",".join(str(i + 1) for i in range(h.frames))
    r = requests.get(env.frame_url(key, numbers), headers={"Accept": f'multipart/related; type="image/jphc"; transfer-syntax={ts}'}, timeout=60)
    assert r.status_code == 200, r.text
    got = parts(r)
    assert len(got) == h.frames
    for i, (headers, data) in enumerate(got):
        assert headers["content-type"] == f"image/jphc; transfer-syntax={ts}"
        assert np.array_equal(decode_frame(h, data, ts), h.reference(i)), f"{key} frame {i + 1}"


@needs_htj2k_encoder
def test_converted_rpcl_frame_has_resolution_tile_parts(env: Env) -> None:
    """What makes .202 progressive: RPCL order, a TLM marker, one tile-part per resolution level, in order."""
    r = requests.get(env.frame_url("ct512"), headers={"Accept": f"image/jphc; transfer-syntax={HTJ2K_RPCL}"}, timeout=60)
    assert r.status_code == 200, r.text
    main, tile_parts = markers(r.content)
    cod = main[0xFF52]
    assert cod[1] == 2, f"progression order {cod[1]} is not RPCL (2)"
    levels = cod[5]
    assert 0xFF55 in main, "no TLM marker in the main header"
    assert len(tile_parts) == levels + 1
    assert tlm_lengths(main[0xFF55]) == [n for _o, n in tile_parts]


# -- single part, Range -----------------------------------------------------------------------------

def test_single_part_frame_and_ranges(env: Env) -> None:
    """One frame as the whole body: Accept-Ranges, ETag; 206 with Content-Range; suffix ranges; 416 past the end."""
    url = env.frame_url("ct512_htj2k")
    accept = {"Accept": f"image/jphc; transfer-syntax={HTJ2K_RPCL}"}
    whole = requests.get(url, headers=accept, timeout=60)
    assert whole.status_code == 200, whole.text
    assert whole.headers["Content-Type"] == f"image/jphc; transfer-syntax={HTJ2K_RPCL}"
    assert whole.headers["Accept-Ranges"] == "bytes"
    etag = whole.headers["ETag"]
    n = len(whole.content)
    assert int(whole.headers["Content-Length"]) == n
    with open(env.held["ct512_htj2k"].path, "rb") as fh:  # as stored: the very fragment the peer encoded
        fh.seek(dcmread(env.held["ct512_htj2k"].path, defer_size=64).get_item("PixelData", keep_deferred=True).value_tell)
        assert whole.content == get_frame(fh, 0, number_of_frames=1)

    part = requests.get(url, headers={**accept, "Range": "bytes=0-1023"}, timeout=60)
    assert part.status_code == 206
    assert part.headers["Content-Range"] == f"bytes 0-1023/{n}" and part.content == whole.content[:1024]
    assert part.headers["ETag"] == etag

    rest = requests.get(url, headers={**accept, "Range": "bytes=1024-", "If-Range": etag}, timeout=60)
    assert rest.status_code == 206 and part.content + rest.content == whole.content

    tail = requests.get(url, headers={**accept, "Range": "bytes=-100"}, timeout=60)
    assert tail.status_code == 206 and tail.content == whole.content[-100:]
    assert tail.headers["Content-Range"] == f"bytes {n - 100}-{n - 1}/{n}"

    beyond = requests.get(url, headers={**accept, "Range": f"bytes={n}-"}, timeout=60)
    assert beyond.status_code == 416 and beyond.headers["Content-Range"] == f"bytes */{n}"

    stale = requests.get(url, headers={**accept, "Range": "bytes=0-9", "If-Range": '"another"'}, timeout=60)
    assert stale.status_code == 200 and stale.content == whole.content  # another representation: all of it

    several = requests.get(url, headers={**accept, "Range": "bytes=0-9,20-29"}, timeout=60)
    assert several.status_code == 200 and several.content == whole.content  # not supported: ignored, as RFC 9110 allows

    assert np.array_equal(decode_frame(env.held["ct512_htj2k"], whole.content, HTJ2K_RPCL), env.held["ct512"].reference(0))


def test_progressive_resolution_levels_by_range(env: Env, tmp_path: Path) -> None:
    """A viewer's progressive fetch: the main header first, then each resolution level's tile-part, by Range.

    Each prefix (plus an EOC marker) decoded by OpenJPEG at that level equals
    OpenJPEG's decoding of the whole frame at that level; the quarter
    resolution needs a small part of the frame; the whole frame is the
    original pixels (pydicom).
    """
    if not Path(OPJ_DECOMPRESS).exists():
        pytest.skip("Debian's OpenJPEG tools (libopenjp2-tools) are not installed")
    url = env.frame_url("ct512_htj2k")
    accept = {"Accept": f"image/jphc; transfer-syntax={HTJ2K_RPCL}"}
    head = requests.get(url, headers={**accept, "Range": "bytes=0-1023"}, timeout=60)
    assert head.status_code == 206
    total = int(head.headers["Content-Range"].rsplit("/", 1)[1])
    main, _ = markers(head.content[: head.content.index(b"\xff\x90") + 12])
    lengths = tlm_lengths(main[0xFF55])
    first_tile_part = head.content.index(b"\xff\x90")
    ends = list(np.cumsum([first_tile_part, *lengths]))[1:]
    assert ends[-1] + 2 == total  # tile-parts, then EOC
    levels = len(lengths) - 1
    whole = requests.get(url, headers=accept, timeout=60).content
    got = bytearray(head.content)
    fetched_for: dict[int, int] = {}
    for k, end in enumerate(ends):
        if end > len(got):
            r = requests.get(url, headers={**accept, "Range": f"bytes={len(got)}-{end - 1}"}, timeout=60)
            assert r.status_code == 206
            got += r.content
        reduce = levels - k
        fetched_for[reduce] = end
        prefix = bytes(got[:end]) + b"\xff\xd9"
        assert np.array_equal(opj_reduce(tmp_path, prefix, reduce, "<i2"), opj_reduce(tmp_path, whole, reduce, "<i2")), f"level {k}"
    assert fetched_for[2] < total / 8, f"quarter resolution needed {fetched_for[2]} of {total} bytes"
    full = opj_reduce(tmp_path, whole, 0, "<i2").reshape(512, 512)
    assert np.array_equal(full, env.held["ct512"].reference(0))


def test_accept_query_parameter_wins_over_header(env: Env) -> None:
    """Cornerstone's urlArguments: ``?accept=image/jphc...`` while its header asks multipart transfer-syntax=*."""
    r = requests.get(
        env.frame_url("ct512_htj2k"),
        params={"accept": f"image/jphc;transfer-syntax={HTJ2K_RPCL}"},
        headers={"Accept": "multipart/related; type=application/octet-stream; transfer-syntax=*", "Range": "bytes=0-99"},
        timeout=60,
    )
    assert r.status_code == 206 and r.headers["Content-Type"] == f"image/jphc; transfer-syntax={HTJ2K_RPCL}"
    assert r.content[:2] == b"\xff\x4f"


def test_stored_htj2k_as_stored_and_native(env: Env) -> None:
    """transfer-syntax=* sends stored HTJ2K frames as they are; octet-stream decodes them (pydicom) to the original pixels."""
    h = env.held["rle2_htj2k"]
    r = requests.get(env.frame_url("rle2_htj2k", "1,2"), headers={"Accept": "multipart/related; type=application/octet-stream; transfer-syntax=*"}, timeout=60)
    assert r.status_code == 200, r.text
    for i, (headers, data) in enumerate(parts(r)):
        assert headers["content-type"] == f"image/jphc; transfer-syntax={HTJ2K_RPCL}"
        assert np.array_equal(decode_frame(h, data, HTJ2K_RPCL), env.held["rle2"].reference(i))
    native = requests.get(env.frame_url("rle2_htj2k", "2"), headers={"Accept": "application/octet-stream"}, timeout=60)
    assert native.status_code == 200 and native.headers["Content-Type"] == f"application/octet-stream; transfer-syntax={ExplicitVRLittleEndian}"
    assert np.array_equal(decode_frame(h, native.content, str(ExplicitVRLittleEndian)), env.held["rle2"].reference(1))


def test_refusals(env: Env) -> None:
    """406 with the reason, before anything is sent; 404 for a frame that does not exist."""
    ybr = requests.get(env.frame_url("j2k_ybr"), headers={"Accept": f"image/jphc; transfer-syntax={HTJ2K_RPCL}"}, timeout=60)
    assert ybr.status_code == 406 and "YBR_RCT" in ybr.text  # its decoded pixels (RGB) are not what its metadata describes
    many = requests.get(env.frame_url("rle2", "1,2"), headers={"Accept": "image/jphc"}, timeout=60)
    assert many.status_code == 406 and "one frame" in many.text
    missing = requests.get(env.frame_url("ct512", "2"), headers={"Accept": ACCEPT_HTJ2K_RPCL}, timeout=60)
    assert missing.status_code == 404
    lossy = requests.get(env.frame_url("ct512"), headers={"Accept": 'multipart/related; type="image/jp2"; transfer-syntax=1.2.840.10008.1.2.4.91'}, timeout=60)
    assert lossy.status_code == 406  # lossy frames are never made on the fly
