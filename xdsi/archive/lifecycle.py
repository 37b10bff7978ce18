"""The tier policy: moving studies down the tiers, and the status report.

A study moves from tier *i* to tier *i+1* when

* none of its copies on tier *i* has been read for ``migrate_after_days``, or
* tier *i* holds more than its ``high_watermark`` bytes: least recently read
  studies move until the tier is under its ``low_watermark``.

Each copy moves as: copy, verify the SHA-256 against the index, then in one
transaction record the new copy and remove the old copy's row, and only then
delete the old file.  A crash at any point leaves at least one indexed,
verified copy; a copy whose bytes no longer match the index is never moved
(its source stays, the error is reported).

A tier with ``compress`` ("jpeg2000-lossless", "htj2k-lossless") stores the
image instances that move onto it losslessly compressed
(:mod:`xdsi.storage.compress`): the compressed file is decoded and compared
with the original's pixels *before* it is placed, the index then records the
new transfer syntax, size and the size it replaced, and only after that
transaction is the original deleted.  A mismatch keeps the original where it
is and is reported as an error; objects without pixels, already compressed
ones and pixels the encoder does not take move unchanged (counted by reason).
Every copy of an instance holds the same transfer syntax as the index's
instance row (what every retrieve path chooses by), so an instance with copies
on other tiers moves unchanged, and the switch is made with the instance row
locked (the recall path takes the same lock before recording a copy).

The plan (:meth:`TierPolicy.plan`) is computed from the index alone, so
``xdsi status`` can show what the next run would move without touching files.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Callable, Sequence

from sqlalchemy import delete, func, select, update

from xdsi.index.catalog import CopyRecord, add_copy, as_utc, utcnow
from xdsi.index.db import Index
from xdsi.index.models import FileCopy, Instance, Patient, Series, Study
from xdsi.storage import compress as compression
from xdsi.storage.tiers import StorageError, Tier, TierSet

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PlannedMove:
    """One study due to leave a tier, and why."""

    study_pk: int
    study_uid: str
    source: str
    target: str
    files: int
    size: int
    reason: str  # "age" or "watermark"


@dataclass
class MigrationReport:
    moved_studies: int = 0
    moved_files: int = 0
    moved_bytes: int = 0
    errors: list[str] = field(default_factory=list)
    # onto a compressing tier: instances stored compressed, their bytes before and after,
    # and why the others moved unchanged (reason -> count)
    compressed_files: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    unchanged: Counter = field(default_factory=Counter)



@dataclass(frozen=True)
class _Candidate:
    study_pk: int
    study_uid: str
    last_read: datetime
    files: int
    size: int


class TierPolicy:
    def __init__(self, index: Index, tiers: TierSet) -> None:
        self.index = index
        self.tiers = tiers
        # the archive's audit trail (or None), asked at each move; wired by Archive.open.  A move removes the
        # copy from the faster tier and is audited per study (xdsi.audit.lifecycle.migrated)
        self.audit_trail: Callable[[], Any] = lambda: None
        self.audit_actors: Sequence[Any] = ()  # who runs the policy (``xdsi migrate`` names the operator)

    def tier_bytes(self) -> dict[str, int]:
        with self.index.read_session() as s:
            rows = s.execute(select(FileCopy.tier, func.coalesce(func.sum(FileCopy.size), 0)).group_by(FileCopy.tier)).all()
        used = {t.name: 0 for t in self.tiers}
        used.update({name: int(n) for name, n in rows})
        return used

    def _candidates(self, tier: str) -> list[_Candidate]:
        """Studies with copies on ``tier``, least recently read first."""
        last = func.max(FileCopy.last_read_at)
        with self.index.read_session() as s:
            rows = s.execute(
                select(Study.pk, Study.study_uid, last, func.count(FileCopy.pk), func.sum(FileCopy.size))
                .select_from(FileCopy)
                .join(Instance, FileCopy.instance_fk == Instance.pk)
                .join(Series, Instance.series_fk == Series.pk)
                .join(Study, Series.study_fk == Study.pk)
                .where(FileCopy.tier == tier)
                .group_by(Study.pk, Study.study_uid)
                .order_by(last, Study.pk)
            ).all()
        return [_Candidate(int(pk), uid, as_utc(lr), int(n), int(sz)) for pk, uid, lr, n, sz in rows]

    def plan_tier(self, src: Tier, now: datetime | None = None) -> list[PlannedMove]:
        """What should leave ``src`` now, least recently read first."""
        dst = self.tiers.next_after(src.name)
        if dst is None:
            return []
        now = now or utcnow()
        cfg = src.settings
        candidates = self._candidates(src.name)
        chosen: dict[int, PlannedMove] = {}

        def choose(c: _Candidate, reason: str) -> None:
            chosen[c.study_pk] = PlannedMove(c.study_pk, c.study_uid, src.name, dst.name, c.files, c.size, reason)

        if cfg.migrate_after_days is not None:
            cutoff = now - timedelta(days=cfg.migrate_after_days)
            for c in candidates:
                if c.last_read <= cutoff:
                    choose(c, "age")
        if cfg.high_watermark is not None and cfg.low_watermark is not None:
            used = sum(c.size for c in candidates) - sum(m.size for m in chosen.values())
            if used > cfg.high_watermark:
                for c in candidates:
                    if used <= cfg.low_watermark:
                        break
                    if c.study_pk not in chosen:
                        choose(c, "watermark")
                        used -= c.size
        return [m for c in candidates if (m := chosen.get(c.study_pk)) is not None]

    def plan(self) -> list[PlannedMove]:
        """Every move the next run would start with, tier by tier (not counting cascades to lower tiers)."""
        now = utcnow()
        return [m for src in self.tiers.tiers[:-1] for m in self.plan_tier(src, now)]

    def run_once(self) -> MigrationReport:
        """Apply the policy to each tier in turn, fastest first, so a study can pass down several tiers in one run."""
        report = MigrationReport()
        for src in self.tiers.tiers[:-1]:
            for move in self.plan_tier(src):
                self._move_study(move, report)
        return report

    def move_study(self, study_pk: int, source: str, target: str) -> MigrationReport:
        """Move one study's copies from ``source`` to ``target`` now, outside the policy (tests, administration)."""
        report = MigrationReport()
        self._move_study(PlannedMove(study_pk, "", source, target, 0, 0, "manual"), report)
        return report

    def _move_study(self, move: PlannedMove, report: MigrationReport) -> None:
        src, dst = self.tiers[move.source], self.tiers[move.target]
        with self.index.session() as s:
            copies = [
                (c.pk, c.instance_fk, c.rel_path, c.size, c.sha256, c.transfer_syntax_uid, c.last_read_at, c.original_size)
                for c in s.scalars(
                    select(FileCopy)
                    .join(Instance, FileCopy.instance_fk == Instance.pk)
                    .join(Series, Instance.series_fk == Series.pk)
                    .where(Series.study_fk == move.study_pk, FileCopy.tier == src.name)
                    .order_by(FileCopy.pk)
                )
            ]
        trail = self.audit_trail()
        audit = self._audit_subject(move.study_pk, src.name, dst.name) if trail is not None and trail.enabled and copies else None
        moved_any = False
        for copy_pk, inst_pk, rel, size, sha, ts, last_read, original in copies:
            try:
                self._move_copy(src, dst, copy_pk, inst_pk, rel, sha, ts, last_read, original, report)
            except OSError as exc:  # ChecksumMismatch is an OSError too
                msg = f"{rel}: {src.name} -> {dst.name}: {exc}"
                log.error("migration failed, source copy kept: %s", msg)
                report.errors.append(msg)
                if audit is not None:
                    audit[0].errors.append(msg)
                continue
            report.moved_files += 1
            report.moved_bytes += size
            moved_any = True
            if audit is not None:
                audit[0].sop_classes[audit[1].get(inst_pk, "")] += 1
        if moved_any:
            report.moved_studies += 1
        if audit is not None:
            from xdsi.audit.lifecycle import migrated

            migrated(trail, audit[0], self.audit_actors)

    def _audit_subject(self, study_pk: int, source: str, target: str) -> "tuple[Any, dict[int, str]] | None":
        """The study, its patient and the SOP class of each instance, for the audit of a move (auditing on only)."""
        from xdsi.audit.lifecycle import MigratedStudy

        with self.index.read_session() as s:
            row = s.execute(
                select(Study.study_uid, Patient.patient_id).join(Patient, Study.patient_fk == Patient.pk, isouter=True).where(Study.pk == study_pk)
            ).first()
            if row is None:
                return None
            classes = dict(
                s.execute(
                    select(Instance.pk, Instance.sop_class_uid).join(Series, Instance.series_fk == Series.pk).where(Series.study_fk == study_pk)
                ).all()
            )
        return MigratedStudy(str(row[0]), str(row[1] or ""), Counter(), source, target), classes

    def _lower_copy(self, src: Tier, inst_pk: int) -> FileCopy | None:
        """A verified copy of the instance on a tier below ``src`` (left there by an earlier recall), if any."""
        below = self.tiers.tiers[self.tiers.rank(src.name) + 1 :]
        with self.index.read_session() as s:
            have = {c.tier: c for c in s.scalars(select(FileCopy).where(FileCopy.instance_fk == inst_pk))}
        for tier in below:
            c = have.get(tier.name)
            if c is not None and tier.verify(c.rel_path, c.sha256):
                return c
        return None

    def _move_copy(
        self, src: Tier, dst: Tier, copy_pk: int, inst_pk: int, rel: str, sha: str, ts: str, last_read: datetime,
        original: int | None = None, report: MigrationReport | None = None,
    ) -> None:
        report = report if report is not None else MigrationReport()
        new_ts, new_original = ts, original
        # a copy already on a lower tier (left there by a recall) makes this one redundant
        if self._lower_copy(src, inst_pk):
            placed = None
        else:
            squeezed = self._compressed(src, dst, inst_pk, rel, ts, report) if dst.settings.compress else None
            if squeezed is None:
                placed = dst.copy_from(src, rel, sha)  # verified; a bad copy is removed
            else:
                try:
                    placed = dst.place_file(squeezed.path, rel, move=True)
                finally:
                    squeezed.path.unlink(missing_ok=True)
                new_ts, new_original = squeezed.transfer_syntax, squeezed.original_size
        try:
            with self.index.session() as s:
                if new_ts != ts:
                    self._lock_for_new_syntax(s, inst_pk, copy_pk, ts, dst.name)
                if placed is not None:
                    s.execute(delete(FileCopy).where(FileCopy.instance_fk == inst_pk, FileCopy.tier == dst.name))
                    # the read clock travels with the data: a move is not a read
                    record = CopyRecord(dst.name, placed.rel_path, placed.size, placed.sha256, new_ts, new_original)
                    add_copy(s, inst_pk, record, last_read_at=last_read)
                s.execute(delete(FileCopy).where(FileCopy.pk == copy_pk))
                if new_ts != ts:
                    s.execute(update(Instance).where(Instance.pk == inst_pk).values(transfer_syntax_uid=new_ts))
        except StorageError:
            if placed is not None:
                dst.delete(placed.rel_path)
            raise
        if new_ts != ts and placed is not None:
            report.compressed_files += 1
            report.bytes_before += int(new_original or 0)
            report.bytes_after += placed.size
            log.info("%s stored on %s as %s: %s -> %s bytes", rel, dst.name, new_ts, new_original, placed.size)
        # the index no longer points at the source copy: only now may its bytes go
        try:
            src.delete(rel)
        except OSError as exc:
            log.warning("moved %s from %s but could not delete the old file: %s", rel, src.name, exc)

    def _compressed(
        self, src: Tier, dst: Tier, inst_pk: int, rel: str, ts: str, report: MigrationReport
    ) -> "compression.Compressed | None":
        """The source copy compressed for ``dst`` and verified, or None to move it unchanged (reason counted).

        Raises :class:`compression.CompressionMismatch` (an OSError: the caller keeps the source and reports it)
        when the compressed file does not give back the original pixels.
        """
        target = compression.target_syntax(str(dst.settings.compress))
        with self.index.read_session() as s:
            others = s.scalar(
                select(func.count()).select_from(FileCopy).where(FileCopy.instance_fk == inst_pk, FileCopy.tier != src.name)
            )
        if others:
            squeezed, why = None, f"copies on other tiers are {ts}"
        else:
            squeezed, why = compression.squeeze(src.abspath(rel), target, dst.new_temp())
        if squeezed is None:
            report.unchanged[compression.reason_key(why)] += 1
            log.info("%s moves to %s unchanged: %s", rel, dst.name, why)
        return squeezed

    @staticmethod
    def _lock_for_new_syntax(s: Any, inst_pk: int, copy_pk: int, ts: str, dst: str) -> None:
        """Lock the instance row; refuse the switch if its syntax changed or a copy appeared elsewhere meanwhile.

        The recall path locks the same row before it records a hot copy, so a
        recall and this switch cannot both commit with different syntaxes.
        """
        current = s.scalar(select(Instance.transfer_syntax_uid).where(Instance.pk == inst_pk).with_for_update())
        others = s.scalar(
            select(func.count()).select_from(FileCopy)
            .where(FileCopy.instance_fk == inst_pk, FileCopy.pk != copy_pk, FileCopy.tier != dst)
        )  # fmt: skip
        if current != ts or others:
            raise StorageError(f"instance changed while it was compressed (syntax {current}, {others} other copies); source kept")


