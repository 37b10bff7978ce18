"""The JPIP server under /jpip, checked with OpenJPEG's own JPIP client and decoder (issue 16).

Every JPP-stream we answer is turned into a codestream by Debian's
``opj_jpip_transcode`` (OpenJPEG's JPIP client library, not our code) and
decoded by OpenJPEG; the pixels are compared with pydicom's decoding of the
stored instance, and a reduced-resolution answer with OpenJPEG's own
``opj_decompress -r`` of the full codestream.
"""

from __future__ import annotations

import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless, generate_uid
from werkzeug.test import Client

from xdsi.app import make_app
from xdsi.archive import Archive
from xdsi.config import JpipSettings, Settings
from xdsi.jpip.server import JpipApp
from xdsi.jpip.source import CodestreamSource
from xdsi.tools.synth import StudySpec, ct_instance

TRANSCODE = "/usr/bin/opj_jpip_transcode"
DECOMPRESS = "/usr/bin/opj_decompress"
COMPRESS = "/usr/bin/opj_compress"
EOR_LEN = 3


def _phantom(n: int) -> np.ndarray:
    """A CT-like 12-bit slice: a body ellipse with organs and a little noise (pure noise would have no low resolutions)."""
    y, x = np.mgrid[0:n, 0:n] / n - 0.5
    img = np.where(x**2 / 0.16 + y**2 / 0.12 < 1, 1040.0, 24.0)
    img += np.where((x - 0.12) ** 2 + y**2 < 0.01, 300, 0) + np.where((x + 0.15) ** 2 + (y + 0.1) ** 2 < 0.004, 900, 0)
    img += np.random.default_rng(7).normal(0, 12, (n, n))
    return np.clip(img, 0, 4095).astype(np.uint16)


def _ct(spec: StudySpec, pixels: np.ndarray, number: int) -> Dataset:
    ds = ct_instance(spec, spec.study_uid + ".2", number, rows=pixels.shape[0], columns=pixels.shape[1])
    ds.BitsStored, ds.HighBit = 12, 11
    ds.PixelData = pixels.tobytes()
    return ds


def _as_j2k(ds: Dataset, codestream: bytes) -> Dataset:
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.PixelData = encapsulate([codestream])
    ds["PixelData"].VR = "OB"
    return ds


def _opj_compress(pixels: np.ndarray, tmp: Path, *args: str) -> bytes:
    src, out = tmp / "in.pgm", tmp / "out.j2k"
    src.write_bytes(f"P5\n{pixels.shape[1]} {pixels.shape[0]}\n4095\n".encode() + pixels.astype(">u2").tobytes())
    subprocess.run([COMPRESS, "-i", str(src), "-o", str(out), *args], check=True, capture_output=True)
    return out.read_bytes()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    work = tmp_path_factory.mktemp("jpip")
    spec = StudySpec()
    pixels = _phantom(512)
    objects: dict[str, Dataset] = {}
    objects["ct"] = _ct(spec, pixels, 1)  # native: encoded on demand
    ct_j2k = _ct(spec, pixels, 2)
    ct_j2k.compress(JPEG2000Lossless, generate_instance_uid=False)  # stored as JPEG 2000: its own codestream is served
    objects["ct_j2k"] = ct_j2k
    objects["tiled"] = _as_j2k(_ct(spec, pixels, 3), _opj_compress(pixels, work, "-t", "128,128", "-c", "[64,64]", "-n", "4"))
    objects["layered"] = _as_j2k(_ct(spec, pixels, 4), _opj_compress(pixels, work, "-r", "20,5,1", "-p", "RLCP"))
    multi = _ct(spec, pixels[:128, :128], 5)
    frames = [np.roll(pixels, 37 * k, axis=1)[128:256, 128:256] for k in range(3)]
    multi.NumberOfFrames = 3
    multi.PixelData = np.stack(frames).tobytes()
    objects["multi"] = multi
    no_pixels = _ct(spec, pixels[:64, :64], 6)
    del no_pixels.PixelData
    objects["no_pixels"] = no_pixels
    import imagecodecs  # HTJ2K (issue 16's tier encoder) stored: served as a verified JPEG 2000 re-encoding

    objects["htj2k"] = _as_j2k(_ct(spec, pixels[:256, :256], 7), bytes(imagecodecs.htj2k_encode(np.ascontiguousarray(pixels[:256, :256]), level=0)))
    objects["htj2k"].file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.201"
    for name in ("MR_small_jp2klossless.dcm", "JPEG2000.dcm", "GDCMJ2K_TextGBR.dcm", "J2K_pixelrep_mismatch.dcm", "CT_small.dcm"):
        objects[name] = dcmread(get_testdata_file(name))
    s = Settings(data_dir=work / "data")
    archive = Archive.open(replace(s, jpip=JpipSettings(enabled=True, openjpeg_tile_headers=True)))
    files = work / "in"
    files.mkdir()
    for i, (name, ds) in enumerate(objects.items()):
        f = files / f"{i}.dcm"
        ds.save_as(f, enforce_file_format=True)
        archive.store.store_file(f, move=False)
    try:
        yield {"archive": archive, "client": Client(make_app(archive, {})), "objects": objects, "pixels": pixels,
               "frames": frames, "tmp": work}
    finally:
        archive.close()


