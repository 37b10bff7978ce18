"""The storage commitment service on SQLite and PostgreSQL: what may a sender delete?"""

from __future__ import annotations

from pathlib import Path

from pydicom import dcmread
from pydicom.uid import CTImageStorage, MRImageStorage

from xdsi.archive import Archive
from xdsi.archive.commitment import CommitFailure
from xdsi.tools.synth import StudySpec, write_study
from xdsi.uids import new_uid


def test_commitment_checks(archive: Archive, tmp_path: Path) -> None:
    files = write_study(tmp_path / "in", StudySpec(), series=1, per_series=3)
    for f in files:
        assert archive.store.store_file(f).ok
    a, b, c = (str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files)
    # the file of c vanishes from disk behind the index's back: not durable, not committed
    (ref,) = archive.retrieve.select(sop_uids=[c])
    tier, rel, _size, _sha = ref.copies[0]
    archive.tiers[tier].abspath(rel).unlink()
    unknown = new_uid()
    asked = [(CTImageStorage, a), (MRImageStorage, b), (CTImageStorage, c), (CTImageStorage, unknown), (CTImageStorage, "1.2.x")]
    got = archive.commitment.check(asked)
    assert [(g.sop_class_uid, g.sop_instance_uid) for g in got] == asked
    assert [g.failure for g in got] == [
        None,
        CommitFailure.CLASS_CONFLICT,
        CommitFailure.NOT_DURABLE,
        CommitFailure.NO_SUCH_INSTANCE,
        CommitFailure.NO_SUCH_INSTANCE,
    ]
    assert got[0].committed and not got[1].committed
