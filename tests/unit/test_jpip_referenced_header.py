"""JPIP Referenced headers (issue 16 part 3): what the data set holds, which instances get one, and the policy.

The reference for "what a header must say" is not our own header code: it is
the instance converted to JPEG 2000 lossless by the archive's conversion
layer (what the JPIP server serves for an instance not stored as JPEG 2000),
or the stored instance when it is JPEG 2000, with Pixel Data taken away.  The
instances are pydicom's bundled test files.  The archive is a real one
(SQLite, one tier), shared by the module.
"""

from __future__ import annotations

import io
import shutil
import zlib
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from pydicom.filereader import _read_file_meta_info, read_dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless

from tests.conftest import make_settings
from xdsi.archive import Archive, jpip_header, transcode
from xdsi.archive.retrieve import CannotProvide, InstanceRef
from xdsi.config import Settings
from xdsi.jpip.urls import JPIP_REFERENCED, JPIP_REFERENCED_DEFLATE, provider_url
from xdsi.uids import new_uid

PUBLIC = "https://imaging.example.org/xdsi"

# monochrome images in every stored syntax we hold (all offered)
MONO = [
    "CT_small.dcm",  # Explicit VR LE, 16-bit signed
    "MR_small_implicit.dcm",
    "MR_small_bigendian.dcm",
    "image_dfl.dcm",  # deflated
    "MR_small_jp2klossless.dcm",  # stored JPEG 2000 lossless: the stored codestream is served
    "JPEG2000.dcm",  # stored JPEG 2000 (lossy)
    "MR_small_RLE.dcm",
    "JPGExtended.dcm",  # 12-bit JPEG Extended: lossy-only source, the header must say so
]
# never offered: palette colour (not allowed by PS3.5 A.6), colour encoded on demand, no pixels
NOT_OFFERED = ["examples_palette.dcm", "SC_rgb_rle.dcm", "SC_rgb_dcmtk_+eb+cy+s2.dcm", "rtplan.dcm", "rgb-j2k"]
# colour stored as JPEG 2000 with the reversible colour transform: the stored codestream is served as it is
COLOUR_J2K = ["GDCMJ2K_TextGBR.dcm", "examples_jpeg2k.dcm"]


def _fresh(src: Path, out: Path) -> Path:
    ds = dcmread(src)
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = new_uid(), new_uid(), new_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientID = ds.get("PatientID") or "JPIP1"
    ds.save_as(out, enforce_file_format=True)
    return out


def _rgb_j2k(out: Path) -> Path:
    """pydicom's RGB RLE image encoded as JPEG 2000 lossless by our conversion layer (pydicom + OpenJPEG)."""
    ds = dcmread(get_testdata_file("SC_rgb_rle.dcm"))
    transcode.convert(ds, JPEG2000Lossless)
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = new_uid(), new_uid(), new_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(out, enforce_file_format=True)
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("jpip-in")
    out = {name: _fresh(Path(get_testdata_file(name)), root / name) for name in MONO + NOT_OFFERED[:-1] + COLOUR_J2K}
    out["rgb-j2k"] = _rgb_j2k(root / "rgb-j2k.dcm")
    out["ct-3-frames"] = _frames(root / "ct-3-frames.dcm", 3)
    return out


def _frames(out: Path, n: int) -> Path:
    """pydicom's CT image as an n-frame instance: the header keeps Number of Frames (frames are JPIP streams)."""
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    ds.PixelData = ds.PixelData * n
    ds.NumberOfFrames = n
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = new_uid(), new_uid(), new_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(out, enforce_file_format=True)
    return out


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory, files: dict[str, Path]) -> Iterator[Archive]:
    root = tmp_path_factory.mktemp("jpip-archive")
    a = Archive.open(jpip_enabled(make_settings(root, public_url=PUBLIC)))
    try:
        for path in files.values():
            r = a.store.store_file(path)
            assert r.ok, r.reason
        yield a
    finally:
        a.close()


def jpip_enabled(settings: Settings) -> Settings:
    """``[jpip] enabled = true`` where the settings have the JPIP server's section (jpip branch), else as they are."""
    jpip = getattr(settings, "jpip", None)
    return replace(settings, jpip=replace(jpip, enabled=True)) if jpip is not None and hasattr(jpip, "enabled") else settings


