"""Lossless compression on a tier (``compress``) and at ingest (``compress_on_receive``), SQLite and PostgreSQL.

A study of a CT (16-bit signed, 512x512), an MR (12 bits in 16), an RGB image
(planar configuration 1), a 12-bit multi-frame image, a Basic Text SR (no
pixels) and an RLE Lossless image (already compressed) moves onto a tier with
``compress``; every image is then stored in the tier's syntax, the index says
so, and after a recall to the hot tier the pixels equal pydicom's decoding of
the file that was sent in.  The original copy is still in place, and still the
indexed one, while the compressed file is verified; a forced corrupt encode
leaves it there and is reported.
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import pixel_array
from pydicom.uid import (
    BasicTextSRStorage,
    CTImageStorage,
    ExplicitVRLittleEndian,
    HTJ2KLosslessRPCL,
    JPEG2000Lossless,
    MRImageStorage,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from sqlalchemy import select

from tests.conftest import make_settings
from xdsi.archive import Archive, transcode
from xdsi.archive.lifecycle import archive_status
from xdsi.archive.retrieve import NotAvailable
from xdsi.config import COMPRESS_METHODS, ConfigError, load_settings
from xdsi.index.models import FileCopy, Instance
from xdsi.storage import compress as compression
from xdsi.storage.tiers import sha256_file

METHODS = {"htj2k-lossless": HTJ2KLosslessRPCL, "jpeg2000-lossless": JPEG2000Lossless}


def phantom(rows: int, columns: int, lo: int, hi: int, seed: int, frames: int = 1) -> np.ndarray:
    """A body-like image: ellipses of tissue values with a little noise (what lossless coders see in CT/MR)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:rows, 0:columns]
    out = []
    for f in range(frames):
        img = np.full((rows, columns), lo, dtype=np.int64)
        body = ((yy - rows / 2) / (rows * 0.42)) ** 2 + ((xx - columns / 2) / (columns * 0.36)) ** 2 <= 1
        img[body] = lo + (hi - lo) * 0.5
        organ = ((yy - rows * 0.45) / (rows * 0.12)) ** 2 + ((xx - columns * (0.4 + 0.02 * f)) / (columns * 0.1)) ** 2 <= 1
        img[organ] = lo + (hi - lo) * 0.6
        bone = ((yy - rows * 0.7) / (rows * 0.05)) ** 2 + ((xx - columns / 2) / (columns * 0.05)) ** 2 <= 1
        img[bone] = hi - 1
        img[body] += rng.integers(-12, 13, size=int(body.sum()))
        out.append(np.clip(img, lo, hi - 1))
    return np.stack(out) if frames > 1 else out[0]


def _instance(study: str, sop_class: str, modality: str, **px: Any) -> Dataset:
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, generate_uid()
    ds.PatientID, ds.PatientName, ds.Modality, ds.StudyDate = "TIERZ", "SQUEEZE^ME", modality, "20260101"
    for k, v in px.items():
        setattr(ds, k, v)
    return ds


def _pixels(ds: Dataset, arr: np.ndarray, bits_stored: int, signed: bool, photometric: str, planar: int | None = None) -> Dataset:
    ds.Rows, ds.Columns = arr.shape[-3:-1] if arr.ndim >= 3 and photometric == "RGB" else arr.shape[-2:]
    ds.SamplesPerPixel = 3 if photometric == "RGB" else 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 8 if arr.dtype.itemsize == 1 else 16
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits_stored, bits_stored - 1, int(signed)
    if photometric == "RGB":
        ds.PlanarConfiguration = planar or 0
        ds.PixelData = (arr.transpose(2, 0, 1) if planar else arr).tobytes()
    else:
        if arr.ndim == 3:
            ds.NumberOfFrames = arr.shape[0]
        ds.PixelData = arr.tobytes()
    return ds


