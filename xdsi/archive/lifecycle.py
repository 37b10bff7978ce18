"""The tier policy: moving studies down the tiers, and the status report.

A study moves from tier *i* to tier *i+1* when

* it has not been read on tier *i* for ``migrate_after_days``, or
* tier *i* holds more than its ``high_watermark`` bytes: least recently read
  studies move until the tier is under its ``low_watermark``.

Each copy moves as: copy, verify the SHA-256 against the index, record the new
copy, remove the old copy's row, then delete the old file.  A crash at any
point leaves at least one indexed, verified copy.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy import delete, func, select

from xdsi.index.catalog import utcnow
from xdsi.index.db import Index
from xdsi.index.models import FileCopy, Instance, Patient, Series, Study
from xdsi.storage.tiers import ChecksumMismatch, Tier, TierSet

log = logging.getLogger(__name__)


@dataclass
class MigrationReport:
    moved_studies: int = 0
    moved_files: int = 0
    moved_bytes: int = 0
    errors: list[str] = field(default_factory=list)


def _study_copies(s, study_pk: int, tier: str) -> list[FileCopy]:  # type: ignore[no-untyped-def]
    return list(
        s.scalars(
            select(FileCopy)
            .join(Instance, FileCopy.instance_fk == Instance.pk)
            .join(Series, Instance.series_fk == Series.pk)
            .where(Series.study_fk == study_pk, FileCopy.tier == tier)
        )
    )


class TierPolicy:
    def __init__(self, index: Index, tiers: TierSet) -> None:
        self.index = index
        self.tiers = tiers

    def tier_bytes(self) -> dict[str, int]:
        with self.index.session() as s:
            rows = s.execute(select(FileCopy.tier, func.coalesce(func.sum(FileCopy.size), 0)).group_by(FileCopy.tier)).all()
        used = {t.name: 0 for t in self.tiers}
        used.update({name: int(n) for name, n in rows})
        return used

    def _studies_by_last_read(self, tier: str) -> list[tuple[int, object, int]]:
        """(study pk, last read on this tier, bytes on this tier), least recently read first."""
        with self.index.session() as s:
            rows = s.execute(
                select(Series.study_fk, func.max(FileCopy.last_read_at), func.sum(FileCopy.size))
                .join(Instance, FileCopy.instance_fk == Instance.pk)
                .join(Series, Instance.series_fk == Series.pk)
                .where(FileCopy.tier == tier)
                .group_by(Series.study_fk)
                .order_by(func.max(FileCopy.last_read_at), Series.study_fk)
            ).all()
        return [(int(pk), last, int(size)) for pk, last, size in rows]

    def run_once(self) -> MigrationReport:
        report = MigrationReport()
        now = utcnow()
        for src in self.tiers.tiers[:-1]:
            dst = self.tiers.next_after(src.name)
            assert dst is not None
            cfg = src.settings
            candidates = self._studies_by_last_read(src.name)
            chosen: list[int] = []
            if cfg.migrate_after_days is not None:
                cutoff = now - timedelta(days=cfg.migrate_after_days)
                for pk, last, _size in candidates:
                    if last is not None and _aware(last) <= cutoff:
                        chosen.append(pk)
            if cfg.high_watermark is not None and cfg.low_watermark is not None:
                used = self.tier_bytes()[src.name] - sum(sz for pk, _l, sz in candidates if pk in chosen)
                if used > cfg.high_watermark:
                    for pk, _last, size in candidates:
                        if used <= cfg.low_watermark:
                            break
                        if pk not in chosen:
                            chosen.append(pk)
                            used -= size
            for pk in chosen:
                self._move_study(pk, src, dst, report)
        return report

    def _move_study(self, study_pk: int, src: Tier, dst: Tier, report: MigrationReport) -> None:
        with self.index.session() as s:
            copies = [(c.pk, c.instance_fk, c.rel_path, c.size, c.sha256, c.transfer_syntax_uid) for c in _study_copies(s, study_pk, src.name)]
        moved_any = False
        for copy_pk, inst_pk, rel, size, sha, ts in copies:
            try:
                with self.index.session() as s:
                    have = s.scalars(select(FileCopy).where(FileCopy.instance_fk == inst_pk, FileCopy.tier == dst.name)).one_or_none()
                if have is None or not dst.verify(have.rel_path, have.sha256):
                    placed = dst.copy_from(src, rel, sha)
                    with self.index.session() as s:
                        if have is not None:
                            s.execute(delete(FileCopy).where(FileCopy.pk == have.pk))
                        now = utcnow()
                        s.add(
                            FileCopy(
                                instance_fk=inst_pk,
                                tier=dst.name,
                                rel_path=placed.rel_path,
                                size=placed.size,
                                sha256=placed.sha256,
                                transfer_syntax_uid=ts,
                                stored_at=now,
                                last_read_at=now,
                            )
                        )
                with self.index.session() as s:
                    s.execute(delete(FileCopy).where(FileCopy.pk == copy_pk))
                src.delete(rel)
                report.moved_files += 1
                report.moved_bytes += size
                moved_any = True
            except (OSError, ChecksumMismatch) as exc:
                msg = f"{rel}: {src.name} -> {dst.name}: {exc}"
                log.error("migration failed: %s", msg)
                report.errors.append(msg)
        if moved_any:
            report.moved_studies += 1


def _aware(dt):  # type: ignore[no-untyped-def]
    """SQLite hands back naive datetimes even for timezone-aware columns; they were written as UTC."""
    from datetime import timezone

    return dt if dt.tzinfo is not None else dt.replace(tzinfo=timezone.utc)


@dataclass
class ArchiveStatus:
    patients: int
    studies: int
    series: int
    instances: int
    tier_bytes: dict[str, int]
    tier_files: dict[str, int]


def archive_status(index: Index, tiers: TierSet) -> ArchiveStatus:
    with index.session() as s:
        counts = [s.scalar(select(func.count()).select_from(m)) or 0 for m in (Patient, Study, Series, Instance)]
        rows = s.execute(
            select(FileCopy.tier, func.count(), func.coalesce(func.sum(FileCopy.size), 0)).group_by(FileCopy.tier)
        ).all()
    tb = {t.name: 0 for t in tiers}
    tf = {t.name: 0 for t in tiers}
    for name, n, size in rows:
        tb[name] = int(size)
        tf[name] = int(n)
    return ArchiveStatus(*counts, tier_bytes=tb, tier_files=tf)