def test_offered_needs_a_public_url_and_an_enabled_jpip_server() -> None:
    assert jpip_header.offered(SimpleNamespace(public_url=PUBLIC))
    assert not jpip_header.offered(SimpleNamespace(public_url=""))
    assert not jpip_header.offered(SimpleNamespace(public_url=PUBLIC, jpip=SimpleNamespace(enabled=False)))
    assert jpip_header.offered(SimpleNamespace(public_url=PUBLIC, jpip=SimpleNamespace(enabled=True)))


def _ref(archive: Archive, path: Path) -> InstanceRef:
    sop = dcmread(path, stop_before_pixels=True).SOPInstanceUID
    return archive.retrieve.select(sop_uids=[sop])[0]


def _expected(path: Path) -> Dataset:
    """The instance as the JPIP server's codestream describes it: JPEG 2000 as stored, or converted to lossless."""
    ds = dcmread(path)
    if transcode.source_transfer_syntax(ds) not in jpip_header.J2K_PART1_STORED:
        transcode.convert(ds, JPEG2000Lossless)
    return ds


def _produced(archive: Archive, path: Path, accepted: list[str]) -> tuple[str, bytes]:
    with archive.retrieve.produce(_ref(archive, path), accepted) as p:
        return p.transfer_syntax, p.file_path().read_bytes()


@pytest.mark.parametrize("name", [*MONO, "ct-3-frames"])
def test_header_is_the_served_images_attributes_without_pixel_data(archive: Archive, files: dict[str, Path], name: str) -> None:
    path = files[name]
    ts, data = _produced(archive, path, [JPIP_REFERENCED])
    assert ts == JPIP_REFERENCED
    got = dcmread(io.BytesIO(data))
    assert got.file_meta.TransferSyntaxUID == JPIP_REFERENCED
    assert not got.original_encoding[0] and got.original_encoding[1], "PS3.5 A.6: Explicit VR Little Endian"
    expected = _expected(path)
    url = provider_url(PUBLIC, expected.SOPInstanceUID)
    assert got.PixelDataProviderURL == url and got["PixelDataProviderURL"].VR == "UR"
    assert "PixelData" not in got and not [e for e in got if e.tag.group == 0x7FE0]
    assert got.PhotometricInterpretation in ("MONOCHROME1", "MONOCHROME2")
    want = {e.tag: e.value for e in expected if e.tag.group != 0x7FE0}
    have = {e.tag: e.value for e in got if e.tag != jpip_header.PROVIDER_URL_TAG}
    assert sorted(have) == sorted(want), f"{name}: attributes differ: {set(have) ^ set(want)}"
    for tag, value in want.items():
        assert have[tag] == value, f"{name}: {tag} is {have[tag]!r}, the served image says {value!r}"
    assert got.SOPInstanceUID == dcmread(path, stop_before_pixels=True).SOPInstanceUID
    assert got.get("NumberOfFrames") == dcmread(path, stop_before_pixels=True).get("NumberOfFrames")


def test_lossy_only_source_says_it_was_lossy(archive: Archive, files: dict[str, Path]) -> None:
    got = dcmread(io.BytesIO(_produced(archive, files["JPGExtended.dcm"], [JPIP_REFERENCED])[1]))
    assert got.LossyImageCompression == "01"


def test_deflate_is_the_same_data_set_raw_deflated(archive: Archive, files: dict[str, Path]) -> None:
    path = files["CT_small.dcm"]
    _, plain = _produced(archive, path, [JPIP_REFERENCED])
    ts, deflated = _produced(archive, path, [JPIP_REFERENCED_DEFLATE])
    assert ts == JPIP_REFERENCED_DEFLATE
    p0, d0 = jpip_header.dataset_offset(plain), jpip_header.dataset_offset(deflated)
    meta = _read_file_meta_info(io.BytesIO(deflated[132:]))
    assert meta.TransferSyntaxUID == JPIP_REFERENCED_DEFLATE
    inflated = zlib.decompress(deflated[d0:], -zlib.MAX_WBITS)  # RFC 1951 raw deflate, as PS3.5 A.7 says
    assert inflated == plain[p0:]
    assert len(deflated) - d0 < len(plain) - p0
    ds = read_dataset(io.BytesIO(inflated), is_implicit_VR=False, is_little_endian=True)
    assert ds.PixelDataProviderURL.endswith(ds.SOPInstanceUID) and "PixelData" not in ds


