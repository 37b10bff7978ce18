"""pydicom's bundled test files, one per stored transfer syntax, given new UIDs, and a C-STORE loader.

The loader sends each file with pynetdicom's chunked sender (the file's own
bytes, in its own transfer syntax), so what the archive holds is exactly what
is on disk here.  Run as ``python -m tests.integration.dimse_corpus HOST PORT
FILE...`` it loads from inside a network namespace.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    RLELossless,
)
from pynetdicom import AE, _config

from xdsi.uids import new_uid

# (pydicom test file, stored transfer syntax)
SOURCES = [
    ("CT_small.dcm", ExplicitVRLittleEndian),
    ("MR_small_implicit.dcm", ImplicitVRLittleEndian),
    ("MR_small_bigendian.dcm", ExplicitVRBigEndian),
    ("image_dfl.dcm", DeflatedExplicitVRLittleEndian),
    ("SC_rgb_dcmtk_+eb+cy+s2.dcm", JPEGBaseline8Bit),  # colour, YBR_FULL_422
    ("MR_small_jp2klossless.dcm", JPEG2000Lossless),
    ("MR_small_RLE.dcm", RLELossless),
]
PATIENT_ID = "SYNTAX01"


@dataclass(frozen=True)
class Item:
    name: str
    path: Path
    sop_uid: str
    sop_class: str
    transfer_syntax: str

    def pixels(self) -> np.ndarray:
        """pydicom's own decode of the original (colour as RGB: pydicom converts YBR by default)."""
        return dcmread(self.path).pixel_array


@dataclass(frozen=True)
class Corpus:
    study_uid: str
    items: tuple[Item, ...]

    def by_sop(self) -> dict[str, Item]:
        return {i.sop_uid: i for i in self.items}

    def by_ts(self, ts: str) -> Item:
        (item,) = [i for i in self.items if i.transfer_syntax == ts]
        return item


def make_corpus(root: Path) -> Corpus:
    """One study, one series per file, new UIDs; every file keeps its transfer syntax."""
    root.mkdir(parents=True, exist_ok=True)
    study = new_uid()
    items = []
    for n, (name, ts) in enumerate(SOURCES, start=1):
        ds = dcmread(get_testdata_file(name))
        assert ds.file_meta.TransferSyntaxUID == ts, (name, ds.file_meta.TransferSyntaxUID)
        sop = new_uid()
        ds.PatientID = PATIENT_ID
        ds.PatientName = "SYNTAX^TEST"
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = new_uid()
        ds.SeriesNumber = n
        ds.SOPInstanceUID = sop
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        out = root / f"{n:02d}-{Path(name).stem}.dcm"
        ds.save_as(out, enforce_file_format=True)
        check = dcmread(out, stop_before_pixels=True)
        assert check.file_meta.TransferSyntaxUID == ts and check.SOPInstanceUID == sop
        items.append(Item(name, out, sop, str(ds.SOPClassUID), ts))
    return Corpus(study, tuple(items))


def store(host: str, port: int, files: list[Path], called: str = "XDSI") -> list[int]:
    """C-STORE each file as it is on disk (one context per SOP class and stored syntax); the statuses."""
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        ae = AE(ae_title="LOADER")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        pairs = set()
        for f in files:
            meta = dcmread(f, stop_before_pixels=True).file_meta
            pairs.add((str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)))
        for sop_class, ts in sorted(pairs):
            ae.add_requested_context(sop_class, [ts])
        assoc = ae.associate(host, port, ae_title=called)
        if not assoc.is_established:
            raise RuntimeError(f"association with {host}:{port} failed")
        try:
            return [int(assoc.send_c_store(f).Status) for f in files]
        finally:
            assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous


if __name__ == "__main__":
    statuses = store(sys.argv[1], int(sys.argv[2]), [Path(p) for p in sys.argv[3:]])
    print(" ".join(f"{s:04X}" for s in statuses))
    sys.exit(0 if all(s == 0 for s in statuses) else 1)