@dataclass
class ArchiveStatus:
    patients: int
    studies: int
    series: int
    instances: int
    tier_bytes: dict[str, int]
    tier_files: dict[str, int]
    # per tier: copies stored losslessly compressed by us, and the bytes that saved (original sizes - stored sizes)
    tier_compressed: dict[str, int] = field(default_factory=dict)
    tier_saved: dict[str, int] = field(default_factory=dict)


def archive_status(index: Index, tiers: TierSet) -> ArchiveStatus:
    with index.read_session() as s:
        counts = [s.scalar(select(func.count()).select_from(m)) or 0 for m in (Patient, Study, Series, Instance)]
        rows = s.execute(
            select(
                FileCopy.tier,
                func.count(),
                func.coalesce(func.sum(FileCopy.size), 0),
                func.count(FileCopy.original_size),
                func.coalesce(func.sum(FileCopy.original_size - FileCopy.size), 0),
            ).group_by(FileCopy.tier)
        ).all()
    tb = {t.name: 0 for t in tiers}
    tf = {t.name: 0 for t in tiers}
    tc = {t.name: 0 for t in tiers}
    ts = {t.name: 0 for t in tiers}
    for name, n, size, compressed, saved in rows:
        tb[name] = int(size)
        tf[name] = int(n)
        tc[name] = int(compressed)
        ts[name] = int(saved)
    return ArchiveStatus(*counts, tier_bytes=tb, tier_files=tf, tier_compressed=tc, tier_saved=ts)
