"""The store path parses each instance once: header checks and the metadata journal share one parse.

The journal line built from the store path's own parse (bulk values never read) must be the very
text that parsing the stored file gives (:func:`instance_json`), for every pydicom test file the
store accepts: every transfer syntax, implicit VR, big endian, deflated, files without a preamble,
sequences, private elements.  And the header parse must not load Pixel Data to check it.
"""

from __future__ import annotations

import gzip
import shutil
import warnings
from pathlib import Path
from typing import Iterator

import pydicom.data
import pytest
from pydicom import dcmread
from pydicom.dataelem import RawDataElement

from tests.conftest import make_settings
from xdsi.archive import Archive
from xdsi.archive.header import read_header_dataset, raw_elements
from xdsi.archive.metadata import instance_json
from xdsi.archive.store import Outcome
from xdsi.uids import new_uid

TEST_FILES = sorted(p for p in (Path(pydicom.data.__file__).parent / "test_files").rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Archive, list[tuple[Path, str, str, str]]]]:
    """Every pydicom test file the store accepts (a few share SOP Instance UIDs: the first is kept): (source, study, series, sop)."""
    tmp = tmp_path_factory.mktemp("parse-once")
    archive = Archive.open(make_settings(tmp))
    accepted: list[tuple[Path, str, str, str]] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, src in enumerate(TEST_FILES):
            copy = tmp / "in" / f"{i:04d}.dcm"
            copy.parent.mkdir(exist_ok=True)
            shutil.copyfile(src, copy)
            result = archive.store.store_file(copy)
            if result.outcome is Outcome.STORED:
                accepted.append((src, result.study_uid, "", result.sop_instance_uid))
    try:
        yield archive, accepted
    finally:
        archive.close()


def _journal_lines(archive: Archive) -> dict[str, str]:
    assert archive.metadata is not None
    lines: dict[str, str] = {}
    for journal in archive.metadata.tier.root.rglob("*.jsonl.gz"):
        with gzip.open(journal, "rt", encoding="utf-8") as fh:
            for raw in fh:
                sop, _sha, text = raw.rstrip("\n").split("\t", 2)
                lines[sop] = text
    return lines


def test_journal_line_is_what_the_stored_file_gives(stored: tuple[Archive, list[tuple[Path, str, str, str]]]) -> None:
    archive, accepted = stored
    assert len(accepted) > 100, "the corpus should exercise many encodings"
    lines = _journal_lines(archive)
    compared = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for src, _study, _series, sop in accepted:
            hits = list(archive.tiers.hot.root.rglob(f"{sop}.dcm"))
            assert len(hits) == 1, sop
            path = hits[0]
            try:
                expected = instance_json(path)
            except Exception:  # pydicom cannot build JSON of this file at all: the journal has no line either
                assert sop not in lines, src.name
                continue
            assert lines.get(sop) == expected, f"{src.name}: journal line differs from the stored file's JSON"
            compared += 1
    assert compared > 100


def test_header_parse_leaves_pixel_data_unread(tmp_path: Path) -> None:
    """A 1 GB whole-slide image must not be loaded to be checked: Pixel Data stays deferred."""
    from xdsi.tools.synth import StudySpec, ct_instance

    ds = ct_instance(StudySpec(), new_uid(), 1, rows=256, columns=256)
    path = tmp_path / "ct.dcm"
    ds.save_as(path, enforce_file_format=True)
    _header, parsed = read_header_dataset(path)
    (pixel,) = [e for e in raw_elements(parsed) if e.tag == 0x7FE00010]
    assert isinstance(pixel, RawDataElement) and pixel.value is None and pixel.length == 256 * 256 * 2
    # and the checks still see a file cut inside Pixel Data
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(path.read_bytes()[:-1000])
    from xdsi.archive.header import InvalidDataset

    with pytest.raises(InvalidDataset, match="truncated"):
        read_header_dataset(cut)
    assert dcmread(path).pixel_array.shape == (256, 256)