def study_files(tmp: Path) -> dict[str, Path]:
    """CT, MR, RGB, 12-bit multi-frame, SR and an RLE image of one study, as Part 10 files."""
    study = generate_uid()
    out: dict[str, Dataset] = {}
    out["ct"] = _pixels(_instance(study, CTImageStorage, "CT"), phantom(512, 512, -1024, 3072, 1).astype("<i2"), 16, True, "MONOCHROME2")
    out["mr"] = _pixels(_instance(study, MRImageStorage, "MR"), phantom(256, 256, 0, 4096, 2).astype("<u2"), 12, False, "MONOCHROME2")
    rgb = np.stack([phantom(120, 160, 0, 256, s) for s in (3, 4, 5)], axis=-1).astype("u1")
    out["rgb"] = _pixels(_instance(study, SecondaryCaptureImageStorage, "OT"), rgb, 8, False, "RGB", planar=1)
    out["mf12"] = _pixels(_instance(study, CTImageStorage, "CT"), phantom(64, 80, 0, 4096, 6, frames=4).astype("<u2"), 12, False, "MONOCHROME2")
    sr = _instance(study, BasicTextSRStorage, "SR")
    sr.ValueType, sr.ContinuityOfContent = "CONTAINER", "SEPARATE"
    out["sr"] = sr
    rle = _pixels(_instance(study, CTImageStorage, "CT"), phantom(64, 64, 0, 4096, 7).astype("<u2"), 16, False, "MONOCHROME2")
    rle.compress(RLELossless, generate_instance_uid=False)
    out["rle"] = rle
    paths = {}
    tmp.mkdir(parents=True, exist_ok=True)
    for name, ds in out.items():
        p = tmp / f"{name}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths[name] = p
    return paths


def two_tiers(tmp_path: Path, index_url: str, method: str | None, **storage: Any) -> Archive:
    s = make_settings(tmp_path, index_url, tiers=2)
    assert s.storage is not None
    cache, warm = s.storage.tiers
    st = dataclasses.replace(s.storage, tiers=(cache, dataclasses.replace(warm, compress=method)), **storage)
    return Archive.open(dataclasses.replace(s, storage=st))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return study_files(tmp_path_factory.mktemp("in"))


def _study_pk(a: Archive, sop: str) -> int:
    from xdsi.index.models import Series

    with a.index.read_session() as s:
        return int(s.scalar(select(Series.study_fk).join(Instance, Instance.series_fk == Series.pk).where(Instance.sop_instance_uid == sop)))


def _rows(a: Archive) -> dict[str, tuple[str, list[tuple[str, str, int, int | None, str]]]]:
    """SOP Instance UID -> (instance syntax, [(tier, copy syntax, size, original size, rel path)])."""
    out: dict[str, tuple[str, list[Any]]] = {}
    with a.index.read_session() as s:
        for inst in s.scalars(select(Instance)):
            out[inst.sop_instance_uid] = (
                inst.transfer_syntax_uid,
                [(c.tier, c.transfer_syntax_uid, c.size, c.original_size, c.rel_path) for c in inst.copies],
            )
    return out


@pytest.mark.parametrize("method", sorted(METHODS))
def test_migration_compresses_images_and_recall_gives_the_pixels_back(
    method: str, tmp_path: Path, index_url: str, files: dict[str, Path]
) -> None:
    target = METHODS[method]
    a = two_tiers(tmp_path, index_url, method)
    try:
        uids = {name: str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for name, p in files.items()}
        for p in files.values():
            assert a.store.store_file(p).ok
        report = a.policy.move_study(_study_pk(a, uids["ct"]), "cache", "warm")
        assert report.errors == []
        assert report.moved_files == 6 and report.compressed_files == 4
        assert report.unchanged == {"no pixel data": 1, "already compressed": 1}
        rows = _rows(a)
        warm = a.tiers["warm"]
        for name, uid in uids.items():
            ts, copies = rows[uid]
            assert [c[0] for c in copies] == ["warm"]  # the original copy is gone from the cache
            stored = dcmread(warm.abspath(copies[0][4]), stop_before_pixels=True)
            assert str(stored.file_meta.TransferSyntaxUID) == ts == copies[0][1]  # file, instance row, copy row agree
            if name in ("sr", "rle"):
                assert ts == str(dcmread(files[name], stop_before_pixels=True).file_meta.TransferSyntaxUID)
                assert copies[0][3] is None and copies[0][2] == files[name].stat().st_size
            else:
                assert ts == target
                assert copies[0][3] == files[name].stat().st_size  # original size recorded
                assert copies[0][2] == warm.abspath(copies[0][4]).stat().st_size
                assert sha256_file(warm.abspath(copies[0][4]))[1] == _sha(a, uid, "warm")
        for name in ("ct", "mr"):
            _, copies = rows[uids[name]]
            assert copies[0][2] * 1.5 < copies[0][3], f"{name} should compress at least 1.5x losslessly"
        st = archive_status(a.index, a.tiers)
        assert st.tier_compressed["warm"] == 4
        assert st.tier_saved["warm"] == report.bytes_before - report.bytes_after > 0
        # recall (first read from the cold tier copies to the hot one): the pixels as sent in
        refs = {r.sop_instance_uid: r for r in a.retrieve.select(sop_uids=list(uids.values()))}
        for name, uid in uids.items():
            path = a.retrieve.path(refs[uid])
            assert path.is_relative_to(a.tiers.hot.root)
            got, want = dcmread(path), dcmread(files[name])
            assert got.SOPInstanceUID == uid and got.PatientID == want.PatientID
            if name != "sr":
                assert np.array_equal(pixel_array(got, raw=True), pixel_array(want, raw=True)), name
                assert np.array_equal(got.pixel_array, want.pixel_array), name
        assert archive_status(a.index, a.tiers).tier_compressed["cache"] == 4  # the recalled copies keep their original size
        # every retrieve path chooses by the instance's syntax: the stored one unchanged, or converted on request
        ct = a.retrieve.select(sop_uids=[uids["ct"]])[0]
        with a.retrieve.produce(ct, [target]) as p:
            assert p.unchanged and p.transfer_syntax == target
        with a.retrieve.produce(ct, [ExplicitVRLittleEndian]) as p:
            assert not p.unchanged
            assert np.array_equal(dcmread(p.file_path()).pixel_array, dcmread(files["ct"]).pixel_array)
    finally:
        a.close()