def _get(env: dict[str, Any], query: str) -> Any:
    return env["client"].get(f"/jpip?{query}")


def _codestream(env: dict[str, Any], jpp: bytes, name: str) -> bytes:
    """OpenJPEG's JPIP client turns the JPP-stream into a codestream."""
    src, out = env["tmp"] / f"{name}.jpp", env["tmp"] / f"{name}.j2k"
    src.write_bytes(jpp)
    out.unlink(missing_ok=True)
    subprocess.run([TRANSCODE, str(src), str(out)], check=True, capture_output=True, timeout=60)
    return out.read_bytes()


def _decode(codestream: bytes) -> np.ndarray:
    from openjpeg import decode

    return np.asarray(decode(codestream))


def _reduced(env: dict[str, Any], codestream: bytes, levels: int, name: str) -> np.ndarray:
    """OpenJPEG's own reduce (opj_decompress -r) of a full codestream, read back as little-endian raw samples."""
    src, out = env["tmp"] / f"{name}-full.j2k", env["tmp"] / f"{name}-reduced.rawl"
    src.write_bytes(codestream)
    subprocess.run([DECOMPRESS, "-i", str(src), "-o", str(out), "-r", str(levels)], check=True, capture_output=True)
    return np.fromfile(out, dtype="<u2")


def _sop(env: dict[str, Any], name: str) -> str:
    return str(env["objects"][name].SOPInstanceUID)


def _stored_codestream(ds: Dataset) -> bytes:
    from pydicom.encaps import generate_fragmented_frames

    return b"".join(next(generate_fragmented_frames(ds.PixelData)))


@pytest.mark.parametrize("name", ["ct", "ct_j2k"])
def test_quarter_resolution_is_small_and_is_openjpegs_reduce(env: dict[str, Any], name: str) -> None:
    sop = _sop(env, name)
    quarter = _get(env, f"target={sop}&fsiz=128,128&type=jpp-stream")
    full = _get(env, f"target={sop}&fsiz=512,512&type=jpp-stream")
    assert quarter.status_code == full.status_code == 200
    assert quarter.headers["Content-Type"] == "image/jpp-stream"
    assert len(quarter.data) * 8 < len(full.data), (len(quarter.data), len(full.data))
    small = _decode(_codestream(env, quarter.data, f"{name}-q"))
    assert small.shape == (128, 128)
    whole = _codestream(env, full.data, f"{name}-f")
    assert np.array_equal(_decode(whole), env["objects"][name].pixel_array)  # the full answer is the instance
    reference = whole if name == "ct" else _stored_codestream(env["objects"][name])
    assert np.array_equal(small.ravel(), _reduced(env, reference, 2, name))


