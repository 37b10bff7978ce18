"""``[[prefetch]]``: a patient's relevant priors made ready before the new study is read.

An order (ORM^O01 / OMI^O23) or an admission (ADT^A01/A04/A05) names a patient; each
rule the message type triggers selects priors from the index alone (same modality or
body part, the last N studies, the last N years) and then

* recalls them: every instance with no copy on the first tier is copied there from the
  fastest tier that has one, verified against its checksum, by the archive's own
  read path (:meth:`xdsi.archive.retrieve.RetrieveService.path`, recall forced on);
* pushes them, when the rule names ``push_to``, to that peer by C-STORE.

Each rule a message triggers is a row (``hl7_prefetch_job``) written in the same
transaction as the order, before the ACK; the work runs after it on one background
thread (a RIS waits for nobody's disk), and a restart picks up what was not done.  A job
is claimed by one process at a time (a conditional UPDATE), so several ``xdsi serve``
processes on one index never run a job twice; a claim older than :data:`JOB_LEASE`
(its process died) is taken over.  An instance already on the first tier is not copied
again, so a job run twice costs one index read.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import TYPE_CHECKING, Iterable

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session

from xdsi.config import PrefetchRule
from xdsi.hl7.models import JOB_DONE, JOB_FAILED, JOB_PENDING, JOB_RUNNING, Hl7PrefetchJob
from xdsi.index.catalog import utcnow
from xdsi.index.models import Patient, Series, Study

if TYPE_CHECKING:
    from xdsi.archive import Archive

log = logging.getLogger(__name__)

__all__ = ["PrefetchJob", "PrefetchResult", "select_priors", "record_jobs", "Prefetcher", "JOB_LEASE"]

JOB_LEASE = timedelta(hours=1)  # a running job not finished by then: its process died, another takes it over


@dataclass(frozen=True)
class PrefetchJob:
    rule: PrefetchRule
    patient_id: str
    issuer: str  # "" = not stated: every issuer holding the ID (only one may, else nothing is selected)
    modality: str = ""  # the order's modality (for same_modality)
    accession_number: str = ""  # the order's own study is not a prior


@dataclass
class PrefetchResult:
    rule: str
    studies: list[str] = field(default_factory=list)  # the priors selected, most recent first
    recalled: int = 0  # instances copied to the first tier
    pushed: int = 0  # instances the push_to peer acknowledged
    errors: list[str] = field(default_factory=list)


def _years_ago(today: date, years: int) -> str:
    try:
        cut = today.replace(year=today.year - years)
    except ValueError:  # 29 February
        cut = today.replace(year=today.year - years, day=28)
    return cut.strftime("%Y%m%d")


def select_priors(archive: "Archive", job: PrefetchJob, today: date | None = None) -> list[str]:
    """The Study Instance UIDs the rule selects for the patient, most recent first (index only, no file opened)."""
    rule = job.rule
    if rule.same_modality and not job.modality:
        return []  # the order says no modality: "same modality" selects nothing rather than everything
    stmt = (
        select(Study.pk, Study.study_uid, Study.study_date, Study.study_time, Study.accession_number, Patient.issuer_of_patient_id)
        .join(Patient, Study.patient_fk == Patient.pk)
        .where(Patient.patient_id == job.patient_id, Patient.scope_study_uid == "")
    )
    if job.issuer:
        stmt = stmt.where(Patient.issuer_of_patient_id == job.issuer)
    if rule.years:
        stmt = stmt.where(Study.study_date >= _years_ago(today or date.today(), rule.years), Study.study_date != "")
    with archive.index.read_session() as s:
        studies = s.execute(stmt).all()
        if len({row.issuer_of_patient_id for row in studies}) > 1:
            log.warning("prefetch %s: Patient ID %r is held under several issuers and the message names none: nothing selected",
                        rule.name, job.patient_id)
            return []
        pks = [row.pk for row in studies]
        series: dict[int, list[tuple[str, str]]] = {}
        for i in range(0, len(pks), 500):
            for study_fk, modality, body_part in s.execute(
                select(Series.study_fk, Series.modality, Series.body_part).where(Series.study_fk.in_(pks[i : i + 500]))
            ):
                series.setdefault(study_fk, []).append(((modality or "").upper(), (body_part or "").upper()))
    chosen = []
    for row in sorted(studies, key=lambda r: (r.study_date or "", r.study_time or "", r.pk), reverse=True):
        if job.accession_number and row.accession_number == job.accession_number:
            continue
        have = series.get(row.pk, [])
        if rule.modalities and not any(m in rule.modalities for m, _ in have):
            continue
        if rule.body_parts and not any(b in rule.body_parts for _, b in have):
            continue
        if rule.same_modality and not any(m == job.modality for m, _ in have):
            continue
        chosen.append(row.study_uid)
        if rule.last_studies and len(chosen) >= rule.last_studies:
            break
    return chosen


def recall_studies(archive: "Archive", study_uids: Iterable[str]) -> tuple[int, list[str]]:
    """Copy every instance of the studies that has no first-tier copy to the first tier; (instances recalled, errors)."""
    from xdsi.archive.retrieve import NotAvailable, RetrieveService

    reader = RetrieveService(archive.settings, archive.index, archive.tiers)
    reader.recall = True  # a prefetch is a recall, whatever [storage] recall_on_read says about ordinary reads
    hot = archive.tiers.hot.name
    recalled, errors = 0, []
    for uid in study_uids:
        for ref in archive.retrieve.select(study_uids=[uid]):
            if not ref.copies or ref.copies[0][0] == hot:
                continue
            try:
                path = reader.path(ref)
            except (NotAvailable, OSError) as exc:
                errors.append(f"{ref.sop_instance_uid}: {exc}")
                continue
            if archive.tiers.hot.root.resolve() in path.parents:
                recalled += 1
            else:
                errors.append(f"{ref.sop_instance_uid}: not recalled (the first tier refused the copy); left on {ref.copies[0][0]}")
    return recalled, errors


def push_studies(archive: "Archive", peer_ae: str, study_uids: Iterable[str]) -> tuple[int, list[str]]:
    """C-STORE the studies' instances, as stored, to a ``[peers.AE]``; (instances acknowledged, errors)."""
    from pynetdicom import AE

    peer = archive.settings.peer(peer_ae)
    if peer is None:
        return 0, [f"push_to {peer_ae!r} is not a configured peer"]
    refs = [ref for uid in study_uids for ref in archive.retrieve.select(study_uids=[uid])]
    if not refs:
        return 0, []
    ae = AE(ae_title=archive.settings.ae_title)
    ae.acse_timeout, ae.dimse_timeout, ae.network_timeout = archive.settings.acse_timeout, archive.settings.dimse_timeout, archive.settings.network_timeout
    for sop_class, syntax in sorted({(r.sop_class_uid, r.transfer_syntax_uid) for r in refs}):
        ae.add_requested_context(sop_class, [syntax])
    tls_args = None
    if peer.tls:
        from xdsi.security.tls import client_context

        tls_args = (client_context(archive.settings.tls, check_hostname=False), None)
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, tls_args=tls_args)
    if not assoc.is_established:
        return 0, [f"association to {peer_ae} ({peer.host}:{peer.port}) was not established"]
    done, errors = 0, []
    try:
        for ref in refs:
            try:
                rsp = assoc.send_c_store(archive.retrieve.path(ref))
            except Exception as exc:  # noqa: BLE001 - one instance must not stop the others
                errors.append(f"{ref.sop_instance_uid}: {exc}")
                continue
            status = getattr(rsp, "Status", None)
            if status is not None and (status == 0 or 0xB000 <= status <= 0xBFFF):
                done += 1
            else:
                errors.append(f"{ref.sop_instance_uid}: C-STORE status {status!r}")
            if not assoc.is_established:
                errors.append(f"association to {peer_ae} ended")
                break
    finally:
        if assoc.is_established:
            assoc.release()
    return done, errors


