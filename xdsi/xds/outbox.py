"""The submission outbox: every XDS submission is an index row before anything is sent.

Delivery is at-least-once with a lease, and exactly-once in the normal case:

* a process *claims* a due row (``pending`` with ``next_attempt_at`` passed, or
  ``sending`` whose lease expired because its owner died) by setting it to
  ``sending`` with its own name and a lease, in one short transaction;
* on PostgreSQL the candidate rows are read with ``SELECT ... FOR UPDATE SKIP
  LOCKED``, so two xdsi processes never claim the same row and never wait for
  each other; on SQLite every write transaction is ``BEGIN IMMEDIATE``
  (see :mod:`xdsi.index.db`), which serialises the read-and-claim across
  processes: the same guarantee by a database-wide write lock;
* the network call happens outside any transaction; the answer is recorded only
  if the row is still leased to us; a row is ``done`` only on Success.  Any
  other outcome (network error, HTTP error, SOAP Fault, Failure response) puts
  it back to ``pending`` with exponential backoff and the peer's own error text.
"""

from __future__ import annotations

import logging
import os
import random
import socket
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from sqlalchemy import and_, or_, select, update

from xdsi.config import XdsSettings
from xdsi.index.db import Index
from xdsi.index.xds_models import DONE, GAVE_UP, KIND_DEPRECATE, PENDING, SENDING, SUPERSEDED, XdsManifest, XdsSubmission

log = logging.getLogger(__name__)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _aware(dt: datetime | None) -> datetime | None:
    """SQLite returns naive datetimes for timezone-aware columns: they were written in UTC."""
    if dt is not None and dt.tzinfo is None:
        return dt.replace(tzinfo=timezone.utc)
    return dt


def process_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{random.getrandbits(32):08x}"


@dataclass(frozen=True)
class Claim:
    pk: int
    owner: str


