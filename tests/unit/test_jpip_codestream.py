"""The codestream cutter behind the JPIP server, on codestreams OpenJPEG's encoder makes with many options.

The bins are put back together as a plain codestream (main header, then each
tile's SOT, header, SOD and packets in the codestream's order): for a
codestream with one tile-part a tile that is the original byte for byte, and
in every case OpenJPEG decodes it to the original pixels.  What the cutter
does not handle is refused, never cut by guess.
"""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

from xdsi.config import ConfigError, load_settings
from xdsi.jpip import jpp
from xdsi.jpip.codestream import Codestream, Unsupported, explicit_precincts, parse

COMPRESS = "/usr/bin/opj_compress"


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    work = tmp_path_factory.mktemp("j2k")
    rng = np.random.default_rng(3)
    y, x = np.mgrid[0:300, 0:420]
    grey = ((x * 7 + y * 3) % 4096 // 2 + rng.integers(0, 200, (300, 420))).astype(np.uint16)
    rgb = np.stack([(x * 2 % 256), (y % 256), ((x + y) % 256)], axis=-1).astype(np.uint8)[:200, :260]
    (work / "g.pgm").write_bytes(b"P5\n420 300\n4095\n" + grey.astype(">u2").tobytes())
    (work / "c.ppm").write_bytes(b"P6\n260 200\n255\n" + np.ascontiguousarray(rgb).tobytes())
    return {"dir": work, "grey": grey, "rgb": rgb}


def _encode(images: dict[str, object], src: str, *args: str) -> bytes:
    work = images["dir"]
    out = work / "out.j2k"  # type: ignore[operator]
    out.unlink(missing_ok=True)
    subprocess.run([COMPRESS, "-i", str(work / src), "-o", str(out), *args], check=True, capture_output=True)  # type: ignore[operator]
    return out.read_bytes()


def _rebuild(cs: Codestream) -> bytes:
    out = [cs.main_header]
    for t in cs.tiles:
        body = b"".join(p.data for p in t.packets)
        psot = 12 + len(t.header) + 2 + len(body)
        out += [struct.pack(">HHHIBB", 0xFF90, 10, t.index, psot, 0, 1), t.header, b"\xff\x93", body]
    return b"".join(out) + b"\xff\xd9"


VARIANTS = [
    ("g.pgm", ()),
    ("g.pgm", ("-p", "RLCP", "-c", "[64,64],[64,64],[32,32]", "-r", "4,2,1", "-n", "5")),
    ("g.pgm", ("-t", "128,128", "-c", "[32,32]", "-EPH", "-r", "3,1")),
    ("g.pgm", ("-b", "32,32", "-n", "5", "-r", "20,5,1")),
    ("g.pgm", ("-M", "2")),  # reset of the contexts on each pass: one codeword segment still
    ("c.ppm", ("-p", "RPCL", "-n", "4")),
    ("c.ppm", ("-p", "CPRL",)),
    ("c.ppm", ("-t", "100,100", "-TP", "R")),
    ("c.ppm", ("-c", "[32,32]", "-r", "5,1")),
]


@pytest.mark.parametrize("src, args", VARIANTS, ids=[" ".join(a) or "default" for _s, a in VARIANTS])
def test_bins_rebuild_the_codestream(images: dict[str, object], src: str, args: tuple[str, ...]) -> None:
    from openjpeg import decode

    data = _encode(images, src, *args)
    cs = parse(data)
    rebuilt = _rebuild(cs)
    if "-TP" not in args:
        assert rebuilt == data[: len(rebuilt) - 2] + b"\xff\xd9" or rebuilt == data
    original = images["grey"] if src == "g.pgm" else images["rgb"]
    assert np.array_equal(np.asarray(decode(rebuilt)), original)
    explicit = explicit_precincts(data)
    assert np.array_equal(np.asarray(decode(explicit)), original)
    assert [len(t.packets) for t in parse(explicit).tiles] == [len(t.packets) for t in cs.tiles]


@pytest.mark.parametrize("args, why", [(("-SOP",), "SOP"), (("-M", "1"), "code-block style"), (("-M", "4"), "code-block style"),
                                       (("-p", "RPCL", "-c", "[32,32]"), "several precincts")])
def test_what_is_not_cut_is_refused(images: dict[str, object], args: tuple[str, ...], why: str) -> None:
    with pytest.raises(Unsupported, match=why):
        parse(_encode(images, "g.pgm", *args))


def test_damaged_codestreams_are_refused(images: dict[str, object]) -> None:
    data = _encode(images, "g.pgm")
    sod = data.index(b"\xff\x93") + 2
    header_flipped = data[:sod] + bytes([data[sod] ^ 0x40]) + data[sod + 1 :]  # the first packet header says other lengths
    no_tile_size = data[:4] + data[4:24] + bytes(8) + data[32:]  # XTsiz = YTsiz = 0
    many_components = data[:40] + b"\xff\xff" + data[42:]  # Csiz larger than the SIZ segment
    for bad in (data[: len(data) // 2], header_flipped, b"\x00\x00\x00\x0cjP  " + data, data[:30], no_tile_size, many_components):
        with pytest.raises(Unsupported):
            parse(bad)


def test_message_headers_and_vbas() -> None:
    assert jpp.vbas(0) == b"\x00" and jpp.vbas(127) == b"\x7f" and jpp.vbas(128) == b"\x81\x00"
    assert jpp.message_header(0, 0, 5, 0, 10, True) == bytes([0x75, 0, 0, 0, 10])
    # in-class id 200: top bits in the first byte, then one 7-bit group
    assert jpp.message_header(6, 2, 200, 300, 1, False) == bytes([0xE1, 0x48, 6, 2, 0x82, 0x2C, 1])
    assert jpp.eor(jpp.EOR_WINDOW_DONE) == b"\x00\x02\x00"


def test_jpip_config(tmp_path: Path) -> None:
    cfg = tmp_path / "x.toml"
    cfg.write_text('[jpip]\nenabled = true\ncache_size = "64 MiB"\nmax_sessions = 5\nsession_idle_seconds = 30\n')
    s = load_settings(cfg, env={}).jpip
    assert (s.enabled, s.cache_bytes, s.max_sessions, s.session_idle_seconds, s.openjpeg_tile_headers) == (True, 64 << 20, 5, 30.0, False)
    assert load_settings(None, env={}).jpip.enabled is False
    for bad in ("enabled = 1", "cache_size = 10", "max_sessions = 0", "port = 9000"):
        cfg.write_text(f"[jpip]\n{bad}\n")
        with pytest.raises(ConfigError, match=r"\[jpip\]"):
            load_settings(cfg, env={})


def test_jpip_needs_the_read_right() -> None:
    """/jpip serves pixel data: with [http] auth on, it is no path "we do not serve" (which any identity may call)."""
    from xdsi.web.auth import required_right

    assert required_right("GET", "/jpip") == required_right("POST", "/jpip") == "read"