def test_second_request_of_a_session_sends_only_what_is_missing(env: dict[str, Any]) -> None:
    sop = _sop(env, "ct")
    first = _get(env, f"target={sop}&fsiz=128,128&type=jpp-stream&cnew=http")
    cnew = dict(kv.split("=", 1) for kv in first.headers["JPIP-cnew"].split(","))
    assert cnew["transport"] == "http" and cnew["path"] == "jpip" and first.headers["JPIP-tid"]
    second = _get(env, f"cid={cnew['cid']}&fsiz=512,512&type=jpp-stream")
    full = _get(env, f"target={sop}&fsiz=512,512")
    assert second.status_code == 200
    # only the missing data: the two answers together are the full answer (less one EOR, plus a few message headers)
    assert len(first.data) + len(second.data) <= len(full.data) + EOR_LEN + 64
    assert len(second.data) < len(full.data) - len(first.data) // 2
    combined = _codestream(env, first.data[:-EOR_LEN] + second.data, "session")
    assert np.array_equal(_decode(combined), env["objects"]["ct"].pixel_array)
    again = _get(env, f"cid={cnew['cid']}&fsiz=512,512")
    assert again.data == bytes([0, 1, 0])  # nothing left to send: only EOR "image done"
    closed = _get(env, f"cclose={cnew['cid']}")
    assert closed.status_code == 200
    assert _get(env, f"cid={cnew['cid']}&fsiz=512,512").status_code == 400


def _messages(stream: bytes, lasts: list[bool] | None = None) -> list[tuple[int, int, int, int, int]]:
    """(class, codestream, in-class id, offset, length) of each message: a reader written from 15444-9 A.2, not the server's.

    ``lasts``, when given, gets each message's is-last-byte flag.
    """
    out, pos, cls, csn = [], 0, 0, 0

    def vbas() -> int:
        nonlocal pos
        v = 0
        while True:
            b = stream[pos]
            pos += 1
            v = (v << 7) | (b & 0x7F)
            if not b & 0x80:
                return v

    while pos < len(stream):
        b = stream[pos]
        if b == 0:  # EOR
            break
        ind = (b >> 5) & 3
        if lasts is not None:
            lasts.append(bool(b & 0x10))
        in_class, more = b & 0x0F, b & 0x80
        pos += 1
        while more:
            more = stream[pos] & 0x80
            in_class = (in_class << 7) | (stream[pos] & 0x7F)
            pos += 1
        if ind >= 2:
            cls = vbas()
        if ind == 3:
            csn = vbas()
        offset, length = vbas(), vbas()
        out.append((cls, csn, in_class, offset, length))
        pos += length
    return out


def test_model_field_tells_what_a_stateless_client_holds(env: dict[str, Any]) -> None:
    sop = _sop(env, "ct")
    first = _get(env, f"target={sop}&fsiz=128,128")
    held: dict[tuple[int, int], int] = {}
    for cls, _csn, i, off, length in _messages(first.data):
        held[(cls, i)] = max(held.get((cls, i), 0), off + length)
    items = [("Hm" if c == 6 else f"H{i}" if c == 2 else f"P{i}") + f":{n}" for (c, i), n in held.items()]
    rest = _get(env, f"target={sop}&fsiz=512,512&model={','.join(items)}")
    full = _get(env, f"target={sop}&fsiz=512,512")
    assert len(rest.data) < len(full.data) - len(first.data) // 2
    assert all((c, i) not in held or off >= held[(c, i)] for c, _s, i, off, _n in _messages(rest.data))
    combined = _codestream(env, first.data[:-EOR_LEN] + rest.data, "model")
    assert np.array_equal(_decode(combined), env["objects"]["ct"].pixel_array)
    # "-" takes an item back: the main header is sent again
    again = _get(env, f"target={sop}&fsiz=512,512&model={','.join(items)},-Hm")
    assert (6, 0, 0, 0) in [(c, s, i, off) for c, s, i, off, _n in _messages(again.data)]


