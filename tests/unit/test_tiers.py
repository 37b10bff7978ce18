"""Tier migration and recall on a three-tier archive, on SQLite and PostgreSQL.

Reads are aged by moving ``FileCopy.last_read_at`` back in the index, which is
exactly the clock the policy uses; files are really copied, verified and
deleted on disk.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator

import pytest
from sqlalchemy import select, update

from tests.conftest import make_settings
from xdsi.archive import Archive
from xdsi.archive.retrieve import NotAvailable
from xdsi.archive.store import Outcome
from xdsi.cli import _human
from xdsi.config import Settings
from xdsi.index.catalog import utcnow
from xdsi.index.models import FileCopy, Instance, Series, Study
from xdsi.storage.tiers import sha256_file
from xdsi.tools.synth import StudySpec, write_study


def tiered(tmp_path: Path, index_url: str, recall_on_read: bool = True, **per_tier: dict[str, Any]) -> Settings:
    """Three tiers (cache, warm, cold) with the given policy settings per tier name."""
    s = make_settings(tmp_path, index_url, tiers=3, recall_on_read=recall_on_read)
    assert s.storage is not None
    tiers = tuple(dataclasses.replace(t, **per_tier.get(t.name, {})) for t in s.storage.tiers)
    return dataclasses.replace(s, storage=dataclasses.replace(s.storage, tiers=tiers))


@pytest.fixture
def open_archive(tmp_path: Path, index_url: str) -> Iterator[Any]:
    opened: list[Archive] = []

    def _open(recall_on_read: bool = True, **per_tier: dict[str, Any]) -> Archive:
        a = Archive.open(tiered(tmp_path, index_url, recall_on_read, **per_tier))
        opened.append(a)
        return a

    yield _open
    for a in opened:
        a.close()


def add_study(a: Archive, tmp: Path, n: int = 3, **spec: Any) -> str:
    st = StudySpec(**spec)
    for f in write_study(tmp / st.study_uid, st, per_series=n, rows=32, columns=32):
        assert a.store.store_file(f).outcome is Outcome.STORED
    return st.study_uid


def copies(a: Archive, study_uid: str) -> list[FileCopy]:
    with a.index.session() as s:
        return list(
            s.scalars(
                select(FileCopy)
                .join(Instance, FileCopy.instance_fk == Instance.pk)
                .join(Series, Instance.series_fk == Series.pk)
                .join(Study, Series.study_fk == Study.pk)
                .where(Study.study_uid == study_uid)
                .order_by(FileCopy.pk)
            )
        )


def tiers_of(a: Archive, study_uid: str) -> set[str]:
    return {c.tier for c in copies(a, study_uid)}


def study_bytes(a: Archive, study_uid: str) -> int:
    return sum(c.size for c in copies(a, study_uid))


def age(a: Archive, study_uid: str, days: float) -> None:
    """Pretend the study was last read ``days`` ago."""
    pks = [c.pk for c in copies(a, study_uid)]
    with a.index.session() as s:
        s.execute(update(FileCopy).where(FileCopy.pk.in_(pks)).values(last_read_at=utcnow() - timedelta(days=days)))


def flip_last_byte(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 0xFF])


def files_on(a: Archive, tier: str) -> set[str]:
    root = a.tiers[tier].root
    return {p.relative_to(root).as_posix() for p in root.rglob("*.dcm") if ".tmp" not in p.parts}


def assert_consistent(a: Archive) -> None:
    """Every indexed copy exists with its recorded checksum, and no file is unindexed."""
    with a.index.session() as s:
        rows = list(s.scalars(select(FileCopy)))
    for c in rows:
        assert sha256_file(a.tiers[c.tier].abspath(c.rel_path)) == (c.size, c.sha256), c.rel_path
    for t in a.tiers:
        assert files_on(a, t.name) == {c.rel_path for c in rows if c.tier == t.name}, t.name


# -- age -----------------------------------------------------------------------------------------


def test_age_based_migration(open_archive: Any, tmp_path: Path) -> None:
    a = open_archive(cache={"migrate_after_days": 30}, warm={"migrate_after_days": 365})
    old = add_study(a, tmp_path, n=3)
    new = add_study(a, tmp_path, n=2)
    age(a, old, 40)
    age(a, new, 5)
    size = study_bytes(a, old)
    plan = a.policy.plan()
    assert [(m.study_uid, m.source, m.target, m.files, m.size, m.reason) for m in plan] == [
        (old, "cache", "warm", 3, size, "age")
    ]
    report = a.policy.run_once()
    assert (report.moved_studies, report.moved_files, report.moved_bytes, report.errors) == (1, 3, size, [])
    assert tiers_of(a, old) == {"warm"}
    assert tiers_of(a, new) == {"cache"}
    assert_consistent(a)
    # the read clock travels with the data: 40 days on warm is not yet a year
    assert all(utcnow() - timedelta(days=41) < _aware(c.last_read_at) < utcnow() - timedelta(days=39) for c in copies(a, old))
    again = a.policy.run_once()
    assert (again.moved_studies, again.errors) == (0, [])
    assert a.policy.plan() == []


def test_old_study_passes_down_every_due_tier_in_one_run(open_archive: Any, tmp_path: Path) -> None:
    a = open_archive(cache={"migrate_after_days": 1}, warm={"migrate_after_days": 10})
    uid = add_study(a, tmp_path, n=2)
    age(a, uid, 100)
    report = a.policy.run_once()
    assert report.errors == [] and report.moved_files == 4  # cache -> warm, then warm -> cold
    assert tiers_of(a, uid) == {"cold"}
    assert_consistent(a)


def test_study_read_recently_stays(open_archive: Any, tmp_path: Path) -> None:
    a = open_archive(cache={"migrate_after_days": 30})
    uid = add_study(a, tmp_path, n=3)
    age(a, uid, 40)
    ref = a.retrieve.select(study_uids=[uid])[1]
    a.retrieve.path(ref)  # one instance read today keeps the whole study hot
    assert a.policy.plan() == []
    assert a.policy.run_once().moved_files == 0
    assert tiers_of(a, uid) == {"cache"}


# -- watermarks ----------------------------------------------------------------------------------


def test_watermark_migration_least_recently_read_first(open_archive: Any, tmp_path: Path) -> None:
    a = open_archive()
    uids = [add_study(a, tmp_path, n=2) for _ in range(4)]
    for days, uid in zip((4, 3, 2, 1), uids):  # uids[0] least recently read
        age(a, uid, days)
    sizes = [study_bytes(a, u) for u in uids]
    total = sum(sizes)
    a.close()
    # over the high mark by a little; the low mark needs two studies to go
    a = open_archive(cache={"high_watermark": total - 10, "low_watermark": sizes[2] + sizes[3] + sizes[0] // 2})
    report = a.policy.run_once()
    assert report.errors == []
    assert (report.moved_studies, report.moved_bytes) == (2, sizes[0] + sizes[1])
    assert [tiers_of(a, u) for u in uids] == [{"warm"}, {"warm"}, {"cache"}, {"cache"}]
    assert a.policy.tier_bytes() == {"cache": sizes[2] + sizes[3], "warm": sizes[0] + sizes[1], "cold": 0}
    assert_consistent(a)
    # under the high mark now: nothing more moves
    assert a.policy.run_once().moved_files == 0


def test_under_high_watermark_nothing_moves(open_archive: Any, tmp_path: Path) -> None:
    a = open_archive(cache={"high_watermark": 10**9, "low_watermark": 10**8})
    uid = add_study(a, tmp_path)
    age(a, uid, 1000)
    assert a.policy.run_once().moved_files == 0
    assert tiers_of(a, uid) == {"cache"}


# -- integrity and ordering ----------------------------------------------------------------------


def test_corrupt_source_is_not_migrated(open_archive: Any, tmp_path: Path) -> None:
    a = open_archive(cache={"migrate_after_days": 1})
    uid = add_study(a, tmp_path, n=3)
    age(a, uid, 10)
    bad = copies(a, uid)[1]
    p = a.tiers["cache"].abspath(bad.rel_path)
    data = bytearray(p.read_bytes())
    data[-1] ^= 0xFF  # same size, different bytes: only the checksum can tell
    p.write_bytes(bytes(data))
    report = a.policy.run_once()
    assert report.moved_files == 2
    assert len(report.errors) == 1 and bad.rel_path in report.errors[0] and "sha256" in report.errors[0]
    # the bad copy stays where it was, indexed, and nothing of it reached the warm tier
    left = [c for c in copies(a, uid) if c.tier == "cache"]
    assert [(c.pk, c.rel_path) for c in left] == [(bad.pk, bad.rel_path)]
    assert p.read_bytes() == bytes(data)
    assert bad.rel_path not in files_on(a, "warm")
    assert not any(a.tiers["warm"].tmp.iterdir())
    assert {c.tier for c in copies(a, uid) if c.rel_path != bad.rel_path} == {"warm"}


def test_source_deleted_only_after_index_update(open_archive: Any, tmp_path: Path) -> None:
    a = open_archive(cache={"migrate_after_days": 1})
    uid = add_study(a, tmp_path, n=2)
    age(a, uid, 10)
    cache = a.tiers["cache"]
    real_delete = cache.delete
    seen: list[tuple[str, set[str], bool]] = []

    def spy(rel_path: str) -> None:
        # at the moment the source file goes, the index must already point at the target only
        with a.index.session() as s:
            tiers = set(s.scalars(select(FileCopy.tier).where(FileCopy.rel_path == rel_path)))
        seen.append((rel_path, tiers, a.tiers["warm"].abspath(rel_path).is_file()))
        real_delete(rel_path)

    cache.delete = spy  # type: ignore[method-assign]
    try:
        assert a.policy.run_once().moved_files == 2
    finally:
        cache.delete = real_delete  # type: ignore[method-assign]
    assert len(seen) == 2
    assert all(tiers == {"warm"} and on_warm for _rel, tiers, on_warm in seen), seen
    assert_consistent(a)


# -- recall --------------------------------------------------------------------------------------


def _to_cold(a: Archive, uid: str) -> None:
    age(a, uid, 100)
    assert a.policy.run_once().errors == []
    assert tiers_of(a, uid) == {"cold"}


def test_recall_on_read(open_archive: Any, tmp_path: Path) -> None:
    a = open_archive(cache={"migrate_after_days": 1}, warm={"migrate_after_days": 1})
    uid = add_study(a, tmp_path, n=2)
    _to_cold(a, uid)
    ref = a.retrieve.select(study_uids=[uid])[0]
    assert [c[0] for c in ref.copies] == ["cold"]
    cold_bytes = a.tiers["cold"].abspath(ref.copies[0][1]).read_bytes()
    before = utcnow()
    p = a.retrieve.path(ref)
    assert p.parent.parent.parent == a.tiers["cache"].root.resolve()
    assert p.read_bytes() == cold_bytes
    rows = {c.tier: c for c in copies(a, uid) if c.instance_fk == ref.pk}
    assert set(rows) == {"cache", "cold"}  # the cold copy stays: the hot one is a cache
    assert rows["cache"].sha256 == rows["cold"].sha256 and rows["cache"].size == rows["cold"].size
    assert _aware(rows["cache"].last_read_at) >= before
    assert_consistent(a)
    # the next read is served from the hot tier without another copy
    ref2 = a.retrieve.select(sop_uids=[ref.sop_instance_uid])[0]
    assert [c[0] for c in ref2.copies] == ["cache", "cold"]
    assert a.retrieve.path(ref2) == p
    # a recalled study migrating again drops its redundant hot copy instead of copying it to warm
    age(a, uid, 100)
    report = a.policy.run_once()
    assert report.errors == []
    assert tiers_of(a, uid) == {"cold"}
    assert_consistent(a)


def test_no_recall_serves_from_cold(open_archive: Any, tmp_path: Path) -> None:
    a = open_archive(recall_on_read=False, cache={"migrate_after_days": 1}, warm={"migrate_after_days": 1})
    uid = add_study(a, tmp_path, n=2)
    _to_cold(a, uid)
    ref = a.retrieve.select(study_uids=[uid])[0]
    p = a.retrieve.path(ref)
    assert p == a.tiers["cold"].abspath(ref.copies[0][1])
    assert tiers_of(a, uid) == {"cold"}
    assert files_on(a, "cache") == set()
    # the read still counts: the cold copy's clock moved
    [row] = [c for c in copies(a, uid) if c.instance_fk == ref.pk]
    assert utcnow() - _aware(row.last_read_at) < timedelta(minutes=5)


def test_corrupt_cold_copy_is_never_served(open_archive: Any, tmp_path: Path) -> None:
    a = open_archive(cache={"migrate_after_days": 1}, warm={"migrate_after_days": 1})
    uid = add_study(a, tmp_path, n=1)
    _to_cold(a, uid)
    ref = a.retrieve.select(study_uids=[uid])[0]
    p = a.tiers["cold"].abspath(ref.copies[0][1])
    p.write_bytes(flip_last_byte(p.read_bytes()))
    with pytest.raises(NotAvailable):
        a.retrieve.path(ref)
    assert tiers_of(a, uid) == {"cold"} and files_on(a, "cache") == set()


def test_path_follows_a_migration_that_ran_after_select(open_archive: Any, tmp_path: Path) -> None:
    a = open_archive(recall_on_read=False, cache={"migrate_after_days": 1})
    uid = add_study(a, tmp_path, n=1)
    ref = a.retrieve.select(study_uids=[uid])[0]  # names the cache copy
    age(a, uid, 10)
    assert a.policy.run_once().moved_files == 1
    p = a.retrieve.path(ref)
    assert p == a.tiers["warm"].abspath(ref.copies[0][1])


def _aware(dt):  # type: ignore[no-untyped-def]
    from datetime import timezone

    return dt if dt.tzinfo is not None else dt.replace(tzinfo=timezone.utc)


# -- CLI -----------------------------------------------------------------------------------------


def _xdsi(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "xdsi", *args], capture_output=True, text=True, timeout=120, env={**os.environ}
    )


def test_migrate_and_status_cli(tmp_path: Path, index_url: str) -> None:
    from xdsi.config import load_settings

    store = tmp_path / "tiers"
    cfg = tmp_path / "xdsi.toml"
    cfg.write_text(
        f"""
