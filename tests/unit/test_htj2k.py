"""HTJ2K lossless output (xdsi.archive.htj2k through pydicom's encoder plugins, and the conversion layer).

The oracle is pydicom's own decoding of the original; the HTJ2K result is read
back by pydicom's decoder (pylibjpeg-openjpeg, i.e. OpenJPEG, not the OpenJPH
encoder that wrote it) and, for every frame, by OpenJPH's decoder as a second
opinion.  Every codestream's main header is checked against PS3.5 10.18
(reversible, RPCL, TLM, base resolution <= 64).  Pixels our encoder cannot keep
exactly are refused by the policy and by the converter, never changed.
"""

from __future__ import annotations

import io
from pathlib import Path

import imagecodecs
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import generate_frames
from pydicom.pixels import get_encoder
from pydicom.uid import (
    HTJ2K,
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    JPEG2000Lossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from tests.unit.test_conversion import FILES, IDS, decoded_or_skip, stored_ts
from xdsi.archive import htj2k, transcode

SYNTAXES = (HTJ2KLossless, HTJ2KLosslessRPCL, HTJ2K)


def _frames(ds: Dataset) -> list[bytes]:
    return list(generate_frames(ds.PixelData, number_of_frames=int(ds.get("NumberOfFrames", 1) or 1)))


def _check_codestreams(ds: Dataset, want: np.ndarray) -> None:
    """Every frame: PS3.5 10.18 header facts, and OpenJPH's own decoder gives pydicom's pixels too."""
    frames = _frames(ds)
    per_frame = want if int(ds.get("NumberOfFrames", 1) or 1) > 1 else want[np.newaxis]
    assert len(frames) == len(per_frame)
    for cs, ref in zip(frames, per_frame):
        f = htj2k.check_lossless_rpcl(cs)
        assert f.reversible and not f.quantized and f.progression == "RPCL" and f.tlm and f.high_throughput
        assert (f.width, f.height) == (ds.Columns, ds.Rows)
        assert max(-(-f.width // 2**f.decompositions), -(-f.height // 2**f.decompositions)) <= 64
        assert f.colour_transform == (ds.PhotometricInterpretation == "YBR_RCT")
        other = imagecodecs.htj2k_decode(cs, planar=False)
        assert np.array_equal(other.reshape(ref.shape), ref)


@pytest.mark.parametrize("target", SYNTAXES, ids=[UID(t).keyword for t in SYNTAXES])
@pytest.mark.parametrize("path", FILES, ids=IDS)
def test_pydicom_corpus(path: Path, target: str) -> None:
    """Every pydicom test file with pixels: the policy and the converter agree, and pixels are identical."""
    ds, want = decoded_or_skip(path)
    facts = transcode.facts(path)
    choice = transcode.choose(stored_ts(ds), [target], facts)
    out = io.BytesIO()
    if not transcode.can_encode_pixels(target, facts):
        assert choice is None
        with pytest.raises(transcode.TranscodeError):
            transcode.write_converted(path, target, out)
        return
    assert choice == transcode.Choice(target, False)
    try:
        transcode.write_converted(path, target, out)
    except transcode.TranscodeError as exc:
        # a refusal is allowed only for samples outside Bits Stored (kept exactly or not at all)
        assert "Bits Stored" in str(exc), exc
        return
    got = dcmread(io.BytesIO(out.getvalue()))
    assert got.file_meta.TransferSyntaxUID == target
    assert got.SOPInstanceUID == ds.SOPInstanceUID
    assert "LossyImageCompression" not in got or got.LossyImageCompression == ds.get("LossyImageCompression")
    arr = got.pixel_array
    assert arr.shape == want.shape
    assert np.array_equal(arr, want), f"pixels differ after {stored_ts(ds)} -> {target}"
    _check_codestreams(got, want)


def _image(
    rows: int,
    columns: int,
    *,
    bits_allocated: int = 16,
    bits_stored: int = 16,
    signed: bool = False,
    spp: int = 1,
    frames: int = 1,
    planar: int = 0,
    photometric: str = "MONOCHROME2",
    pixels: np.ndarray | None = None,
    seed: int = 7,
) -> tuple[Dataset, np.ndarray]:
    """A native image built here: smooth structure plus noise (what CT/MR look like to a wavelet coder)."""
    rng = np.random.default_rng(seed)
    shape = (frames, rows, columns, spp)
    if pixels is None:
        lo, hi = (-(2 ** (bits_stored - 1)), 2 ** (bits_stored - 1)) if signed else (0, 2**bits_stored)
        yy, xx = np.mgrid[0:rows, 0:columns]
        base = ((np.sin(yy / 17.0) + np.cos(xx / 23.0)) * (hi - lo) / 8).astype(np.int64)
        noise = rng.integers(-max(2, (hi - lo) // 2048), max(2, (hi - lo) // 2048) + 1, size=shape)
        pixels = np.clip(base[np.newaxis, :, :, np.newaxis] + (lo + hi) // 2 + noise, lo, hi - 1)
    dtype = np.dtype(f"<{'i' if signed else 'u'}{bits_allocated // 8}")
    arr = pixels.astype(dtype).reshape(shape)
    raw = arr.transpose(0, 3, 1, 2) if planar else arr
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage if spp == 3 else CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.Modality = "HTJ2K01", "CT" if spp == 1 else "OT"
    ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, columns, spp
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits_allocated, bits_stored, bits_stored - 1
    ds.PixelRepresentation = int(signed)
    if spp > 1:
        ds.PlanarConfiguration = planar
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PixelData = raw.tobytes()
    want = arr.reshape(shape if frames > 1 else shape[1:])
    if spp == 1:
        want = want[..., 0]
    return ds, want


def _roundtrip(ds: Dataset, target: str, tmp_path: Path) -> tuple[Dataset, bytes]:
    src = tmp_path / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(src, enforce_file_format=True)
    out = io.BytesIO()
    transcode.write_converted(src, target, out)
    return dcmread(io.BytesIO(out.getvalue())), out.getvalue()


CASES = {
    "ct-512-signed16": dict(rows=512, columns=512, bits_stored=16, signed=True),
    "mr-12-in-16": dict(rows=256, columns=192, bits_stored=12),
    "ct-12-in-16-signed": dict(rows=128, columns=160, bits_stored=12, signed=True),
    "rgb8": dict(rows=120, columns=90, bits_allocated=8, bits_stored=8, spp=3, photometric="RGB"),
    "rgb8-planar": dict(rows=64, columns=80, bits_allocated=8, bits_stored=8, spp=3, photometric="RGB", planar=1),
    "rgb16": dict(rows=40, columns=50, spp=3, photometric="RGB"),
    "ybr-rct": dict(rows=48, columns=48, bits_allocated=8, bits_stored=8, spp=3, photometric="YBR_RCT"),
    "multiframe-10bit": dict(rows=70, columns=66, bits_stored=10, frames=3),
    "wide-4000": dict(rows=33, columns=4000, bits_allocated=8, bits_stored=8),
    "one-pixel": dict(rows=1, columns=1, bits_allocated=8, bits_stored=8),
    "odd-3x5": dict(rows=3, columns=5),
    "six-bit-in-8": dict(rows=31, columns=29, bits_allocated=8, bits_stored=6),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_synthetic_layouts(case: str, tmp_path: Path) -> None:
    ds, want = _image(**CASES[case])  # type: ignore[arg-type]
    assert np.array_equal(ds.pixel_array, want)  # the oracle reads what we built
    got, data = _roundtrip(ds, HTJ2KLosslessRPCL, tmp_path)
    assert got.file_meta.TransferSyntaxUID == HTJ2KLosslessRPCL
    assert np.array_equal(got.pixel_array, want)
    _check_codestreams(got, want)
    if case in ("ct-512-signed16", "mr-12-in-16"):
        assert len(data) < len(ds.PixelData) / 1.5  # it does compress


def test_unused_high_bits_are_refused_not_changed(tmp_path: Path) -> None:
    """12 bits stored but a sample with bit 13 set (e.g. an overlay in the high bits): refused, nothing written."""
    pixels = np.full((1, 40, 40, 1), 100, dtype=np.int64)
    pixels[0, 5, 5, 0] = 0x1000 | 7
    ds, _ = _image(40, 40, bits_stored=12, pixels=pixels)
    src = tmp_path / "high.dcm"
    ds.save_as(src, enforce_file_format=True)
    out = io.BytesIO()
    with pytest.raises(transcode.TranscodeError, match="Bits Stored"):
        transcode.write_converted(src, HTJ2KLossless, out)
    assert out.getvalue() == b""


def test_signed_without_sign_extension_is_refused(tmp_path: Path) -> None:
    """A negative 12-bit sample stored with zero high bits: pydicom reads -5, the word says 4091: refused."""
    ds, _ = _image(32, 32, bits_stored=12, signed=True)
    raw = bytearray(ds.PixelData)
    raw[0:2] = (0x0FFB).to_bytes(2, "little")
    ds.PixelData = bytes(raw)
    src = tmp_path / "signed.dcm"
    ds.save_as(src, enforce_file_format=True)
    with pytest.raises(transcode.TranscodeError, match="Bits Stored"):
        transcode.write_converted(src, HTJ2KLosslessRPCL, io.BytesIO())


def test_policy() -> None:
    ct = transcode.PixelFacts(True, 1, 16, "MONOCHROME2", 1, 12, 1, ExplicitVRLittleEndian, rows=512, columns=512)
    for ts in SYNTAXES:
        assert transcode.can_encode(ts)
        assert transcode.depends_on_pixels(ts)
        assert transcode.choose(ExplicitVRLittleEndian, [ts], ct) == transcode.Choice(ts, False)
    # stored HTJ2K asked for: unchanged; J2K stored, HTJ2K asked: converted
    assert transcode.choose(HTJ2KLosslessRPCL, [HTJ2KLosslessRPCL], ct) == transcode.Choice(HTJ2KLosslessRPCL, True)
    assert transcode.choose(JPEG2000Lossless, [HTJ2KLossless], ct) == transcode.Choice(HTJ2KLossless, False)
    # what the encoder does not take: float pixels, 32 bits, no pixels, tiny images are fine (unlike openjpeg's J2K)
    assert transcode.choose(ExplicitVRLittleEndian, [HTJ2KLossless], transcode.PixelFacts(True, float_pixels=True)) is None
    wide = transcode.PixelFacts(True, 1, 32, "MONOCHROME2", 1, 32, 0, ExplicitVRLittleEndian)
    assert transcode.choose(ExplicitVRLittleEndian, [HTJ2KLossless], wide) is None
    assert transcode.choose(ExplicitVRLittleEndian, [HTJ2KLossless], transcode.PixelFacts(False)) is None
    tiny = transcode.PixelFacts(True, 1, 8, "MONOCHROME2", 1, 8, 0, ExplicitVRLittleEndian, rows=2, columns=2)
    assert transcode.can_encode_pixels(HTJ2KLossless, tiny)
    assert not transcode.can_encode_pixels(JPEG2000Lossless, tiny)


def test_registered_through_pydicom() -> None:
    """The plugin is on pydicom's encoders; registering twice changes nothing."""
    for ts in SYNTAXES:
        enc = get_encoder(ts)
        assert enc.is_available and htj2k.PLUGIN in enc.available_plugins
    before = {ts: get_encoder(ts) for ts in SYNTAXES}
    htj2k.register()
    assert {ts: get_encoder(ts) for ts in SYNTAXES} == before
    assert get_encoder(ts).available_plugins == (htj2k.PLUGIN,)


def test_decompositions_rule() -> None:
    """PS3.5 10.18: the base resolution is at most 64 on each side; at least 5 levels where the image allows."""
    for rows, cols in [(1, 1), (3, 5), (64, 64), (512, 512), (4096, 4096), (33, 4000), (9000, 20)]:
        d = htj2k.decompositions(rows, cols)
        assert -(-max(rows, cols) // 2**d) <= 64
        if min(rows, cols) >= 32:
            assert d >= 5