class Outbox:
    def __init__(self, index: Index, x: XdsSettings, owner: str | None = None) -> None:
        self.index = index
        self.x = x
        self.owner = owner or process_name()

    @property
    def lease(self) -> timedelta:
        # long enough for one exchange with the peer, short enough that a dead owner's row is retried soon
        return timedelta(seconds=self.x.timeout * 2 + 30)

    def backoff(self, attempts: int) -> timedelta:
        delay = min(self.x.retry_max, self.x.retry_initial * self.x.retry_factor ** max(0, attempts - 1))
        return timedelta(seconds=delay * random.uniform(0.9, 1.1))

    # -- claiming ------------------------------------------------------------------------------
    def _due(self, now: datetime):  # type: ignore[no-untyped-def]
        return or_(
            and_(XdsSubmission.state == PENDING, XdsSubmission.next_attempt_at <= now),
            and_(XdsSubmission.state == SENDING, XdsSubmission.lease_until < now),
        )

    def claim_due(self, limit: int = 10, now: datetime | None = None) -> list[Claim]:
        """Claim up to ``limit`` due rows, oldest first, at most one per study (they are sent in order)."""
        now = now or utcnow()
        claims: list[Claim] = []
        with self.index.session() as s:
            rows = s.scalars(
                select(XdsSubmission)
                .where(self._due(now))
                .order_by(XdsSubmission.created_at, XdsSubmission.pk)
                .limit(limit * 4)
                .with_for_update(skip_locked=True)
            ).all()
            studies_busy = set(
                s.scalars(
                    select(XdsSubmission.study_uid).where(XdsSubmission.state == SENDING, XdsSubmission.lease_until >= now)
                ).all()
            )
            for row in rows:
                if len(claims) >= limit or row.study_uid in studies_busy:
                    continue
                if self._older_open(s, row):
                    continue
                self._take(row, now)
                studies_busy.add(row.study_uid)
                claims.append(Claim(row.pk, self.owner))
        return claims

    def claim(self, pk: int, now: datetime | None = None) -> Claim | None:
        """Claim one row now, whatever its next_attempt_at (``xdsi publish``); None if another process has it."""
        now = now or utcnow()
        with self.index.session() as s:
            row = s.scalars(
                select(XdsSubmission).where(XdsSubmission.pk == pk).with_for_update(skip_locked=True)
            ).one_or_none()
            if row is None or row.state in (DONE, SUPERSEDED):
                return None
            if row.state == SENDING and _aware(row.lease_until) >= now:  # type: ignore[operator]
                return None
            if self._older_open(s, row):
                return None
            self._take(row, now)
            return Claim(row.pk, self.owner)

    def _older_open(self, s, row: XdsSubmission) -> bool:  # type: ignore[no-untyped-def]
        return (
            s.scalar(
                select(XdsSubmission.pk).where(
                    XdsSubmission.study_uid == row.study_uid,
                    XdsSubmission.pk < row.pk,
                    XdsSubmission.state.in_((PENDING, SENDING)),
                ).limit(1)
            )
            is not None
        )

    def _take(self, row: XdsSubmission, now: datetime) -> None:
        row.state = SENDING
        row.lease_owner = self.owner
        row.lease_until = now + self.lease
        row.attempts += 1
        row.updated_at = now

    # -- recording the answer -------------------------------------------------------------------
    def succeeded(self, claim: Claim, *, status: str, response: str, metadata: str, error_text: str = "",
                  replaces: str = "", transaction: str = "", endpoint: str = "") -> bool:
        """Mark done and record the study's registered manifest; False if our lease was lost meanwhile."""
        now = utcnow()
        with self.index.session() as s:
            row = s.get(XdsSubmission, claim.pk, with_for_update=True)
            if row is None or row.state != SENDING or row.lease_owner != claim.owner:
                log.warning("submission %s: lease lost before the answer was recorded", claim.pk)
                return False
            row.state = DONE
            row.done_at = now
            row.updated_at = now
            row.lease_until = None
            row.last_status, row.last_response, row.last_metadata, row.last_error = status, response, metadata, error_text
            row.replaces_entry_uuid, row.transaction, row.endpoint = replaces, transaction, endpoint
            m = s.scalars(select(XdsManifest).where(XdsManifest.study_uid == row.study_uid).with_for_update()).one_or_none()
            if row.kind == KIND_DEPRECATE:
                if m is not None and m.entry_uuid == row.entry_uuid:
                    m.status = "deprecated"
                    m.submission_fk = row.pk
                    m.registered_at = now
            else:
                if m is None:
                    m = XdsManifest(study_uid=row.study_uid)
                    s.add(m)
                m.kos_sop_uid, m.entry_uuid, m.fingerprint = row.kos_sop_uid, row.entry_uuid, row.fingerprint
                m.status, m.submission_fk, m.registered_at = "approved", row.pk, now
        return True

    def failed(self, claim: Claim, *, status: str, error_text: str, response: str = "", metadata: str = "",
               transaction: str = "", endpoint: str = "") -> None:
        """Back to pending with backoff (or gave_up after max_attempts), keeping the peer's error text."""
        now = utcnow()
        with self.index.session() as s:
            row = s.get(XdsSubmission, claim.pk, with_for_update=True)
            if row is None or row.state != SENDING or row.lease_owner != claim.owner:
                return
            give_up = self.x.max_attempts and row.attempts >= self.x.max_attempts
            row.state = GAVE_UP if give_up else PENDING
            row.next_attempt_at = now + self.backoff(row.attempts)
            row.lease_until = None
            row.updated_at = now
            row.last_status, row.last_error = status, error_text
            if response:
                row.last_response = response
            if metadata:
                row.last_metadata = metadata
            row.transaction, row.endpoint = transaction or row.transaction, endpoint or row.endpoint

    def requeue(self, pk: int) -> None:
        """Make a waiting or abandoned row due now (after the configuration was fixed)."""
        with self.index.session() as s:
            s.execute(
                update(XdsSubmission)
                .where(XdsSubmission.pk == pk, XdsSubmission.state.in_((PENDING, GAVE_UP)))
                .values(state=PENDING, next_attempt_at=utcnow())
            )

    def supersede_pending(self, s, study_uid: str) -> list[XdsSubmission]:  # type: ignore[no-untyped-def]
        """Within the caller's transaction: pending (never answered) submissions of the study give way to a newer one."""
        rows = s.scalars(
            select(XdsSubmission)
            .where(XdsSubmission.study_uid == study_uid, XdsSubmission.state.in_((PENDING, GAVE_UP)))
            .with_for_update()
        ).all()
        for r in rows:
            r.state = SUPERSEDED
            r.updated_at = utcnow()
        return list(rows)

    # -- reading ----------------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        from sqlalchemy import func

        with self.index.session() as s:
            return dict(s.execute(select(XdsSubmission.state, func.count()).group_by(XdsSubmission.state)).all())  # type: ignore[arg-type]

    def open_rows(self, limit: int = 20) -> list[XdsSubmission]:
        with self.index.session() as s:
            return list(
                s.scalars(
                    select(XdsSubmission)
                    .where(XdsSubmission.state.in_((PENDING, SENDING, GAVE_UP)))
                    .order_by(XdsSubmission.created_at)
                    .limit(limit)
                )
            )

    def for_study(self, study_uid: str) -> list[XdsSubmission]:
        with self.index.session() as s:
            return list(s.scalars(select(XdsSubmission).where(XdsSubmission.study_uid == study_uid).order_by(XdsSubmission.pk)))

    def get(self, pk: int) -> XdsSubmission | None:
        with self.index.session() as s:
            return s.get(XdsSubmission, pk)
