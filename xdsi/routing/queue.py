"""The routing queue of one archive: rules evaluated into rows, rows claimed, sent and settled.

Evaluation reads the index, not the store path: a cursor (``route_cursor``)
walks ``instance.pk`` forward, and each instance past it is matched against
the routes and becomes one ``route_forward`` row per destination, in one
transaction with the cursor's move.  So an instance acknowledged to its sender
is routed even if the process dies right after the acknowledgement (the next
start goes on from the cursor), whichever process stored it (``xdsi import``,
another worker sharing the index), and the ingest path pays nothing for
routing: the store listener only wakes the worker.

Rows are idempotent: the unique (destination, SOP Instance UID) pair means a
second evaluation adds nothing, and an instance is queued again only when its
stored bytes changed (``duplicate_policy = "replace"``: another sha256).

On PostgreSQL, transactions commit out of ``pk`` order: a row whose pk is below
one already seen may appear later.  The cursor therefore stops short of
instances created less than :data:`PG_SETTLE` ago; they are read again on the
next passes (and evaluated once: the pass remembers what it evaluated above the cursor).  On SQLite writes are serialised
(``BEGIN IMMEDIATE``), so pk order is commit order.

Delivery is at-least-once with a lease, like the XDS outbox
(:mod:`xdsi.xds.outbox`): a row is claimed (``sending``, our name, a lease),
sent outside any transaction and settled per instance as the destination
answers; a row is ``sent`` only on the destination's success.  An instance is
sent twice only if the process dies between the destination's answer and the
settling commit (the destination then sees a duplicate, which a storage SCP
accepts).  Rows leased by a process of this host that no longer exists are
released when the worker starts, so a restart does not wait for the lease.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Iterable, Sequence

from sqlalchemy import and_, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError

from xdsi.index.models import FileCopy, Instance, Patient, Series, Study
from xdsi.routing.conditions import FILE_KEYS, ORDER_KEYS, Facts, matches, order_lookup
from xdsi.routing.models import GAVE_UP, OPEN_STATES, PENDING, SENDING, SENT, RouteCursor, RouteForward
from xdsi.routing.settings import MANUAL, Route, RoutingSettings

log = logging.getLogger(__name__)

CURSOR = "instances"
EVALUATE_BATCH = 500
PG_SETTLE = timedelta(seconds=10)  # longer than any store transaction; see the module docstring


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def aware(dt: datetime | None) -> datetime | None:
    """SQLite returns naive datetimes for timezone-aware columns: they were written in UTC."""
    if dt is not None and dt.tzinfo is None:
        return dt.replace(tzinfo=timezone.utc)
    return dt


def process_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{random.getrandbits(32):08x}"


def _owner_gone(owner: str) -> bool:
    """A lease owner of this host whose process is gone (its pid no longer exists)."""
    host, _, rest = owner.partition(":")
    pid, _, _ = rest.partition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    if int(pid) == os.getpid():
        return False  # ours: released by stop(), or still being sent
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


@dataclass(frozen=True)
class Claimed:
    """A row leased to us: what to send where."""

    pk: int
    destination: str
    sop_instance_uid: str
    study_uid: str
    transfer_syntax: str
    priority: int


class RouteQueue:
    """Routes of one archive (main AE title or a partition) over that archive's index."""

    def __init__(self, archive: Any, routes: Sequence[Route], settings: RoutingSettings, owner: str | None = None) -> None:
        self.archive = archive
        self.index = archive.index
        self.routes = tuple(routes)
        self.settings = settings
        self.owner = owner or process_name()
        self.called_aet = archive.settings.ae_title
        self._lock = threading.Lock()
        self._stored: set[str] = set()  # SOP Instance UIDs stored since the last pass (see stored())
        self._facts_stmt: Any = None
        self._seen: dict[int, str] = {}  # instance pk -> sha256 evaluated above the cursor (PostgreSQL, see PG_SETTLE)
        s = archive.settings
        # one exchange with the destination, twice, plus slack; renewed at every instance settled
        self.lease = timedelta(seconds=2 * max(s.dimse_timeout, s.network_timeout, settings.stow_timeout) + 30)

    # -- evaluation ---------------------------------------------------------------------------

    def stored(self, header: Any, _path: Any = None, _sha256: str = "") -> None:
        """A store listener: note the instance, so that a *replaced* one (same index row, same pk) is looked at again.

        New instances are found by the cursor; a replacement keeps its row and
        pk (``catalog.record_instance``), so only this note brings it back.  A
        replacement stored by another process, or lost in a crash before the
        next pass, is not re-sent: `xdsi route` does it by hand.
        """
        with self._lock:
            self._stored.add(header.sop_instance_uid)

    def evaluate_new(self, limit: int = EVALUATE_BATCH) -> int:
        """Match instances past the cursor, and replaced ones, against the routes; returns how many were looked at."""
        with self._lock:
            noted, self._stored = self._stored, set()
        try:
            return self._evaluate(noted, limit)
        except BaseException:
            with self._lock:  # the index is unavailable: look at the replaced instances again next pass
                self._stored |= noted
            raise

    def _evaluate(self, noted: set[str], limit: int) -> int:
        with self.index.read_session() as s:
            cursor = s.get(RouteCursor, CURSOR)
            start = cursor.instance_pk if cursor is not None else None
            if start is None or not self.routes:
                # no routes: nothing to match, the cursor only follows the newest instance (one cheap query per
                # pass instead of reading every new instance's facts: 3.5-5 % of ingest CPU, issue 14)
                newest = s.scalar(select(func.max(Instance.pk))) or 0
            else:
                rows = s.execute(self._facts_query().where(Instance.pk > start).order_by(Instance.pk).limit(limit)).all()
                # PostgreSQL: a window of rows already evaluated but not yet settled must not hide the ones after it
                while len(rows) >= limit and all(self._seen.get(r.pk) == (r.sha256 or "") for r in rows[-limit:]):
                    more = s.execute(self._facts_query().where(Instance.pk > rows[-1].pk).order_by(Instance.pk).limit(limit)).all()
                    if not more:
                        break
                    rows = [*rows, *more]
                # noted instances at or below the cursor were evaluated before: these are replacements
                uids = sorted(noted - {r.sop_instance_uid for r in rows})
                again = [
                    r for i in range(0, len(uids), 500)
                    for r in s.execute(self._facts_query().where(Instance.sop_instance_uid.in_(uids[i : i + 500]), Instance.pk <= start)).all()
                ]
        if start is not None and not self.routes:
            if newest > start:
                self._write([], newest)
            self._seen.clear()
            return 0
        if start is None:  # created by migration 0006; if it was removed: from now on, never into the past
            with self.index.session() as s:
                if s.get(RouteCursor, CURSOR) is None:
                    s.add(RouteCursor(name=CURSOR, instance_pk=newest, updated_at=utcnow()))
            return 0
        advance = self._advance_to(start, rows) if rows else start
        # PostgreSQL: rows above the cursor are read again until they settle; evaluate each version once
        fresh = [r for r in rows if self._seen.get(r.pk) != (r.sha256 or "")]
        if not fresh and not again:
            if advance != start:
                self._write([], advance)
            self._forget(advance)
            return 0
        wanted = self._wanted(self._facts([*fresh, *again])) if self.routes else []
        self._write(wanted, advance)
        for r in fresh:
            self._seen[r.pk] = r.sha256 or ""
        self._forget(advance)
        return len(fresh) + len(again)

    def _forget(self, cursor: int) -> None:
        for pk in [pk for pk in self._seen if pk <= cursor]:
            del self._seen[pk]

    def _advance_to(self, start: int, rows: Sequence[Any]) -> int:
        if self.index.dialect != "postgresql":
            return int(rows[-1].pk)
        settled = utcnow() - PG_SETTLE
        at = start
        for r in rows:
            if aware(r.created_at) > settled:  # type: ignore[operator]
                break
            at = int(r.pk)
        return at

    def _facts_query(self):  # type: ignore[no-untyped-def]
        """The joined select of everything the rules read, built once (SQLAlchemy then reuses its compiled form)."""
        if self._facts_stmt is None:
            self._facts_stmt = self._build_facts_query()
        return self._facts_stmt

    def _build_facts_query(self):  # type: ignore[no-untyped-def]
        sha = select(FileCopy.sha256).where(FileCopy.instance_fk == Instance.pk).limit(1).scalar_subquery()
        return (
            select(
                Instance.pk, Instance.sop_instance_uid, Instance.sop_class_uid, Instance.source_ae_title, Instance.created_at,
                Series.series_uid, Series.modality, Series.body_part, Series.institution_name, Series.station_name,
                Study.study_uid, Study.study_description, Study.referring_physician, Study.accession_number,
                Patient.patient_id, sha.label("sha256"),
            )
            .join(Series, Instance.series_fk == Series.pk)
            .join(Study, Series.study_fk == Study.pk)
            .join(Patient, Study.patient_fk == Patient.pk)
        )

    def _facts(self, rows: Iterable[Any]) -> list[Facts]:
        uses = frozenset().union(*(r.uses for r in self.routes)) if self.routes else frozenset()
        out = []
        orders: dict[tuple[str, str], Any] = {}
        for r in rows:
            f = Facts(
                sop_instance_uid=r.sop_instance_uid,
                study_uid=r.study_uid,
                sha256=r.sha256 or "",
                values={
                    "calling_aet": r.source_ae_title or "",
                    "called_aet": self.called_aet,
                    "modality": r.modality or "",
                    "sop_class": r.sop_class_uid or "",
                    "body_part": r.body_part or "",
                    "referring_physician": r.referring_physician or "",
                    "institution": r.institution_name or "",
                    "station_name": r.station_name or "",
                    "study_description": r.study_description or "",
                },
                accession_number=r.accession_number or "",
                patient_id=r.patient_id or "",
            )
            if uses & set(FILE_KEYS):
                f.file_values = self._file_reader(r.sop_instance_uid)
            if uses & ORDER_KEYS:
                key = (f.accession_number, f.patient_id)
                f.order_values = lambda key=key: orders[key] if key in orders else orders.setdefault(key, self._order(*key))
            out.append(f)
        return out

    def _file_reader(self, sop_uid: str):  # type: ignore[no-untyped-def]
        def read() -> dict[str, str]:
            from pydicom import dcmread

            refs = self.archive.retrieve.select(sop_uids=[sop_uid])
            if not refs:
                return {}
            try:
                ds = dcmread(self.archive.retrieve.path(refs[0]), stop_before_pixels=True, specific_tags=list(FILE_KEYS.values()))
            except Exception as exc:  # unreadable now: the file conditions see empty values
                log.warning("routing: cannot read the header of %s: %s", sop_uid, exc)
                return {}
            return {key: str(ds.get(keyword, "") or "") for key, keyword in FILE_KEYS.items()}

        return read

    def _order(self, accession_number: str, patient_id: str) -> Any:
        lookup = order_lookup()
        if lookup is None:
            return None
        try:
            with self.index.read_session() as s:
                return lookup(s, accession_number, patient_id)
        except Exception:
            log.exception("routing: order lookup failed for accession %r, patient %r", accession_number, patient_id)
            return None

    def _wanted(self, facts: Sequence[Facts]) -> list[tuple[Route, str, Facts]]:
        """(route, destination, instance) for every match; the first matching route decides a destination's options."""
        out: list[tuple[Route, str, Facts]] = []
        for f in facts:
            seen: set[str] = set()
            for route in sorted(self.routes, key=lambda r: -r.priority):
                if not matches(route.conditions, f):
                    continue
                for dest in route.destinations:
                    if dest not in seen:
                        seen.add(dest)
                        out.append((route, dest, f))
        return out

    def _write(self, wanted: Sequence[tuple[Route, str, Facts]], advance: int) -> None:
        """Queue rows and move the cursor in one transaction; a concurrent insert of the same row is retried once."""
        for attempt in (1, 2):
            try:
                with self.index.session() as s:
                    self._upsert(s, [(route.name, dest, f, route.transfer_syntax, route.priority, route.delay) for route, dest, f in wanted])
                    cursor = s.get(RouteCursor, CURSOR, with_for_update=True)
                    if cursor is not None and cursor.instance_pk < advance:
                        cursor.instance_pk = advance
                        cursor.updated_at = utcnow()
                return
            except IntegrityError:
                if attempt == 2:
                    raise

    def _upsert(self, s: Any, items: Sequence[tuple[str, str, Facts, str, int, int]], *, force: bool = False) -> list[int]:
        """Insert missing rows; re-queue rows whose instance changed (or every given row, ``force``: `xdsi route`).

        Returns the pks of the rows inserted or re-queued when ``force`` (`xdsi route` sends exactly
        those); the evaluation path inserts with one multi-row INSERT and gets no pks back.
        """
        now = utcnow()
        uids = sorted({item[2].sop_instance_uid for item in items})
        existing: dict[tuple[str, str], RouteForward] = {}
        for i in range(0, len(uids), 500):
            for row in s.scalars(select(RouteForward).where(RouteForward.sop_instance_uid.in_(uids[i : i + 500]))):
                existing[(row.destination, row.sop_instance_uid)] = row
        touched: list[RouteForward] = []
        new_rows: dict[tuple[str, str], dict[str, Any]] = {}
        for route_name, dest, f, ts, prio, delay in items:
            row = existing.get((dest, f.sop_instance_uid))
            if row is None and not force:
                new_rows.setdefault((dest, f.sop_instance_uid), dict(
                    destination=dest, sop_instance_uid=f.sop_instance_uid, study_uid=f.study_uid, sha256=f.sha256,
                    route=route_name, transfer_syntax=ts, priority=prio, delay=delay, state=PENDING, attempts=0,
                    next_attempt_at=now, lease_owner="", lease_until=None, last_error="", created_at=now, updated_at=now,
                    sent_at=None,
                ))
                continue
            if row is None:
                row = RouteForward(
                    destination=dest, sop_instance_uid=f.sop_instance_uid, study_uid=f.study_uid, sha256=f.sha256,
                    route=route_name, transfer_syntax=ts, priority=prio, delay=delay, state=PENDING, attempts=0,
                    next_attempt_at=now, lease_owner="", last_error="", created_at=now, updated_at=now,
                )
                s.add(row)
                existing[(dest, f.sop_instance_uid)] = row
            elif force or (f.sha256 and row.sha256 != f.sha256):
                if row.state == SENDING and not force:
                    pass  # the old bytes are in flight: re-queued below, so the new ones follow
                elif row.state == SENDING and aware(row.lease_until) and aware(row.lease_until) > now:  # type: ignore[operator]
                    continue  # `xdsi route` while a server sends it right now: that send stands
                row.sha256, row.route, row.transfer_syntax, row.priority, row.delay = f.sha256, route_name, ts, prio, delay
                row.state, row.attempts, row.next_attempt_at, row.lease_owner, row.lease_until = PENDING, 0, now, "", None
                row.last_error, row.updated_at, row.study_uid = "", now, f.study_uid
            else:
                continue
            touched.append(row)
        if new_rows:
            s.execute(insert(RouteForward), list(new_rows.values()))
        s.flush()
        return [r.pk for r in touched]

    def queue_study(self, study_uid: str, destination: str, transfer_syntax: str = "") -> list[int]:
        """``xdsi route --study UID --to DEST``: every instance of the study queued for ``destination`` again, now."""
        with self.index.read_session() as s:
            rows = s.execute(self._facts_query().where(Study.study_uid == study_uid).order_by(Instance.pk)).all()
        facts = self._facts(rows)
        with self.index.session() as s:
            return self._upsert(s, [(MANUAL, destination, f, transfer_syntax, 1, 0) for f in facts], force=True)

    # -- delivery ---------------------------------------------------------------------------------

    def release_dead_leases(self) -> int:
        """Rows leased by a process of this host that is gone (killed, crashed): pending again, now."""
        now = utcnow()
        with self.index.session() as s:
            rows = s.scalars(select(RouteForward).where(RouteForward.state == SENDING)).all()
            n = 0
            for row in rows:
                if _owner_gone(row.lease_owner):
                    row.state, row.lease_owner, row.lease_until, row.next_attempt_at, row.updated_at = PENDING, "", None, now, now
                    n += 1
        if n:
            log.info("routing: %d forward(s) left in flight by a process that is gone are queued again", n)
        return n

    def _due(self, now: datetime):  # type: ignore[no-untyped-def]
        return or_(
            and_(RouteForward.state == PENDING, RouteForward.next_attempt_at <= now),
            and_(RouteForward.state == SENDING, RouteForward.lease_until < now),
        )

    def claim(self, pks: Sequence[int] | None = None, now: datetime | None = None, exclude: Iterable[str] = ()) -> list[Claimed]:
        """Lease up to ``batch`` due rows for one destination and transfer syntax, highest priority first.

        ``pks``: exactly these rows (``xdsi route``), due or not.  ``exclude``:
        destinations this process is sending to already.  Rows whose route has
        a delay wait until their study has been unchanged that long
        (``study.updated_at``): their next attempt is moved, no attempt counted.
        """
        now = now or utcnow()
        limit = self.settings.batch
        exclude = list(exclude)
        if pks is None:  # the idle case, every poll: a read, not the write lock (BEGIN IMMEDIATE on SQLite)
            with self.index.read_session() as s:
                probe = select(RouteForward.pk).where(self._due(now)).limit(1)
                if exclude:
                    probe = probe.where(RouteForward.destination.not_in(exclude))
                if s.scalar(probe) is None:
                    return []
        with self.index.session() as s:
            stmt = select(RouteForward)
            if pks is not None:
                stmt = stmt.where(RouteForward.pk.in_(list(pks)), or_(RouteForward.state == PENDING, self._due(now)))
            else:
                stmt = stmt.where(self._due(now))
            if exclude:
                stmt = stmt.where(RouteForward.destination.not_in(exclude))
            rows = s.scalars(
                stmt.order_by(RouteForward.priority.desc(), RouteForward.pk).limit(limit * 4).with_for_update(skip_locked=True)
            ).all()
            if not rows:
                return []
            delayed = {r.study_uid for r in rows if r.delay}
            updated = dict(s.execute(select(Study.study_uid, Study.updated_at).where(Study.study_uid.in_(delayed))).all()) if delayed else {}
            first: tuple[str, str] | None = None
            out: list[Claimed] = []
            for row in rows:
                if row.delay and row.study_uid in updated:
                    stable_at = aware(updated[row.study_uid]) + timedelta(seconds=row.delay)  # type: ignore[operator]
                    if stable_at > now:
                        row.next_attempt_at, row.state, row.lease_owner, row.lease_until = stable_at, PENDING, "", None
                        continue
                key = (row.destination, row.transfer_syntax)
                if first is None:
                    first = key
                if key != first or len(out) >= limit:
                    continue
                row.state, row.lease_owner, row.lease_until, row.updated_at = SENDING, self.owner, now + self.lease, now
                out.append(Claimed(row.pk, row.destination, row.sop_instance_uid, row.study_uid, row.transfer_syntax, row.priority))
        return out

    def settle(self, claim: Claimed, ok: bool, error: str = "", *, final: bool = False, renew: Sequence[int] = ()) -> bool:
        """Record one answer; False if the row was no longer ours (re-queued meanwhile)."""
        return self.settle_many([(claim, ok, error, final)], renew=renew) == 1

    def settle_many(self, answers: Sequence[tuple[Claimed, bool, str, bool]], *, renew: Sequence[int] = ()) -> int:
        """Record answers ``(claim, ok, error, final)`` in one commit; returns how many rows were still ours.

        ``final``: no retry (the instance is no longer archived).  ``renew``: the
        rows still to be sent in this batch get a fresh lease in the same commit.
        """
        now = utcnow()
        recorded = 0
        with self.index.session() as s:
            rows = {r.pk: r for r in s.scalars(
                select(RouteForward).where(RouteForward.pk.in_([a[0].pk for a in answers])).with_for_update()
            )}
            for claim, ok, error, final in answers:
                row = rows.get(claim.pk)
                if row is None or row.state != SENDING or row.lease_owner != self.owner:
                    log.warning("routing: %s to %s: lease lost before the answer was recorded", claim.sop_instance_uid, claim.destination)
                    continue
                recorded += 1
                row.updated_at, row.lease_owner, row.lease_until = now, "", None
                if ok:
                    row.state, row.sent_at, row.last_error = SENT, now, ""
                    continue
                row.attempts += 1
                row.last_error = error[:4000]
                if final or (self.settings.max_attempts and row.attempts >= self.settings.max_attempts):
                    row.state = GAVE_UP
                else:
                    row.state, row.next_attempt_at = PENDING, now + self.backoff(row.attempts)
            if renew:
                s.execute(
                    update(RouteForward)
                    .where(RouteForward.pk.in_(list(renew)), RouteForward.state == SENDING, RouteForward.lease_owner == self.owner)
                    .values(lease_until=now + self.lease)
                )
        return recorded

    def release(self, claims: Sequence[Claimed]) -> None:
        """Claimed rows not attempted (stopping): pending again at once, no attempt counted."""
        if not claims:
            return
        now = utcnow()
        with self.index.session() as s:
            s.execute(
                update(RouteForward)
                .where(RouteForward.pk.in_([c.pk for c in claims]), RouteForward.state == SENDING, RouteForward.lease_owner == self.owner)
                .values(state=PENDING, lease_owner="", lease_until=None, next_attempt_at=now, updated_at=now)
            )

    def backoff(self, attempts: int) -> timedelta:
        st = self.settings
        delay = min(st.retry_max, st.retry_initial * st.retry_factor ** max(0, attempts - 1))
        return timedelta(seconds=delay * random.uniform(0.9, 1.1))

    # -- what `xdsi status` shows -----------------------------------------------------------------

    def summary(self) -> list[dict[str, Any]]:
        """Per destination: rows by state, failing rows (pending after a failed attempt), the last error and when."""
        with self.index.read_session() as s:
            counts = s.execute(
                select(RouteForward.destination, RouteForward.state, func.count()).group_by(RouteForward.destination, RouteForward.state)
            ).all()
            failing = dict(
                s.execute(
                    select(RouteForward.destination, func.count())
                    .where(RouteForward.state.in_(OPEN_STATES), RouteForward.attempts > 0)
                    .group_by(RouteForward.destination)
                ).all()
            )
            last = {}
            for dest in {d for d, _s, _n in counts}:
                row = s.scalars(
                    select(RouteForward)
                    .where(RouteForward.destination == dest, RouteForward.last_error != "")
                    .order_by(RouteForward.updated_at.desc())
                    .limit(1)
                ).first()
                if row is not None:
                    last[dest] = (row.last_error, aware(row.updated_at), aware(row.next_attempt_at) if row.state == PENDING else None)
        out: dict[str, dict[str, Any]] = {}
        for dest, state, n in counts:
            d = out.setdefault(dest, {"destination": dest, "states": {}, "failing": failing.get(dest, 0), "last_error": None})
            d["states"][state] = n
            if dest in last:
                d["last_error"] = last[dest]
        return sorted(out.values(), key=lambda d: d["destination"])

    def rows_for(self, pks: Sequence[int]) -> list[RouteForward]:
        with self.index.read_session() as s:
            return list(s.scalars(select(RouteForward).where(RouteForward.pk.in_(list(pks))).order_by(RouteForward.pk)))
