"""RetrieveService.hot_path: the hot-tier copy's path for reading ahead, with no recall and no read stamp."""

from __future__ import annotations

import dataclasses
from datetime import datetime, timedelta, timezone
from pathlib import Path

from sqlalchemy import select, update

from xdsi.archive import Archive
from xdsi.config import Settings
from xdsi.index.models import FileCopy
from xdsi.tools.synth import StudySpec, write_study


def test_hot_path_is_paths_file_without_stamping(tmp_path: Path) -> None:
    spec = StudySpec(patient_id="HOT1")
    files = write_study(tmp_path / "in", spec, series=1, per_series=2, rows=8, columns=8)
    archive = Archive.open(Settings(data_dir=tmp_path / "data"))
    try:
        for f in files:
            archive.store.store_file(f, move=False)
        with archive.index.session() as s:  # last read a day ago: the next read is stamped
            s.execute(update(FileCopy).values(last_read_at=datetime.now(timezone.utc) - timedelta(days=1)))
        refs = archive.retrieve.select(study_uids=[spec.study_uid], read_stamps=True)
        assert len(refs) == 2

        def stamps() -> list[object]:
            with archive.index.read_session() as s:
                return list(s.scalars(select(FileCopy.last_read_at).order_by(FileCopy.pk)))

        before = stamps()
        ahead = archive.retrieve.hot_path(refs[0])
        assert ahead is not None and ahead.read_bytes() in (files[0].read_bytes(), files[1].read_bytes())
        assert stamps() == before  # reading ahead is not a read of the study
        assert ahead == archive.retrieve.path(refs[0])  # its turn: the same file, and now stamped
        assert stamps() != before
        elsewhere = dataclasses.replace(refs[1], copies=tuple(("cold", c[1], c[2], c[3]) for c in refs[1].copies))
        assert archive.retrieve.hot_path(elsewhere) is None  # no copy on the hot tier: nothing named, nothing recalled
        missing = dataclasses.replace(refs[1], copies=tuple((c[0], c[1] + ".gone", c[2], c[3]) for c in refs[1].copies))
        assert archive.retrieve.hot_path(missing) is None
    finally:
        archive.close()
