"""A store never replaces a file already at the instance's path (issue 14: concurrent stores of one instance).

Two associations sending the same instance at once both find it not yet
indexed and both place it.  When the second placement replaced the first
file and then lost the index race, it deleted "its" copy: the path the
winner had indexed and acknowledged.  Now the second copy goes beside it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import select

from xdsi.archive import Archive
from xdsi.archive.store import Outcome
from xdsi.index.models import FileCopy
from xdsi.storage.tiers import instance_path, sha256_file
from xdsi.tools.synth import StudySpec, write_study


def _copies(archive: Archive) -> list[FileCopy]:
    with archive.index.session() as s:
        return list(s.scalars(select(FileCopy)))


def test_a_file_in_the_way_is_kept_and_the_instance_stored_beside_it(archive: Archive, tmp_path: Path) -> None:
    (f,) = write_study(tmp_path / "in", StudySpec(patient_id="PL-1"), series=1, per_series=1)
    ds = dcmread(f, stop_before_pixels=True)
    in_the_way = archive.tiers.hot.abspath(instance_path(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID))
    in_the_way.parent.mkdir(parents=True)
    in_the_way.write_bytes(b"placed by another store, not yet indexed")
    r = archive.store.store_file(f)
    assert r.outcome is Outcome.STORED, r.reason
    assert in_the_way.read_bytes() == b"placed by another store, not yet indexed"
    (copy,) = _copies(archive)
    stored = archive.tiers[copy.tier].abspath(copy.rel_path)
    assert stored != in_the_way and stored.parent == in_the_way.parent
    assert stored.read_bytes() == f.read_bytes() and sha256_file(stored) == (copy.size, copy.sha256)


def test_the_loser_of_a_store_race_does_not_delete_the_winners_copy(
    archive: Archive, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second store of an instance checked before the first committed (its duplicate check is stale):
    it places its copy, loses at the index, removes its own copy, and the first copy is intact."""
    (f,) = write_study(tmp_path / "in", StudySpec(patient_id="PL-2"), series=1, per_series=1)
    assert archive.store.store_file(f).outcome is Outcome.STORED
    (winner,) = _copies(archive)
    monkeypatch.setattr(archive.store, "_archived", lambda uid: False)  # as if it had looked before the commit
    second = tmp_path / "second.dcm"
    second.write_bytes(f.read_bytes())
    r = archive.store.store_file(second)
    assert r.outcome is Outcome.DUPLICATE
    assert [(c.rel_path, c.sha256) for c in _copies(archive)] == [(winner.rel_path, winner.sha256)]
    path = archive.tiers[winner.tier].abspath(winner.rel_path)
    assert path.is_file() and sha256_file(path) == (winner.size, winner.sha256)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # the loser's copy is gone
