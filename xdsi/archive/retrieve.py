"""Finding and opening archived instances, recalling them from cold tiers.

Every read (C-MOVE, C-GET, RAD-69, WADO) goes through :meth:`RetrieveService.open`,
which picks the fastest tier holding a copy, recalls a cold-only instance to
the hot tier when configured to, and stamps the read time that the tier policy
uses to decide what is cold.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from xdsi.config import Settings
from xdsi.index.catalog import CopyRecord, add_copy, as_utc, utcnow
from xdsi.index.db import Index
from xdsi.index.models import FileCopy, Instance, Patient, Series, Study
from xdsi.storage.tiers import ChecksumMismatch, TierSet
from xdsi.uids import InvalidUID, validate_uid

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InstanceRef:
    """An archived instance as the retrieve paths need it: identity plus where its bytes are."""

    pk: int
    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    copies: tuple[tuple[str, str, int, str], ...]  # (tier, rel_path, size, sha256), fastest tier first

    @property
    def size(self) -> int:
        return self.copies[0][2] if self.copies else 0


TOUCH_INTERVAL = timedelta(minutes=10)



class NotAvailable(LookupError):
    """The index knows the instance but no tier can deliver it."""


def _uid_list(value: object, what: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)) or value.__class__.__name__ == "MultiValue":
        items = [str(v) for v in value]  # type: ignore[union-attr]
    else:
        items = [v for v in str(value).split("\\")]
    return [validate_uid(v.strip(), what) for v in items if v.strip()]


class RetrieveService:
    def __init__(self, settings: Settings, index: Index, tiers: TierSet) -> None:
        self.settings = settings
        self.index = index
        self.tiers = tiers
        self.recall = settings.effective_storage.recall_on_read

    def select(
        self,
        *,
        study_uids: Iterable[str] = (),
        series_uids: Iterable[str] = (),
        sop_uids: Iterable[str] = (),
        patient_id: str | None = None,
    ) -> list[InstanceRef]:
        """Instances matching every given constraint; an empty constraint matches anything.

        At least one constraint is required: a retrieve never means "everything".
        """
        study_uids, series_uids, sop_uids = list(study_uids), list(series_uids), list(sop_uids)
        if not (study_uids or series_uids or sop_uids or patient_id):
            raise InvalidUID("a retrieve needs at least one Patient ID or Study, Series or SOP Instance UID")
        stmt = (
            select(Instance, Series.series_uid, Study.study_uid)
            .join(Series, Instance.series_fk == Series.pk)
            .join(Study, Series.study_fk == Study.pk)
        )
        if patient_id is not None:
            stmt = stmt.join(Patient, Study.patient_fk == Patient.pk).where(Patient.patient_id == patient_id)
        if study_uids:
            stmt = stmt.where(Study.study_uid.in_(study_uids))
        if series_uids:
            stmt = stmt.where(Series.series_uid.in_(series_uids))
        if sop_uids:
            stmt = stmt.where(Instance.sop_instance_uid.in_(sop_uids))
        stmt = stmt.order_by(Study.pk, Series.series_number, Series.pk, Instance.instance_number, Instance.pk)
        out: list[InstanceRef] = []
        with self.index.read_session() as s:
            rows = s.execute(stmt).all()
            pks = [r[0].pk for r in rows]
            copies: dict[int, list[FileCopy]] = {}
            for i in range(0, len(pks), 500):
                for c in s.scalars(select(FileCopy).where(FileCopy.instance_fk.in_(pks[i : i + 500]))):
                    copies.setdefault(c.instance_fk, []).append(c)
            for inst, series_uid, study_uid in rows:
                cs = sorted(
                    (c for c in copies.get(inst.pk, []) if c.tier in self.tiers), key=lambda c: self.tiers.rank(c.tier)
                )
                out.append(
                    InstanceRef(
                        pk=inst.pk,
                        study_uid=study_uid,
                        series_uid=series_uid,
                        sop_instance_uid=inst.sop_instance_uid,
                        sop_class_uid=inst.sop_class_uid,
                        transfer_syntax_uid=inst.transfer_syntax_uid,
                        copies=tuple((c.tier, c.rel_path, c.size, c.sha256) for c in cs),
                    )
                )
        return out

    def select_by_identifier(self, identifier) -> list[InstanceRef]:  # type: ignore[no-untyped-def]
        """Instances named by a C-MOVE / C-GET identifier (unique keys at and above its level)."""
        level = str(identifier.get("QueryRetrieveLevel", "")).strip().upper()
        if level not in ("PATIENT", "STUDY", "SERIES", "IMAGE"):
            raise InvalidUID(f"QueryRetrieveLevel {level!r} is not valid")
        patient_id = str(identifier.get("PatientID", "") or "").strip() or None
        study = _uid_list(identifier.get("StudyInstanceUID"), "Study Instance UID")
        series = _uid_list(identifier.get("SeriesInstanceUID"), "Series Instance UID") if level in ("SERIES", "IMAGE") else []
        sops = _uid_list(identifier.get("SOPInstanceUID"), "SOP Instance UID") if level == "IMAGE" else []
        unique = {"PATIENT": patient_id, "STUDY": study, "SERIES": series, "IMAGE": sops}[level]
        if not unique:
            raise InvalidUID(f"the {level} level unique key is missing from the identifier")
        return self.select(study_uids=study, series_uids=series, sop_uids=sops, patient_id=patient_id if level == "PATIENT" else None)

    def path(self, ref: InstanceRef) -> Path:
        """A readable path for the instance, recalling it to the hot tier if it is only on a cold one.

        Copies are tried fastest tier first.  A recall is verified against the
        index's checksum; a cold copy that fails it is never served.  If the
        copies ``ref`` names have moved meanwhile (a migration ran between
        :meth:`select` and now), the index is read again once.
        """
        if not ref.copies:
            raise NotAvailable(f"{ref.sop_instance_uid}: no stored copy")
        found = self._path_from(ref, ref.copies)
        if found is None:
            fresh = self.select(sop_uids=[ref.sop_instance_uid])
            if fresh and fresh[0].copies and fresh[0].copies != ref.copies:
                found = self._path_from(fresh[0], fresh[0].copies)
        if found is None:
            raise NotAvailable(f"{ref.sop_instance_uid}: no tier holds a readable, intact copy")
        return found

    def _path_from(self, ref: InstanceRef, copies: tuple[tuple[str, str, int, str], ...]) -> Path | None:
        hot = self.tiers.hot
        for tier_name, rel, _size, sha in copies:
            if tier_name not in self.tiers:
                continue
            tier = self.tiers[tier_name]
            if not tier.exists(rel):
                log.warning("%s: indexed copy missing on tier %s", ref.sop_instance_uid, tier_name)
                continue
            if tier_name != hot.name and self.recall:
                try:
                    recalled = self._recall(ref, tier, rel, sha)
                except ChecksumMismatch as exc:
                    log.error("%s: copy on %s is corrupt, not served: %s", ref.sop_instance_uid, tier_name, exc)
                    continue
                except OSError as exc:  # hot tier full or unwritable: serve from where it is
                    log.warning("recall of %s failed (%s); serving from %s", ref.sop_instance_uid, exc, tier_name)
                else:
                    if recalled is not None:
                        return recalled
            now = utcnow()
            self._touch(ref.pk, tier_name, now)
            return tier.abspath(rel)
        return None

    def _recall(self, ref: InstanceRef, tier, rel: str, sha: str) -> Path | None:  # type: ignore[no-untyped-def]
        """Copy to the hot tier, verified, and record the copy; the hot path, or None if it vanished."""
        hot = self.tiers.hot
        placed = hot.copy_from(tier, rel, sha)
        now = utcnow()
        try:
            with self.index.session() as s:
                add_copy(s, ref.pk, CopyRecord(hot.name, placed.rel_path, placed.size, placed.sha256, ref.transfer_syntax_uid), now=now)
        except IntegrityError:
            pass  # a concurrent reader recalled it first; same bytes, same path
        log.info("recalled %s from %s to %s", ref.sop_instance_uid, tier.name, hot.name)
        self._touch(ref.pk, hot.name, now)
        p = hot.abspath(placed.rel_path)
        return p if p.is_file() else None

    def _touch(self, instance_pk: int, tier: str, now) -> None:  # type: ignore[no-untyped-def]
        """Stamp the read time the tier policy ages studies by.

        The policy works in days, so a stamp younger than ``TOUCH_INTERVAL`` is
        left alone: reading the frames of a study does not cost one durable
        index write per frame.
        """
        with self.index.read_session() as s:
            last = s.scalar(
                select(FileCopy.last_read_at).where(FileCopy.instance_fk == instance_pk, FileCopy.tier == tier)
            )
        if last is not None and as_utc(last) > now - TOUCH_INTERVAL:
            return
        with self.index.session() as s:
            s.execute(update(Instance).where(Instance.pk == instance_pk).values(last_read_at=now))
            s.execute(
                update(FileCopy).where(FileCopy.instance_fk == instance_pk, FileCopy.tier == tier).values(last_read_at=now)
            )

    def open(self, ref: InstanceRef):  # type: ignore[no-untyped-def]
        return open(self.path(ref), "rb")

    def iter_paths(self, refs: Iterable[InstanceRef]) -> Iterator[tuple[InstanceRef, Path | None, str]]:
        """(ref, path, error) one at a time, so a large study is recalled and sent instance by instance."""
        for ref in refs:
            try:
                yield ref, self.path(ref), ""
            except (NotAvailable, OSError) as exc:
                yield ref, None, str(exc)