def _sha(a: Archive, uid: str, tier: str) -> str:
    with a.index.read_session() as s:
        return str(
            s.scalar(select(FileCopy.sha256).join(Instance, FileCopy.instance_fk == Instance.pk).where(Instance.sop_instance_uid == uid, FileCopy.tier == tier))
        )


def test_original_stays_indexed_and_on_disk_until_verified(
    tmp_path: Path, index_url: str, files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    a = two_tiers(tmp_path, index_url, "htj2k-lossless")
    try:
        for name in ("ct", "mr"):
            assert a.store.store_file(files[name]).ok
        seen: list[tuple[str, bool, list[str]]] = []
        real_verify = compression.verify

        def watching(original: Path, compressed: Path, target: str) -> None:
            uid = str(dcmread(original, stop_before_pixels=True).SOPInstanceUID)
            seen.append((uid, original.is_file(), [c[0] for c in _rows(a)[uid][1]]))
            real_verify(original, compressed, target)

        monkeypatch.setattr(compression, "verify", watching)
        uid = str(dcmread(files["ct"], stop_before_pixels=True).SOPInstanceUID)
        assert a.policy.move_study(_study_pk(a, uid), "cache", "warm").compressed_files == 2
        assert len(seen) == 2 and all(exists and tiers == ["cache"] for _, exists, tiers in seen)
        assert all(c[0] == "warm" for _, copies in _rows(a).values() for c in copies)
    finally:
        a.close()


def test_a_corrupt_encode_leaves_the_original_and_is_reported(
    tmp_path: Path, index_url: str, files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An encoder that changes one sample (forced here): verification catches it, nothing moves, the error is reported."""
    a = two_tiers(tmp_path, index_url, "htj2k-lossless")
    try:
        for name in ("ct", "mr"):
            assert a.store.store_file(files[name]).ok
        before = _rows(a)
        real = transcode.write_converted
        ct_uid = str(dcmread(files["ct"], stop_before_pixels=True).SOPInstanceUID)

        def corrupting(path: Path, target: str, out: Any) -> None:
            ds = dcmread(path)
            if ds.SOPInstanceUID == ct_uid:
                arr = ds.pixel_array.copy()
                arr[100, 100] += 1
                ds.PixelData = arr.tobytes()
                bad = tmp_path / "bad.dcm"
                ds.save_as(bad)
                path = bad
            real(path, target, out)

        monkeypatch.setattr(transcode, "write_converted", corrupting)
        report = a.policy.move_study(_study_pk(a, ct_uid), "cache", "warm")
        assert len(report.errors) == 1 and "1 decoded sample(s) differ" in report.errors[0]
        assert report.compressed_files == 1  # the MR went through
        after = _rows(a)
        assert after[ct_uid] == before[ct_uid]  # same syntax, same single copy on the cache
        ct_copy = before[ct_uid][1][0]
        assert a.tiers["cache"].abspath(ct_copy[4]).read_bytes() == files["ct"].read_bytes()
        assert not a.tiers["warm"].abspath(ct_copy[4]).exists()
        assert not list(a.tiers["warm"].tmp.iterdir())  # the rejected compressed file is not left behind
        ref = a.retrieve.select(sop_uids=[ct_uid])[0]
        with a.retrieve.produce(ref, [ExplicitVRLittleEndian]) as p:
            assert p.unchanged and p.file_path().read_bytes() == files["ct"].read_bytes()
    finally:
        a.close()


def test_a_reader_holding_the_old_syntax_is_refused_not_misled(tmp_path: Path, index_url: str, files: dict[str, Path]) -> None:
    """A ref selected before the switch: the cache file is gone, the compressed one is not what the ref says: refused."""
    a = two_tiers(tmp_path, index_url, "htj2k-lossless", recall_on_read=True)
    try:
        assert a.store.store_file(files["mr"]).ok
        uid = str(dcmread(files["mr"], stop_before_pixels=True).SOPInstanceUID)
        stale = a.retrieve.select(sop_uids=[uid])[0]
        assert stale.transfer_syntax_uid == ExplicitVRLittleEndian
        assert a.policy.move_study(_study_pk(a, uid), "cache", "warm").compressed_files == 1
        with pytest.raises(NotAvailable, match="since it was selected"):
            a.retrieve.produce(stale, [ExplicitVRLittleEndian])
        fresh = a.retrieve.select(sop_uids=[uid])[0]
        with a.retrieve.produce(fresh, [ExplicitVRLittleEndian]) as p:
            assert np.array_equal(dcmread(p.file_path()).pixel_array, dcmread(files["mr"]).pixel_array)
    finally:
        a.close()


def test_a_recall_of_the_old_bytes_after_the_switch_is_not_recorded(tmp_path: Path, index_url: str, files: dict[str, Path]) -> None:
    """Three tiers, the last compressing: a reader that selected the instance on the middle tier recalls the
    old file after the switch committed (the file read before its deletion): no hot copy is recorded."""
    s = make_settings(tmp_path, index_url, tiers=3)
    assert s.storage is not None
    cache, warm, cold = s.storage.tiers
    a = Archive.open(dataclasses.replace(s, storage=dataclasses.replace(s.storage, tiers=(cache, warm, dataclasses.replace(cold, compress="htj2k-lossless")))))
    try:
        assert a.store.store_file(files["mr"]).ok
        uid = str(dcmread(files["mr"], stop_before_pixels=True).SOPInstanceUID)
        assert a.policy.move_study(_study_pk(a, uid), "cache", "warm").moved_files == 1
        stale = a.retrieve.select(sop_uids=[uid])[0]
        _, rel, _, sha = stale.copies[0]
        old_bytes = a.tiers["warm"].abspath(rel).read_bytes()
        assert a.policy.move_study(_study_pk(a, uid), "warm", "cold").compressed_files == 1
        a.tiers["warm"].place_stream(io.BytesIO(old_bytes), rel)  # the old file as the slow reader still has it
        assert a.retrieve._recall(stale, a.tiers["warm"], rel, sha) is None
        assert [c[0] for c in _rows(a)[uid][1]] == ["cold"]
        assert not a.tiers.hot.abspath(rel).exists()
    finally:
        a.close()


def test_copies_elsewhere_keep_the_instance_unchanged(tmp_path: Path, index_url: str, files: dict[str, Path]) -> None:
    """An instance with a copy on another tier moves unchanged: every copy keeps the instance's one syntax."""
    s = make_settings(tmp_path, index_url, tiers=3)
    assert s.storage is not None
    cache, warm, cold = s.storage.tiers
    a = Archive.open(dataclasses.replace(s, storage=dataclasses.replace(s.storage, tiers=(cache, warm, dataclasses.replace(cold, compress="htj2k-lossless")))))
    try:
        assert a.store.store_file(files["ct"]).ok
        uid = str(dcmread(files["ct"], stop_before_pixels=True).SOPInstanceUID)
        a.policy.move_study(_study_pk(a, uid), "cache", "warm")
        a.retrieve.path(a.retrieve.select(sop_uids=[uid])[0])  # recall: copies on cache and warm
        report = a.policy.move_study(_study_pk(a, uid), "warm", "cold")
        assert report.compressed_files == 0 and report.unchanged == {f"copies on other tiers are {ExplicitVRLittleEndian}": 1}
        ts, copies = _rows(a)[uid]
        assert ts == ExplicitVRLittleEndian and sorted(c[0] for c in copies) == ["cache", "cold"]
        assert {c[1] for c in copies} == {ExplicitVRLittleEndian}
    finally:
        a.close()


@pytest.mark.parametrize("method", sorted(METHODS))
def test_compress_on_receive(method: str, tmp_path: Path, index_url: str, files: dict[str, Path]) -> None:
    a = two_tiers(tmp_path, index_url, None, compress_on_receive=method)
    try:
        for p in files.values():
            assert a.store.store_file(p).ok
        rows = _rows(a)
        for name, p in files.items():
            want = dcmread(p)
            ts, copies = rows[str(want.SOPInstanceUID)]
            assert [c[0] for c in copies] == ["cache"]
            stored = dcmread(a.tiers.hot.abspath(copies[0][4]))
            assert str(stored.file_meta.TransferSyntaxUID) == ts
            if name in ("sr", "rle"):
                assert ts == want.file_meta.TransferSyntaxUID and copies[0][3] is None
            else:
                assert ts == METHODS[method] and copies[0][3] == p.stat().st_size
                assert np.array_equal(pixel_array(stored, raw=True), pixel_array(want, raw=True))
        # the WADO-RS metadata comes from the stored file: planar configuration as stored, pixel data OB
        ref = a.retrieve.select(sop_uids=[str(dcmread(files["rgb"]).SOPInstanceUID)])[0]
        (_, text), = a.metadata.series_json([ref])
        assert '"00280006":{"vr":"US","Value":[0]}' in text and '"7FE00010":{"vr":"OB"' in text
    finally:
        a.close()


def test_config(tmp_path: Path) -> None:
    cfg = tmp_path / "x.toml"
    cfg.write_text(
        '[storage]\ncompress_on_receive = "jpeg2000-lossless"\n'
        '[[storage.tiers]]\nname = "hot"\npath = "hot"\nmigrate_after_days = 30\n'
        '[[storage.tiers]]\nname = "archive"\npath = "archive"\ncompress = "htj2k-lossless"\n'
    )
    s = load_settings(cfg)
    assert s.effective_storage.compress_on_receive == "jpeg2000-lossless"
    assert [t.compress for t in s.effective_storage.tiers] == [None, "htj2k-lossless"]
    assert COMPRESS_METHODS == {"jpeg2000-lossless": JPEG2000Lossless, "htj2k-lossless": HTJ2KLosslessRPCL}
    cfg.write_text('[[storage.tiers]]\nname = "hot"\npath = "hot"\ncompress = "jpeg-lossy"\n')
    with pytest.raises(ConfigError, match="compress must be one of htj2k-lossless, jpeg2000-lossless"):
        load_settings(cfg)
    cfg.write_text('[storage]\ncompress_on_receive = true\n')
    with pytest.raises(ConfigError, match="compress_on_receive"):
        load_settings(cfg)


def test_what_stays_as_it_is(tmp_path: Path) -> None:
    """Deflated data sets are compressed already; a tiny image whose codestream outweighs its pixels is not kept."""
    from pydicom.data import get_testdata_file

    tiny = Path(str(get_testdata_file("SC_rgb_small_odd.dcm")))
    c, why = compression.squeeze(tiny, HTJ2KLosslessRPCL, tmp_path / "tiny.dcm")
    assert c is None and why.startswith("no saving") and not (tmp_path / "tiny.dcm").exists()
    deflated = Path(str(get_testdata_file("image_dfl.dcm")))
    assert compression.squeeze(deflated, HTJ2KLosslessRPCL, tmp_path / "d.dcm") == (None, "already compressed (Deflated Explicit VR Little Endian)")
    ct = Path(str(get_testdata_file("CT_small.dcm")))
    c, why = compression.squeeze(ct, JPEG2000Lossless, tmp_path / "ct.dcm")
    assert c is not None and why == "" and c.size < c.original_size == ct.stat().st_size


def test_partition_config(tmp_path: Path) -> None:
    cfg = tmp_path / "x.toml"
    cfg.write_text(
        '[partitions.RESEARCH]\ncompress_on_receive = "htj2k-lossless"\n'
        '[[partitions.RESEARCH.tiers]]\nname = "hot"\npath = "hot"\nmigrate_after_days = 1\n'
        '[[partitions.RESEARCH.tiers]]\nname = "deep"\npath = "deep"\ncompress = "jpeg2000-lossless"\n'
    )
    s = load_settings(cfg, overrides={"data_dir": tmp_path / "data"})
    part = s.partitions["RESEARCH"].resolve(s).effective_storage
    assert part.compress_on_receive == "htj2k-lossless" and [t.compress for t in part.tiers] == [None, "jpeg2000-lossless"]
    assert s.effective_storage.compress_on_receive is None