[server]
data_dir = "{tmp_path / 'data'}"
ae_title = "TIERTEST"

[index]
url = "{index_url}"

[storage]
[[storage.tiers]]
name = "fast"
path = "{store / 'fast'}"
migrate_after_days = 30
high_watermark = "10 GiB"
low_watermark = "8 GiB"

[[storage.tiers]]
name = "slow"
path = "{store / 'slow'}"
migrate_after_days = 365

[[storage.tiers]]
name = "tape"
path = "{store / 'tape'}"
"""
    )
    a = Archive.open(load_settings(cfg, env={}))
    try:
        old = add_study(a, tmp_path, n=3, patient_id="P1")
        new = add_study(a, tmp_path, n=2, patient_id="P2")
        age(a, old, 45)
        old_size, new_size = study_bytes(a, old), study_bytes(a, new)
    finally:
        a.close()

    r = _xdsi("status", "--config", str(cfg))
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "AE title:   TIERTEST" in out
    for line in ("patients:   2", "studies:    2", "series:     2", "instances:  5"):
        assert line in out.splitlines(), out
    tier_lines = {ln.split()[0]: ln for ln in out.splitlines() if ln.startswith("  ")}
    assert f"{_human(old_size + new_size)} in 5 file(s)" in tier_lines["fast"], out
    assert "high 10.0 GiB / low 8.0 GiB" in tier_lines["fast"] and "migrate after 30 days" in tier_lines["fast"]
    assert "0 B in 0 file(s)" in tier_lines["slow"]
    assert f"queued:     1 stud(ies), 3 file(s), {_human(old_size)} due to migrate (fast -> slow: 1)" in out.splitlines(), out

    r = _xdsi("migrate", "--config", str(cfg))
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip() == f"moved 1 stud(ies), 3 file(s), {_human(old_size)}"

    r = _xdsi("status", "--config", str(cfg))
    assert r.returncode == 0, r.stderr
    tier_lines = {ln.split()[0]: ln for ln in r.stdout.splitlines() if ln.startswith("  ")}
    assert f"{_human(new_size)} in 2 file(s)" in tier_lines["fast"]
    assert f"{_human(old_size)} in 3 file(s)" in tier_lines["slow"]
    assert "0 B in 0 file(s)" in tier_lines["tape"]
    assert "queued:     nothing" in r.stdout.splitlines()

    # a corrupt file makes `xdsi migrate` fail loudly and keep the source
    a = Archive.open(load_settings(cfg, env={}))
    try:
        age(a, new, 45)
        bad = copies(a, new)[0]
        p = a.tiers["fast"].abspath(bad.rel_path)
        p.write_bytes(flip_last_byte(p.read_bytes()))
    finally:
        a.close()
    r = _xdsi("migrate", "--config", str(cfg))
    assert r.returncode == 1
    assert r.stdout.strip().startswith("moved 1 stud(ies), 1 file(s)")
    assert "error:" in r.stderr and bad.rel_path in r.stderr
    assert p.is_file()
