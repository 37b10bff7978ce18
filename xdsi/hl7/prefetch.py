"""``[[prefetch]]``: a patient's relevant priors made ready before the new study is read.

An order (ORM^O01 / OMI^O23) or an admission (ADT^A01/A04/A05) names a patient; each
rule the message type triggers selects priors from the index alone (same modality or
body part, the last N studies, the last N years) and then

* recalls them: every instance with no copy on the first tier is copied there from the
  fastest tier that has one, verified against its checksum, by the archive's own
  read path (:meth:`xdsi.archive.retrieve.RetrieveService.path`, recall forced on);
* fetches the priors only a remote holds: each ``[remotes.NAME]`` the rule names (``remotes``; default
  the ``[gateway] remotes`` when the gateway is on) is asked by one STUDY level C-FIND on the Patient ID,
  the same filters apply to local and remote studies together ("the last 3" wherever they are, the
  remote's modalities from ModalitiesInStudy or a SERIES level C-FIND), and what we do not hold is
  fetched by the gateway's :class:`xdsi.gateway.fetch.Fetcher` (C-MOVE to us, or C-GET) onto the first
  tier.  A C-MOVE fetch needs our storage SCP running (``xdsi serve``): the remote sends to it;
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
from typing import TYPE_CHECKING, Any, Callable, Iterable

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session

from xdsi.config import PrefetchRule
from xdsi.dimse import reactor_pause
from xdsi.hl7.models import JOB_DONE, JOB_FAILED, JOB_PENDING, JOB_RUNNING, Hl7PrefetchJob
from xdsi.index.catalog import utcnow
from xdsi.index.models import Patient, Series, Study
from xdsi.uids import is_valid_uid

if TYPE_CHECKING:
    from xdsi.archive import Archive

log = logging.getLogger(__name__)

__all__ = ["PrefetchJob", "PrefetchResult", "select_priors", "plan_priors", "record_jobs", "Prefetcher", "JOB_LEASE"]

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
    fetched: int = 0  # instances fetched from remotes to the first tier (the job row counts them with ``recalled``)


def _years_ago(today: date, years: int) -> str:
    try:
        cut = today.replace(year=today.year - years)
    except ValueError:  # 29 February
        cut = today.replace(year=today.year - years, day=28)
    return cut.strftime("%Y%m%d")


@dataclass
class Candidate:
    """A study of the patient, held by us (``remote`` None) or by a remote that answered our C-FIND."""

    study_uid: str
    study_date: str
    study_time: str
    accession_number: str
    modalities: set[str] | None  # None: the remote did not say (asked at SERIES level when a rule needs it)
    body_parts: set[str] | None
    order: int = 0  # local: index pk (the tie-breaker of equal dates); remote: 0
    remote: Any = None  # the RemoteClient holding it


def _local_candidates(archive: "Archive", job: PrefetchJob, today: date | None) -> tuple[list[Candidate] | None, str]:
    """The patient's studies in our index (None: the ID is held under several issuers and the message names none),
    and the issuer they are held under ("" when none or not stated)."""
    rule = job.rule
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
            return None, ""
        pks = [row.pk for row in studies]
        series: dict[int, list[tuple[str, str]]] = {}
        for i in range(0, len(pks), 500):
            for study_fk, modality, body_part in s.execute(
                select(Series.study_fk, Series.modality, Series.body_part).where(Series.study_fk.in_(pks[i : i + 500]))
            ):
                series.setdefault(study_fk, []).append(((modality or "").upper(), (body_part or "").upper()))
    issuer = next(iter({row.issuer_of_patient_id or "" for row in studies}), "")
    return [Candidate(row.study_uid, row.study_date or "", row.study_time or "", row.accession_number or "",
                      {m for m, _ in series.get(row.pk, [])}, {b for _, b in series.get(row.pk, [])}, row.pk)
            for row in studies], issuer


def _choose(candidates: list[Candidate], job: PrefetchJob, today: date | None,
            describe: Callable[[Candidate], None] | None = None) -> list[Candidate]:
    """The rule's filters over the candidates, most recent first, at most ``last_studies``.

    ``describe`` fills in what a remote did not say (modalities, body parts) when a filter needs it,
    only for candidates that passed the other filters, so "the last 3" costs at most a few queries.
    A study whose modality or body part stays unknown is not selected: prefetching is an optimisation,
    and fetching what the rule did not ask for fills the cache (and perhaps a workstation) for nothing.
    """
    rule = job.rule
    cut = _years_ago(today or date.today(), rule.years) if rule.years else ""
    chosen = []
    for c in sorted(candidates, key=lambda c: (c.study_date, c.study_time, c.order), reverse=True):
        if job.accession_number and c.accession_number == job.accession_number:
            continue
        if cut and (not c.study_date or c.study_date < cut):
            continue
        need_modality = bool(rule.modalities) or rule.same_modality
        if (need_modality and c.modalities is None) or (rule.body_parts and c.body_parts is None):
            if describe is not None:
                describe(c)
        if (need_modality and c.modalities is None) or (rule.body_parts and c.body_parts is None):  # still unknown
            continue
        if rule.modalities and not (c.modalities or set()) & set(rule.modalities):
            continue
        if rule.body_parts and not (c.body_parts or set()) & set(rule.body_parts):
            continue
        if rule.same_modality and job.modality not in (c.modalities or set()):
            continue
        chosen.append(c)
        if rule.last_studies and len(chosen) >= rule.last_studies:
            break
    return chosen


def select_priors(archive: "Archive", job: PrefetchJob, today: date | None = None) -> list[str]:
    """The Study Instance UIDs the rule selects for the patient, most recent first (index only, no file opened)."""
    if job.rule.same_modality and not job.modality:
        return []  # the order says no modality: "same modality" selects nothing rather than everything
    local, _ = _local_candidates(archive, job, today)
    return [c.study_uid for c in _choose(local or [], job, today)]


# -- priors a remote holds (issue 15: "fetch them from remotes") -----------------------------------------------

WILDCARDS = set("*?\\")  # a Patient ID with these would be a wildcard or a list in a C-FIND: never sent


def _values(ds: Any, keyword: str) -> set[str] | None:
    """A (multi-valued) attribute of a C-FIND answer, upper-cased; None when the remote left it out or empty."""
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    items = [value] if isinstance(value, str) else list(value)
    out = {str(v).strip().upper() for v in items if str(v).strip()}
    return out or None


def remote_candidates(clients: list[Any], job: PrefetchJob, today: date | None,
                      problems: list[str], issuer: str = "") -> list[Candidate]:
    """The patient's studies the remotes hold, by one STUDY level C-FIND on Patient ID to each (in parallel).

    Only answers whose Patient ID is exactly the job's are used (a remote that matches loosely must not
    bring another patient's study), and, when the message names an issuer, whose Issuer of Patient ID
    is that issuer or not stated (a PACS of one assigning authority often does not return it); ``issuer``
    is the message's or, when it names none, the one we hold the patient under.  With no issuer known and
    answers under several issuers, the ID is several patients: nothing is taken.  A study several remotes
    hold is taken from the first in the rule's order.
    """
    from pydicom.dataset import Dataset
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND

    from xdsi.gateway.find import find_each

    if not clients or not job.patient_id or set(job.patient_id) & WILDCARDS:
        return []
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.PatientID = job.patient_id
    q.IssuerOfPatientID = ""
    q.StudyInstanceUID = ""
    q.StudyDate = f"{_years_ago(today or date.today(), job.rule.years)}-" if job.rule.years else ""
    q.StudyTime = ""
    q.AccessionNumber = ""
    q.ModalitiesInStudy = ""
    q.BodyPartExamined = ""  # not a study level key; some archives answer it anyway
    matches, failed = find_each(q, FIND, clients)
    problems.extend(f"remote {name}: {why}" for name, why in failed.items())
    out: dict[str, Candidate] = {}
    seen_issuers: set[str] = set()
    for client, ds in sorted(matches, key=lambda m: clients.index(m[0])):
        uid = str(ds.get("StudyInstanceUID", "") or "").strip()
        if not uid or uid in out or str(ds.get("PatientID", "") or "") != job.patient_id:
            continue
        theirs = str(ds.get("IssuerOfPatientID", "") or "").strip()
        if issuer and theirs and theirs != issuer:
            continue
        seen_issuers.add(theirs)
        if not is_valid_uid(uid):
            problems.append(f"remote {client.remote.name}: answered an invalid Study Instance UID {uid[:40]!r}")
            continue
        out[uid] = Candidate(uid, str(ds.get("StudyDate", "") or "").strip(), str(ds.get("StudyTime", "") or "").strip(),
                             str(ds.get("AccessionNumber", "") or "").strip(), _values(ds, "ModalitiesInStudy"),
                             _values(ds, "BodyPartExamined"), 0, client)
    if not issuer and len(seen_issuers - {""}) > 1:
        problems.append(f"Patient ID {job.patient_id!r} is held by the remotes under several issuers and the message names none: "
                        "nothing fetched")
        return []
    return list(out.values())


def describe_from_series(c: Candidate) -> None:
    """Modalities and body parts of a remote's study from a SERIES level C-FIND (what ModalitiesInStudy left open)."""
    from pydicom.dataset import Dataset
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND

    from xdsi.gateway.find import find_each

    q = Dataset()
    q.QueryRetrieveLevel = "SERIES"
    q.StudyInstanceUID = c.study_uid
    q.SeriesInstanceUID = ""
    q.Modality = ""
    q.BodyPartExamined = ""
    matches, failed = find_each(q, FIND, [c.remote])
    if failed:
        log.warning("prefetch: SERIES level C-FIND for %s: %s", c.study_uid, "; ".join(failed.values()))
        return
    modalities = set().union(*(_values(ds, "Modality") or set() for _, ds in matches)) if matches else set()
    body_parts = set().union(*(_values(ds, "BodyPartExamined") or set() for _, ds in matches)) if matches else set()
    if c.modalities is None and modalities:
        c.modalities = modalities
    if c.body_parts is None and body_parts:
        c.body_parts = body_parts