def test_region_of_a_tiled_image_sends_its_tiles_only(env: dict[str, Any]) -> None:
    """A viewer's overview, then a zoom on one tile: the zoom brings that tile's detail and nothing else.

    (OpenJPEG's client rebuilds a tile it never heard of as an empty tile-part, which OpenJPEG's
    decoder then refuses; so the overview comes first, as in a viewer.)
    """
    sop = _sop(env, "tiled")
    overview = _get(env, f"target={sop}&fsiz=64,64&cnew=http")
    cid = dict(kv.split("=", 1) for kv in overview.headers["JPIP-cnew"].split(","))["cid"]
    region = _get(env, f"cid={cid}&fsiz=512,512&roff=128,128&rsiz=128,128")
    full = _get(env, f"target={sop}&fsiz=512,512")
    assert len(region.data) * 8 < len(full.data)
    tiles = {_tile_of(env, c, i) for c, _s, i, _o, _n in _messages(region.data) if c in (0, 2)}
    assert tiles == {5}, tiles  # tile 5 of 4x4 only
    got = _decode(_codestream(env, overview.data[:-EOR_LEN] + region.data, "region"))
    assert got.shape == (512, 512)
    assert np.array_equal(got[128:256, 128:256], env["pixels"][128:256, 128:256])
    assert not np.array_equal(got, env["pixels"])  # the rest is still the overview
    assert np.array_equal(_decode(_codestream(env, full.data, "tiled")), env["pixels"])
    clipped = _get(env, f"target={sop}&fsiz=64,64,round-up&roff=32,48&rsiz=100,100")
    assert clipped.headers["JPIP-rsiz"] == "32,16" and "JPIP-fsiz" not in clipped.headers
    assert _get(env, f"target={sop}&fsiz=100,100").headers["JPIP-fsiz"] == "64,64"


def _tile_of(env: dict[str, Any], cls: int, in_class: int) -> int:
    """The tile of a tile-header (its id) or precinct bin (15444-9 A.3.2.1: id = t + (c + s * components) * tiles)."""
    return in_class if cls == 2 else in_class % 16


def test_layers_limit_quality_and_the_rest_follows(env: dict[str, Any]) -> None:
    sop = _sop(env, "layered")
    one = _get(env, f"target={sop}&layers=1&cnew=http")
    cid = dict(kv.split("=", 1) for kv in one.headers["JPIP-cnew"].split(","))["cid"]
    rest = _get(env, f"cid={cid}&layers=9")
    assert rest.headers["JPIP-layers"] == "3"
    full = _get(env, f"target={sop}")
    assert len(one.data) * 3 < len(full.data)
    assert np.array_equal(_decode(_codestream(env, one.data[:-EOR_LEN] + rest.data, "layers")), env["pixels"])


def test_a_byte_limit_cuts_the_answer_and_the_session_goes_on(env: dict[str, Any]) -> None:
    sop = _sop(env, "ct")
    parts = [_get(env, f"target={sop}&fsiz=128,128&len=2000&cnew=http")]
    cid = dict(kv.split("=", 1) for kv in parts[0].headers["JPIP-cnew"].split(","))["cid"]
    assert parts[0].data[-EOR_LEN:] == bytes([0, 4, 0]) and len(parts[0].data) < 2000 + EOR_LEN  # EOR "byte limit"
    assert _get(env, f"target={sop}&len=0").data == bytes([0, 4, 0])
    while parts[-1].data[-EOR_LEN:] == bytes([0, 4, 0]):
        parts.append(_get(env, f"cid={cid}&fsiz=512,512&len=100000"))
        assert len(parts) < 20
    assert parts[-1].data[-EOR_LEN:] == bytes([0, 1, 0])
    stream = b"".join(p.data[:-EOR_LEN] for p in parts)
    assert np.array_equal(_decode(_codestream(env, stream, "len")), env["objects"]["ct"].pixel_array)


