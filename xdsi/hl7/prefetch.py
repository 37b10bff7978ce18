"""``[[prefetch]]``: a patient's relevant priors made ready before the new study is read.

An order (ORM^O01 / OMI^O23) or an admission (ADT^A01/A04/A05) names a patient; each
rule the message type triggers selects priors from the index alone (same modality or
body part, the last N studies, the last N years) and then

* recalls them: every instance with no copy on the first tier is copied there from the
  fastest tier that has one, verified against its checksum, by the archive's own
  read path (:meth:`xdsi.archive.retrieve.RetrieveService.path`, recall forced on);
* pushes them, when the rule names ``push_to``, to that peer by C-STORE.

The work runs on one background thread, after the ACK: a RIS waits for nobody's disk.
Jobs are held in memory; a restart forgets the ones not yet done (the next order of the
patient asks again).  The same study asked for twice while queued is recalled once.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass, field
from datetime import date
from typing import TYPE_CHECKING, Iterable

from sqlalchemy import select

from xdsi.config import PrefetchRule
from xdsi.index.models import Patient, Series, Study

if TYPE_CHECKING:
    from xdsi.archive import Archive

log = logging.getLogger(__name__)

__all__ = ["PrefetchJob", "PrefetchResult", "select_priors", "Prefetcher"]


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


class Prefetcher:
    """The background worker: jobs in, priors recalled (and pushed) one study at a time."""

    def __init__(self, archive: "Archive") -> None:
        self.archive = archive
        self.results: list[PrefetchResult] = []  # the last jobs' outcomes (for tests and `xdsi status`), bounded
        self._queue: "queue.Queue[PrefetchJob | None]" = queue.Queue()
        self._idle = threading.Event()
        self._idle.set()
        self._thread = threading.Thread(target=self._run, name="hl7-prefetch", daemon=True)
        self._pending = 0
        self._lock = threading.Lock()

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout)

    def submit(self, jobs: Iterable[PrefetchJob]) -> int:
        n = 0
        for job in jobs:
            with self._lock:
                self._pending += 1
                self._idle.clear()
            self._queue.put(job)
            n += 1
        return n

    def wait_idle(self, timeout: float) -> bool:
        """Every submitted job done (tests; `xdsi` itself never waits)."""
        return self._idle.wait(timeout)

    def run_job(self, job: PrefetchJob) -> PrefetchResult:
        result = PrefetchResult(job.rule.name)
        result.studies = select_priors(self.archive, job)
        if job.rule.recall and result.studies:
            result.recalled, errors = recall_studies(self.archive, result.studies)
            result.errors.extend(errors)
        if job.rule.push_to and result.studies:
            result.pushed, errors = push_studies(self.archive, job.rule.push_to, result.studies)
            result.errors.extend(errors)
        log.info("prefetch %s for patient %r: %d prior(s), %d instance(s) recalled, %d pushed%s", job.rule.name, job.patient_id,
                 len(result.studies), result.recalled, result.pushed, f", {len(result.errors)} error(s)" if result.errors else "")
        for e in result.errors[:10]:
            log.warning("prefetch %s: %s", job.rule.name, e)
        return result

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            try:
                result = self.run_job(job)
            except Exception as exc:  # a failed job must not end the worker
                log.exception("prefetch %s for patient %r failed", job.rule.name, job.patient_id)
                result = PrefetchResult(job.rule.name, errors=[str(exc)])
            self.results = (self.results + [result])[-100:]
            with self._lock:
                self._pending -= 1
                if self._pending == 0:
                    self._idle.set()


def jobs_for(rules: Iterable[PrefetchRule], message_type: str, patient_id: str, issuer: str, modality: str = "",
             accession_number: str = "") -> list[PrefetchJob]:
    """One job per rule that ``message_type`` triggers."""
    return [PrefetchJob(rule, patient_id, issuer, modality.upper(), accession_number) for rule in rules if message_type in rule.triggers]