@dataclass
class Plan:
    """What a job does: the priors chosen, most recent first; those held here (recall), those a remote holds (fetch)."""

    chosen: list[Candidate]
    errors: list[str] = field(default_factory=list)

    @property
    def studies(self) -> list[str]:
        return [c.study_uid for c in self.chosen]

    @property
    def local(self) -> list[str]:
        return [c.study_uid for c in self.chosen if c.remote is None]

    @property
    def remote(self) -> list[Candidate]:
        return [c for c in self.chosen if c.remote is not None]


def plan_priors(archive: "Archive", job: PrefetchJob, clients: list[Any], today: date | None = None) -> Plan:
    """Local and remote candidates, the rule's filters over both together ("the last 3" counts wherever they are)."""
    if job.rule.same_modality and not job.modality:
        return Plan([])
    local, issuer = _local_candidates(archive, job, today)
    if local is None:
        return Plan([])
    errors: list[str] = []
    held = {c.study_uid for c in local}
    remote = [c for c in remote_candidates(clients, job, today, errors, job.issuer or issuer) if c.study_uid not in held]
    # a study we hold under another Patient ID is not "what the remote holds": it is ours, and not this patient's
    remote = [c for c in remote if not archive.retrieve.select(study_uids=[c.study_uid])]
    return Plan(_choose(local + remote, job, today, describe_from_series), errors)


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
    reactor_pause.install(assoc)  # pynetdicom's pause before a send made reliable
    if not assoc.is_established:
        return 0, [f"association to {peer_ae} ({peer.host}:{peer.port}) was not established"]
    done, errors = 0, []
    try:
        for ref in refs:
            try:
                if ref.identity is None:
                    rsp = assoc.send_c_store(archive.retrieve.path(ref))
                else:  # HL7 changed this study's patient identity after storage: the index's goes out (issue 15)
                    with archive.retrieve.produce(ref, [ref.transfer_syntax_uid]) as produced:
                        rsp = assoc.send_c_store(produced.file_path())
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