def test_htj2k_stored_is_served_as_verified_jpeg2000(env: dict[str, Any]) -> None:
    r = _get(env, f"target={_sop(env, 'htj2k')}&fsiz=64,64&cnew=http")
    cid = dict(kv.split("=", 1) for kv in r.headers["JPIP-cnew"].split(","))["cid"]
    rest = _get(env, f"cid={cid}")
    assert np.array_equal(_decode(_codestream(env, r.data[:-EOR_LEN] + rest.data, "htj2k")), env["pixels"][:256, :256])


def test_frames_are_streams(env: dict[str, Any]) -> None:
    sop = _sop(env, "multi")
    for k, frame in enumerate(env["frames"]):
        r = _get(env, f"target={sop}&stream={k}")
        assert np.array_equal(_decode(_codestream(env, r.data, f"frame{k}")), frame)
    assert _get(env, f"target={sop}&stream=3").status_code == 404
    # one session, several codestreams: each keeps what it holds
    first = _get(env, f"target={sop}&stream=0&cnew=http")
    cid = dict(kv.split("=", 1) for kv in first.headers["JPIP-cnew"].split(","))["cid"]
    other = _get(env, f"cid={cid}&stream=1")
    assert np.array_equal(_decode(_codestream(env, other.data, "stream1")), env["frames"][1])
    assert _get(env, f"cid={cid}&stream=0").data == bytes([0, 1, 0])


@pytest.mark.parametrize("name", ["MR_small_jp2klossless.dcm", "JPEG2000.dcm", "GDCMJ2K_TextGBR.dcm",
                                  "J2K_pixelrep_mismatch.dcm", "CT_small.dcm"])
def test_pydicom_samples_decode_to_pydicoms_pixels(env: dict[str, Any], name: str) -> None:
    r = _get(env, f"target={_sop(env, name)}")
    assert r.status_code == 200, r.data
    assert np.array_equal(_decode(_codestream(env, r.data, name.replace(".", "_"))), env["objects"][name].pixel_array)


@pytest.mark.parametrize(
    "query, status",
    [
        ("target=1.2.3../x", 400),
        ("target=1.2.3.4.5", 404),
        ("fsiz=64,64", 400),
        ("target={ct}&fsiz=64", 400),
        ("target={ct}&fsiz=64,64,sideways", 400),
        ("target={ct}&roff=600,0", 400),
        ("target={ct}&layers=-1", 400),
        ("target={ct}&stream=1", 404),
        ("target={ct}&type=jpt-stream", 501),
        ("target={ct}&metareq=[*]", 501),
        ("target={ct}&colour=red", 400),
        ("target={ct}&fsiz=64,64&fsiz=32,32", 400),
        ("target={ct}&cnew=udp", 501),
        ("cid=0123456789abcdef&fsiz=64,64", 400),
        ("target={ct}&model=Q7", 400),
        ("target={no_pixels}", 404),
    ],
)
def test_bad_requests_get_jpip_errors(env: dict[str, Any], query: str, status: int) -> None:
    r = _get(env, query.format(ct=_sop(env, "ct"), no_pixels=_sop(env, "no_pixels")))
    assert r.status_code == status, r.data
    assert r.headers["Content-Type"].startswith("text/plain") and r.data


def test_not_mounted_unless_enabled(env: dict[str, Any]) -> None:
    archive = env["archive"]
    off = Archive.__new__(Archive)
    off.__dict__.update(archive.__dict__)
    off.settings = replace(archive.settings, jpip=JpipSettings())
    assert Client(make_app(off, {})).get(f"/jpip?target={_sop(env, 'ct')}").status_code == 404


