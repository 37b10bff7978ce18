"""``content.pixel_info`` keeps each file's pixel layout, and a file replaced at the same path is read afresh.

A frame served from a stale layout would be the wrong pixels: the cache key is the
file's identity (path, inode, size, mtime), so replacing the file (a new inode, as
the archive's atomic renames make) or rewriting it in place gives a new key.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import ExplicitVRLittleEndian

from xdsi.archive import content
from xdsi.tools.synth import StudySpec, write_study


def _instance(folder: Path, rows: int, frames: int) -> Path:
    [p] = write_study(folder, StudySpec(), series=1, per_series=1, rows=rows, columns=rows)
    ds = pydicom.dcmread(p)
    ds.NumberOfFrames = frames
    ds.PixelData = np.arange(rows * rows * frames, dtype="<u2").tobytes()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(p, enforce_file_format=True)
    return p


def test_replaced_or_rewritten_file_is_parsed_again(tmp_path: Path) -> None:
    target = _instance(tmp_path / "a", 8, 1)
    first = content.pixel_info(target)
    assert (first.rows, first.frames) == (8, 1)
    assert content.pixel_info(target) is first  # kept

    replacement = _instance(tmp_path / "b", 16, 3)
    os.replace(replacement, target)  # what a re-stored instance's atomic rename does: a new inode at the same path
    second = content.pixel_info(target)
    assert (second.rows, second.frames) == (16, 3)
    frames = list(content.stored_frames(target, [3]))
    assert frames == [np.arange(16 * 16 * 3, dtype="<u2").tobytes()[2 * 512 :]]

    data = target.read_bytes()
    with open(target, "r+b") as fh:  # rewritten in place (same inode): size or mtime differ
        fh.write(data + b"\0\0")
    os.utime(target, ns=(os.stat(target).st_atime_ns, os.stat(target).st_mtime_ns + 1_000_000))
    assert content.pixel_info(target) is not second