def record_jobs(session: Session, rules: Iterable[PrefetchRule], message_type: str, patient_id: str, issuer: str,
                modality: str = "", accession_number: str = "", control_id: str = "", now: datetime | None = None) -> int:
    """One pending job per rule that ``message_type`` triggers, in the caller's transaction (the message's); how many."""
    now = now or utcnow()
    n = 0
    for rule in rules:
        if message_type not in rule.triggers:
            continue
        session.add(Hl7PrefetchJob(
            rule=rule.name, patient_id=patient_id, issuer_of_patient_id=issuer, modality=modality.upper(),
            accession_number=accession_number, message_type=message_type, message_control_id=control_id,
            state=JOB_PENDING, studies=0, recalled=0, pushed=0, error="", created_at=now,
        ))
        n += 1
    return n


class Prefetcher:
    """The background worker: claims pending jobs from the index, recalls (and pushes) their priors, records the outcome."""

    def __init__(self, archive: "Archive", poll_interval: float = 10.0) -> None:
        self.archive = archive
        self.poll_interval = poll_interval  # jobs recorded by another process are found within this many seconds
        self.results: list[PrefetchResult] = []  # this process's last outcomes (bounded), for tests and logs
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hl7-prefetch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def wake(self) -> None:
        """New jobs were committed: look now rather than at the next poll."""
        self._wake.set()

    def open_jobs(self) -> int:
        with self.archive.index.read_session() as s:
            return int(s.scalar(select(func.count()).select_from(Hl7PrefetchJob).where(Hl7PrefetchJob.state.in_((JOB_PENDING, JOB_RUNNING)))) or 0)

    def wait_idle(self, timeout: float) -> bool:
        """No job pending or running (tests; ``xdsi`` itself never waits)."""
        deadline = datetime.now().timestamp() + timeout
        while datetime.now().timestamp() < deadline:
            if self.open_jobs() == 0:
                return True
            self._stop.wait(0.1)
        return False

    def claim(self, now: datetime | None = None) -> tuple[int, PrefetchJob | None, str] | None:
        """Take the oldest due job: (pk, the job or None when its rule is gone, rule name); None when there is none."""
        now = now or utcnow()
        due = or_(Hl7PrefetchJob.state == JOB_PENDING, and_(Hl7PrefetchJob.state == JOB_RUNNING, Hl7PrefetchJob.started_at < now - JOB_LEASE))
        rules = {r.name: r for r in self.archive.settings.hl7.prefetch}
        while True:
            with self.archive.index.session() as s:
                row = s.scalars(select(Hl7PrefetchJob).where(due).order_by(Hl7PrefetchJob.pk).limit(1)).first()
                if row is None:
                    return None
                # conditional on what we read: of two processes reading the same row, one updates it
                taken = s.execute(
                    update(Hl7PrefetchJob)
                    .where(Hl7PrefetchJob.pk == row.pk, Hl7PrefetchJob.state == row.state,
                           Hl7PrefetchJob.started_at.is_(None) if row.started_at is None else Hl7PrefetchJob.started_at == row.started_at)
                    .values(state=JOB_RUNNING, started_at=now)
                    .execution_options(synchronize_session=False)
                ).rowcount
                if taken != 1:
                    continue
                rule = rules.get(row.rule)
                job = None if rule is None else PrefetchJob(rule, row.patient_id, row.issuer_of_patient_id, row.modality, row.accession_number)
                return row.pk, job, row.rule

    def run_once(self) -> list[PrefetchResult]:
        """Run every due job now; their outcomes."""
        out = []
        while not self._stop.is_set():
            claimed = self.claim()
            if claimed is None:
                break
            pk, job, name = claimed
            if job is None:
                result = PrefetchResult(name, errors=[f"prefetch rule {name!r} is no longer configured"])
            else:
                try:
                    result = self.run_job(job)
                except Exception as exc:  # a failed job must not end the worker
                    log.exception("prefetch %s for patient %r failed", job.rule.name, job.patient_id)
                    result = PrefetchResult(name, errors=[f"{type(exc).__name__}: {exc}"])
            with self.archive.index.session() as s:
                s.execute(update(Hl7PrefetchJob).where(Hl7PrefetchJob.pk == pk).values(
                    state=JOB_FAILED if result.errors else JOB_DONE, studies=len(result.studies), recalled=result.recalled,
                    pushed=result.pushed, error="; ".join(result.errors)[:4000], finished_at=utcnow(),
                ).execution_options(synchronize_session=False))
            self.results = (self.results + [result])[-100:]
            out.append(result)
        return out

    def run_job(self, job: PrefetchJob) -> PrefetchResult:
        result = PrefetchResult(job.rule.name)
        result.studies = select_priors(self.archive, job)
        if job.rule.recall and result.studies:
            result.recalled, errors = recall_studies(self.archive, result.studies)
            result.errors.extend(errors)
        if job.rule.push_to and result.studies:
            from xdsi.audit.hub import audited_push  # Begin Transferring + Instances Transferred per study ([audit] on)

            result.pushed, errors = audited_push(self.archive, job.rule.push_to, result.studies, push_studies)
            result.errors.extend(errors)
        log.info("prefetch %s for patient %r: %d prior(s), %d instance(s) recalled, %d pushed%s", job.rule.name, job.patient_id,
                 len(result.studies), result.recalled, result.pushed, f", {len(result.errors)} error(s)" if result.errors else "")
        for e in result.errors[:10]:
            log.warning("prefetch %s: %s", job.rule.name, e)
        return result

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            try:
                self.run_once()
            except Exception:  # the index unreachable for a moment: try again at the next poll
                log.exception("prefetch pass failed; next in %.0f s", self.poll_interval)
            self._wake.wait(self.poll_interval)


def prefetch_status(index) -> tuple[dict[str, int], list[Hl7PrefetchJob]]:  # type: ignore[no-untyped-def]
    """For ``xdsi status``: jobs per state, and the last failed ones (newest first)."""
    with index.read_session() as s:
        counts = {state: int(n) for state, n in s.execute(select(Hl7PrefetchJob.state, func.count()).group_by(Hl7PrefetchJob.state))}
        failed = list(s.scalars(select(Hl7PrefetchJob).where(Hl7PrefetchJob.state == JOB_FAILED).order_by(Hl7PrefetchJob.pk.desc()).limit(5)))
    return counts, failed