def test_an_encoding_that_does_not_decode_to_the_pixels_is_refused(env: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    import openjpeg

    real = openjpeg.decode
    monkeypatch.setattr(openjpeg, "decode", lambda data, *a, **k: real(data, *a, **k) ^ 1)  # a corrupt round trip
    app = JpipApp(CodestreamSource(env["archive"].retrieve, 64 << 20), env["tmp"] / "sessions-corrupt")
    r = Client(app).get(f"/?target={_sop(env, 'CT_small.dcm')}")
    assert r.status_code == 503 and b"same pixels" in r.data


def test_standard_tile_header_bins_and_session_limit(env: dict[str, Any]) -> None:
    """Without the OpenJPEG dialect a tile-header bin is its marker segments only (15444-9 A.3.3)."""
    app = JpipApp(CodestreamSource(env["archive"].retrieve, 64 << 20), env["tmp"] / "sessions-one", max_sessions=1)
    client = Client(app)
    sop = _sop(env, "tiled")
    r = client.get(f"/?target={sop}&fsiz=64,64&cnew=http")
    lasts: list[bool] = []
    msgs = _messages(r.data, lasts)
    stored = _stored_codestream(env["objects"]["tiled"])
    main = [m for m in msgs if m[0] == 6]
    assert main and main[0][3] == 0 and r.data.find(stored[:2]) >= 0
    tile_headers = [(i, length) for c, _s, i, _o, length in msgs if c == 2]
    assert tile_headers == [(i, 0) for i in range(16)]  # opj_compress writes no tile-part header markers: empty, complete
    assert all(last for m, last in zip(msgs, lasts) if m[0] == 2)  # each says it is the whole bin
    assert client.get(f"/?target={sop}&cnew=http").status_code == 503  # one channel allowed
    cid = dict(kv.split("=", 1) for kv in r.headers["JPIP-cnew"].split(","))["cid"]
    client.get(f"/?cclose={cid}")
    assert client.get(f"/?target={sop}&cnew=http").status_code == 200


def test_a_channel_goes_on_in_another_worker_process(env: dict[str, Any]) -> None:
    """Workers share the sockets, so a channel's next request may reach another process: the session is on disk."""
    folder = env["tmp"] / "sessions-shared"
    sop = _sop(env, "ct_j2k")
    workers = [Client(JpipApp(CodestreamSource(env["archive"].retrieve, 64 << 20), folder, openjpeg_dialect=True)) for _ in range(2)]
    first = workers[0].get(f"/?target={sop}&fsiz=128,128&cnew=http")
    cid = dict(kv.split("=", 1) for kv in first.headers["JPIP-cnew"].split(","))["cid"]
    second = workers[1].get(f"/?cid={cid}&fsiz=512,512")
    assert second.status_code == 200
    combined = _codestream(env, first.data[:-EOR_LEN] + second.data, "workers")
    assert np.array_equal(_decode(combined), env["objects"]["ct_j2k"].pixel_array)
    assert workers[0].get(f"/?cid={cid}&fsiz=512,512").data == bytes([0, 1, 0])
    assert workers[1].get(f"/?cid=../../etc/passwd&fsiz=8,8").status_code == 400


def test_with_http_auth_jpip_needs_a_reader(env: dict[str, Any]) -> None:
    """/jpip is behind the access check like every retrieve path: no credentials, 401; a user with read, 200."""
    import base64
    from types import SimpleNamespace

    from xdsi.security.users import BasicAuthenticator, UsersFile, add_user
    from xdsi.web.auth import HttpAuth, protect

    users = env["tmp"] / "users"
    add_user(users, "alice", "pw", frozenset({"read"}))
    holder = SimpleNamespace(settings=env["archive"].settings, http_auth=HttpAuth("basic", users=BasicAuthenticator(UsersFile(users))), audit=None)
    client = Client(protect(make_app(env["archive"], {}), holder))
    query = f"/jpip?target={_sop(env, 'ct')}&fsiz=32,32"
    assert client.get(query).status_code == 401
    auth = {"Authorization": "Basic " + base64.b64encode(b"alice:pw").decode()}
    assert client.get(query, headers=auth).status_code == 200