def fetch_studies(archive: "Archive", fetcher: Any, studies: list[Candidate], job: PrefetchJob) -> tuple[int, list[str], list[str]]:
    """Fetch the remotes' priors to the first tier through the gateway's Fetcher (C-MOVE to us, or C-GET);
    (instances now held, the studies ready to push, errors).

    A fetched study counts as ready only when our index holds it under the job's Patient ID (and issuer,
    when both say one): a remote that answered the C-FIND for one patient and sent another's study is
    never pushed to a workstation as this patient's prior.
    """
    fetched, ready, errors = 0, [], []
    for c in studies:
        try:
            fetcher([c.study_uid], client=c.remote)
        except Exception as exc:  # one remote's failure must not stop the other priors
            log.exception("prefetch: fetch of %s from %s failed", c.study_uid, c.remote)
            errors.append(f"{c.study_uid}: fetch from {c.remote.remote.name} failed: {type(exc).__name__}: {exc}")
            continue
        refs = archive.retrieve.select(study_uids=[c.study_uid])
        if not refs:
            errors.append(f"{c.study_uid}: not fetched from {c.remote.remote.name}")
            continue
        with archive.index.read_session() as s:
            owners = set(s.execute(
                select(Patient.patient_id, Patient.issuer_of_patient_id).join(Study, Study.patient_fk == Patient.pk)
                .where(Study.study_uid == c.study_uid)
            ).all())
        if any(pid != job.patient_id or (job.issuer and issuer and issuer != job.issuer) for pid, issuer in owners):
            errors.append(f"{c.study_uid}: fetched from {c.remote.remote.name} but it belongs to patient "
                          f"{', '.join(sorted(p for p, _ in owners))!r}, not {job.patient_id!r}: not pushed")
            continue
        fetched += len(refs)
        ready.append(c.study_uid)
    return fetched, ready, errors


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
        self._remotes: Any = None  # our own xdsi.gateway.remotes.Remotes when the gateway's is not at hand

    def remote_clients(self, rule: PrefetchRule) -> list[Any]:
        """The remotes the rule asks: its ``remotes``, else the ``[gateway] remotes`` when the gateway is on; those offering find.

        The gateway's clients when it runs in this process (one limit on associations to each remote for
        the gateway and the prefetch together), else our own."""
        settings = self.archive.settings
        names = rule.remotes if rule.remotes is not None else (settings.gateway.remotes if settings.gateway.enabled else ())
        if not names:
            return []
        remotes = getattr(getattr(self.archive.retrieve, "fetch_missing", None), "gateway", None)
        remotes = getattr(remotes, "remotes", None)
        if remotes is None:
            if self._remotes is None:
                from xdsi.gateway.remotes import Remotes
                from xdsi.security.tls import client_context

                self._remotes = Remotes(settings, lambda: client_context(settings.tls, check_hostname=False))
            remotes = self._remotes
        clients = [remotes.client(n) for n in names if n in settings.remotes]
        return [c for c in clients if c.remote.offers("find") and (c.remote.offers("move") or c.remote.offers("get"))]

    def _fetcher(self) -> Any:
        """The gateway's on-demand Fetcher when it is on (a WADO-RS request and a prefetch of one study fetch it once), else one of ours."""
        from xdsi.gateway.fetch import Fetcher

        current = getattr(self.archive.retrieve, "fetch_missing", None)
        if isinstance(current, Fetcher):
            return current
        if getattr(self, "_own_fetcher", None) is None:
            self._own_fetcher = Fetcher(None, self.archive)  # always called with the remote to fetch from
        return self._own_fetcher

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
                    state=JOB_FAILED if result.errors else JOB_DONE, studies=len(result.studies), recalled=result.recalled + result.fetched,
                    pushed=result.pushed, error="; ".join(result.errors)[:4000], finished_at=utcnow(),
                ).execution_options(synchronize_session=False))
            self.results = (self.results + [result])[-100:]
            out.append(result)
        return out

    def run_job(self, job: PrefetchJob) -> PrefetchResult:
        result = PrefetchResult(job.rule.name)
        clients = self.remote_clients(job.rule)
        plan = plan_priors(self.archive, job, clients)
        result.studies = plan.studies
        result.errors.extend(plan.errors)
        if job.rule.recall and plan.local:
            result.recalled, errors = recall_studies(self.archive, plan.local)
            result.errors.extend(errors)
        ready = list(plan.local)
        if plan.remote:
            result.fetched, fetched, errors = fetch_studies(self.archive, self._fetcher(), plan.remote, job)
            result.errors.extend(errors)
            ready += fetched
        if job.rule.push_to and ready:
            from xdsi.audit.hub import audited_push  # Begin Transferring + Instances Transferred per study ([audit] on)

            result.pushed, errors = audited_push(self.archive, job.rule.push_to, [u for u in result.studies if u in ready], push_studies)
            result.errors.extend(errors)
        log.info("prefetch %s for patient %r: %d prior(s), %d instance(s) recalled, %d fetched from remotes, %d pushed%s", job.rule.name,
                 job.patient_id, len(result.studies), result.recalled, result.fetched, result.pushed,
                 f", {len(result.errors)} error(s)" if result.errors else "")
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