@pytest.mark.parametrize("name", COLOUR_J2K)
def test_colour_stored_as_j2k_with_rct_is_ybr_rct(archive: Archive, files: dict[str, Path], name: str) -> None:
    path = files[name]
    frame = get_frame(dcmread(path).PixelData, 0, number_of_frames=1)
    assert jpip_header._cod(frame) == (True, True)
    got = dcmread(io.BytesIO(_produced(archive, path, [JPIP_REFERENCED])[1]))
    assert got.PhotometricInterpretation == "YBR_RCT" and got.SamplesPerPixel == 3
    assert "PixelData" not in got


def test_rgb_codestream_without_colour_transform_is_not_offered(files: dict[str, Path]) -> None:
    """pydicom's J2K lossless encoder leaves RGB as RGB (no MCT): PS3.5 A.6 allows no RGB, so no header is offered."""
    frame = get_frame(dcmread(files["rgb-j2k"]).PixelData, 0, number_of_frames=1)
    assert jpip_header._cod(frame) == (False, True)
    assert jpip_header.header_photometric(files["rgb-j2k"], transcode.facts(files["rgb-j2k"])) is None


@pytest.mark.parametrize("name", NOT_OFFERED)
def test_not_offered_falls_to_the_next_syntax_or_is_refused(archive: Archive, files: dict[str, Path], name: str) -> None:
    path = files[name]
    stored = str(dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
    ts, _ = _produced(archive, path, [JPIP_REFERENCED, ImplicitVRLittleEndian])
    assert ts == (stored if stored == ImplicitVRLittleEndian else ImplicitVRLittleEndian)
    with pytest.raises(CannotProvide):
        archive.retrieve.produce(_ref(archive, path), [JPIP_REFERENCED, JPIP_REFERENCED_DEFLATE])


def test_requesters_order_decides(archive: Archive, files: dict[str, Path]) -> None:
    path = files["CT_small.dcm"]  # stored Explicit VR LE
    assert _produced(archive, path, [ImplicitVRLittleEndian, JPIP_REFERENCED])[0] == ImplicitVRLittleEndian
    assert _produced(archive, path, [JPIP_REFERENCED, ImplicitVRLittleEndian])[0] == JPIP_REFERENCED
    # JPIP listed first wins even over the stored syntax listed later (RAD TF-3 4.69.4.2.3: Pixel Data removed)
    assert _produced(archive, path, [JPIP_REFERENCED, ExplicitVRLittleEndian])[0] == JPIP_REFERENCED
    # the stored syntax listed first is the stored bytes
    ts, data = _produced(archive, path, [ExplicitVRLittleEndian, JPIP_REFERENCED])
    assert ts == ExplicitVRLittleEndian and data == path.read_bytes()
    # not offered (colour on demand) and the stored syntax after JPIP: the stored bytes
    colour = files["SC_rgb_dcmtk_+eb+cy+s2.dcm"]
    ts, data = _produced(archive, colour, [JPIP_REFERENCED, "1.2.840.10008.1.2.4.50"])
    assert ts == "1.2.840.10008.1.2.4.50" and data == colour.read_bytes()


def test_no_public_url_no_jpip(archive: Archive, files: dict[str, Path], tmp_path: Path) -> None:
    """Without [server] public_url the syntax is never chosen: no header with a URL nobody else can reach."""
    settings = replace(archive.settings, public_url="")
    assert not jpip_header.offered(settings) and jpip_header.syntaxes(settings) == []
    old = archive.retrieve.settings
    archive.retrieve.settings = settings
    try:
        path = files["CT_small.dcm"]
        with pytest.raises(CannotProvide):
            archive.retrieve.produce(_ref(archive, path), [JPIP_REFERENCED])
        assert _produced(archive, path, [JPIP_REFERENCED, ImplicitVRLittleEndian])[0] == ImplicitVRLittleEndian
    finally:
        archive.retrieve.settings = old


def test_cod_parser_reads_the_transform_flags() -> None:
    def codestream(mct: int, transform: int) -> bytes:
        siz = b"\xff\x51" + (41).to_bytes(2, "big") + b"\x00" * 39
        cod = b"\xff\x52\x00\x0c" + bytes([0, 0, 0, 1, mct, 5, 4, 4, 0, transform])
        return b"\xff\x4f" + siz + cod + b"\xff\x90\x00\x0a" + b"\x00" * 8

    assert jpip_header._cod(codestream(1, 1)) == (True, True)
    assert jpip_header._cod(codestream(1, 0)) == (True, False)
    assert jpip_header._cod(codestream(0, 1)) == (False, True)
    assert jpip_header._cod(b"\x00" * 40) is None
    assert jpip_header._cod(b"\xff\x4f\xff\x51\x00\x01") is None  # truncated


def test_build_refuses_what_it_cannot_describe(files: dict[str, Path], tmp_path: Path) -> None:
    """build() checks again and refuses what it cannot describe truthfully (never a guessed header)."""
    bad = shutil.copy(files["examples_palette.dcm"], tmp_path / "p.dcm")
    with pytest.raises(transcode.TranscodeError):
        jpip_header.build(Path(bad), JPIP_REFERENCED, provider_url(PUBLIC, new_uid()))


HTJ2K_LOSSLESS = "1.2.840.10008.1.2.4.201"


@pytest.mark.skipif(not transcode.can_encode(HTJ2K_LOSSLESS), reason="no HTJ2K encoder registered (xdsi.archive.htj2k, j2ktier branch)")
def test_monochrome_stored_as_htj2k_is_offered_as_stored(archive: Archive, tmp_path: Path) -> None:
    """An HTJ2K tier's instance: the stored codestream is what the JPIP server serves, so its attributes stand."""
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    transcode.convert(ds, HTJ2K_LOSSLESS)
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = new_uid(), new_uid(), new_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path = tmp_path / "ct-htj2k.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert archive.store.store_file(path).ok
    got = dcmread(io.BytesIO(_produced(archive, path, [JPIP_REFERENCED])[1]))
    want = {e.tag: e.value for e in dcmread(path) if e.tag.group != 0x7FE0}
    have = {e.tag: e.value for e in got if e.tag != jpip_header.PROVIDER_URL_TAG}
    assert have == want
    assert got.PixelDataProviderURL == provider_url(PUBLIC, ds.SOPInstanceUID) and "PixelData" not in got


@pytest.mark.skipif(shutil.which("/usr/bin/dcmdump") is None, reason="Debian's dcmtk is not installed")
@pytest.mark.parametrize("syntax", [JPIP_REFERENCED, JPIP_REFERENCED_DEFLATE])
def test_dcmtk_reads_the_header(archive: Archive, files: dict[str, Path], tmp_path: Path, syntax: str) -> None:
    """dcmtk (not our code, not pydicom) parses both encodings: the URL as UR, no Pixel Data, nothing to complain about."""
    import subprocess

    path = files["MR_small_bigendian.dcm"]
    out = tmp_path / "header.dcm"
    out.write_bytes(_produced(archive, path, [syntax])[1])
    proc = subprocess.run(["/usr/bin/dcmdump", "+L", str(out)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr
    name = "JPIP Referenced Deflate" if syntax == JPIP_REFERENCED_DEFLATE else "JPIP Referenced"
    assert f"# Used TransferSyntax: {name}\n" in proc.stdout
    sop = dcmread(path, stop_before_pixels=True).SOPInstanceUID
    assert f"(0028,7fe0) UR [{provider_url(PUBLIC, sop)}]" in proc.stdout
    assert "(7fe0,0010)" not in proc.stdout and "MONOCHROME2" in proc.stdout


def test_a_partition_never_offers_jpip_referenced(tmp_path: Path) -> None:
    """The JPIP server answers for the main archive only, so a partition's instances must not get a Pixel
    Data Provider URL that would answer 404."""
    from xdsi.config import load_settings

    cfg = tmp_path / "xdsi.toml"
    cfg.write_text(
        f'[server]\ndata_dir = "{tmp_path}"\npublic_url = "https://img.example.org"\n[jpip]\nenabled = true\n'
        '[partitions.research]\nae_title = "RESEARCH"\n'
    )
    main = load_settings(cfg, env={})
    assert jpip_header.offered(main)
    part = main.for_partition("research")
    assert not jpip_header.offered(part) and jpip_header.syntaxes(part) == []
