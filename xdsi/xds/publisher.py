"""Deciding when a study is published, replaced or deprecated, and delivering the outbox.

* A study is published once it has been *stable* (no instance added or
  removed) for ``stability_delay`` seconds, or at once by ``xdsi publish``.
* When a published study changes, a new manifest is built; it replaces the
  registered one with an RPLC association, decided at send time from what the
  registry actually accepted (``xds_manifest``), so a manifest that was never
  registered is never an RPLC target.
* When every instance of a published study is gone, its manifest is deprecated
  (ITI-57 availability status update) rather than left pointing at nothing.

Preparing a submission stores the KOS in the archive (so C-FIND and RAD-69
see it, and ITI-43 can serve it before it is registered, as ITI-41's expected
actions require) and keeps the KOS, the study snapshot it was built from, the
last metadata sent and the registry's last answer under ``keep_dir`` for
inspection.  The metadata is rebuilt from the snapshot and the *current*
configuration at each attempt, so a submission rejected for a bad code is
delivered after the codes are fixed, without anything else being re-sent.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from sqlalchemy import func, select

from xdsi.archive import Archive
from xdsi.index.models import Study
from xdsi.index.xds_models import (
    DONE,
    GAVE_UP,
    KIND_DEPRECATE,
    KIND_PUBLISH,
    PENDING,
    SENDING,
    SUPERSEDED,
    XdsManifest,
    XdsSubmission,
)
from xdsi.uids import validate_uid
from xdsi.wire.ebrs import RegistryResult
from xdsi.xds.client import RegistryClient, RepositoryClient, XdsTransportError
from xdsi.xds.codes import CodeTable
from xdsi.xds.manifest import InstanceRow, RetrieveInfo, SeriesRow, StudySnapshot, build_kos, load_study
from xdsi.xds.metadata import (
    DocumentInfo,
    MetadataError,
    build_deprecation,
    build_submission,
    new_entry_uuid,
    oid_uid,
    pretty,
)
from xdsi.xds.patients import PatientNotPublishable, patient_ids
from xdsi.xds.outbox import Claim, Outbox, _aware, utcnow
from xdsi.xds.recovery import proves_registered

log = logging.getLogger(__name__)


def snapshot_to_json(snap: StudySnapshot, created: datetime) -> str:
    d = asdict(snap)
    d["updated_at"] = snap.updated_at.isoformat() if snap.updated_at else None
    d["created"] = created.isoformat()
    return json.dumps(d, indent=1)


def snapshot_from_json(text: str) -> tuple[StudySnapshot, datetime]:
    d = json.loads(text)
    created = datetime.fromisoformat(d.pop("created"))
    d["updated_at"] = datetime.fromisoformat(d["updated_at"]) if d.get("updated_at") else None
    d["procedure_code"] = tuple(d["procedure_code"]) if d.get("procedure_code") else None
    d["series"] = tuple(
        SeriesRow(
            s["series_uid"], s["modality"], s["body_part"], tuple(InstanceRow(**i) for i in s["instances"]),
            s.get("series_number"), tuple(tuple(r) for r in s.get("anatomic_regions", ())),  # type: ignore[misc]
        )
        for s in d["series"]
    )
    return StudySnapshot(**d), created


@dataclass
class Outcome:
    """What one delivery attempt ended with, for the CLI and the logs."""

    pk: int
    study_uid: str
    state: str
    status: str
    errors: str
    transaction: str = ""


class Publisher:
    def __init__(self, archive: Archive, owner: str | None = None) -> None:
        self.archive = archive
        self.settings = archive.settings
        self.x = archive.settings.xds
        self.codes = CodeTable.load(self.x.codes_file)
        self.outbox = Outbox(archive.index, self.x, owner)
        self.keep_dir = (self.x.keep_dir or (self.settings.data_dir / "xds")).resolve()
        self._registry: RegistryClient | None = None
        self._repository: RepositoryClient | None = None
        self._refused: set[tuple[str, str]] = set()  # (study, reason) refused and already logged
        self._retry_refused: dict[str, float] = {}  # study -> monotonic time before which it is not asked again

    # -- peers -------------------------------------------------------------------------------
    def registry(self) -> RegistryClient:
        if self._registry is None:
            self._registry = RegistryClient(self.x.registry_url, timeout=self.x.timeout, tls=self.settings.tls)
        return self._registry

    def update_client(self) -> RegistryClient:
        url = self.x.update_url or self.x.registry_url
        if not url:
            raise MetadataError("deprecating a manifest needs [xds] update_url or registry_url (ITI-57 endpoint)")
        if url == self.x.registry_url:
            return self.registry()
        return RegistryClient(url, timeout=self.x.timeout, tls=self.settings.tls)

    def repository(self) -> RepositoryClient:
        if self._repository is None:
            self._repository = RepositoryClient(self.x.repository_url, timeout=self.x.timeout, tls=self.settings.tls)
        return self._repository

    def retrieve_info(self) -> RetrieveInfo:
        """Where consumers retrieve from: the KOS Retrieve URL is built on ``[server] public_url``, never the bind address."""
        s = self.settings
        return RetrieveInfo(
            ae_title=self.x.retrieve_ae_title or s.ae_title,
            location_uid=self.x.repository_unique_id,
            wado_rs_base=self.x.retrieve_url or (f"{s.public_url}/dicomweb" if s.public_url else ""),
        )

    def new_uid(self) -> str | None:
        """A UID under this installation's root for the KOS we create (None: build_kos's own 2.25 UID)."""
        from xdsi.installation import new_uid_under

        return new_uid_under(self.x.uid_root) if self.x.uid_root else None

    # -- files kept for inspection -----------------------------------------------------------------
    def study_dir(self, study_uid: str) -> Path:
        return self.keep_dir / validate_uid(study_uid, "Study Instance UID")

    def kept(self, study_uid: str, kos_uid: str, suffix: str) -> Path:
        return self.study_dir(study_uid) / f"{validate_uid(kos_uid, 'SOP Instance UID')}{suffix}"

    # -- deciding ------------------------------------------------------------------------------------
    def our_manifests(self, study_uid: str) -> set[str]:
        with self.archive.index.session() as s:
            return set(s.scalars(select(XdsSubmission.kos_sop_uid).where(XdsSubmission.study_uid == study_uid)).all())

    def due_studies(self, now: datetime | None = None) -> list[str]:
        """Studies stable for ``stability_delay`` that changed since their last submission, and vanished ones."""
        now = now or utcnow()
        cutoff = now - timedelta(seconds=self.x.stability_delay)
        last = (
            select(func.max(XdsSubmission.created_at))
            .where(XdsSubmission.study_uid == Study.study_uid, XdsSubmission.state != SUPERSEDED)
            .scalar_subquery()
        )
        with self.archive.index.session() as s:
            changed = s.scalars(
                select(Study.study_uid).where(Study.updated_at <= cutoff, (last.is_(None)) | (Study.updated_at > last)).order_by(Study.updated_at)
            ).all()
            vanished = s.scalars(
                select(XdsManifest.study_uid).where(
                    XdsManifest.status == "approved", ~select(Study.pk).where(Study.study_uid == XdsManifest.study_uid).exists()
                )
            ).all()
        return list(dict.fromkeys([*changed, *vanished]))

    def prepare(self, study_uid: str, *, force: bool = False) -> XdsSubmission | None:
        """Queue what the study needs now (publish, replace or deprecate); the row, or None if nothing is needed.

        ``force``: queue a new manifest even when the study's instances are those already queued or
        registered: its patient changed (RAD-12 Patient Update, :mod:`xdsi.hl7.patients`), which the
        fingerprint (the SOP Instance UIDs) does not see.
        """
        study_uid = validate_uid(study_uid, "Study Instance UID")
        snap = load_study(self.archive.index, study_uid, exclude_sops=self.our_manifests(study_uid), headers=self.archive.retrieve)
        with self.archive.index.session() as s:
            registered = s.scalars(select(XdsManifest).where(XdsManifest.study_uid == study_uid)).one_or_none()
            latest = s.scalars(
                select(XdsSubmission)
                .where(XdsSubmission.study_uid == study_uid, XdsSubmission.state != SUPERSEDED)
                .order_by(XdsSubmission.pk.desc())
                .limit(1)
            ).one_or_none()
        if snap is None or snap.instance_count == 0:
            if registered is None or registered.status != "approved":
                return latest if latest is not None and latest.kind == KIND_DEPRECATE else None
            if latest is not None and latest.kind == KIND_DEPRECATE and latest.state != DONE:
                return latest
            return self._enqueue_deprecation(study_uid, registered)
        if not force and latest is not None and latest.kind == KIND_PUBLISH and latest.fingerprint == snap.fingerprint:
            return latest  # this content is already queued or registered
        patient_ids(snap, self.x)  # PatientNotPublishable: no manifest is built, stored or queued (issue 11)
        return self._enqueue_publish(snap)

    def _enqueue_publish(self, snap: StudySnapshot) -> XdsSubmission:
        manifest = build_kos(
            snap,
            self.retrieve_info(),
            now=datetime.now().astimezone(),
            series_number=self.x.manifest_series_number or None,
            sop_instance_uid=self.new_uid(),
            series_uid=self.new_uid(),
        )
        created = datetime.now(timezone.utc)
        d = self.study_dir(snap.study_uid)
        d.mkdir(parents=True, exist_ok=True)
        kos_path = self.kept(snap.study_uid, manifest.sop_instance_uid, ".dcm")
        kos_path.write_bytes(manifest.data)
        snapshot = snapshot_to_json(snap, created)
        self.kept(snap.study_uid, manifest.sop_instance_uid, ".json").write_text(snapshot)
        stored = self.archive.store.store_file(kos_path, source_ae=self.settings.ae_title)
        if not stored.ok:
            raise RuntimeError(f"the manifest of {snap.study_uid} could not be stored in the archive: {stored.reason}")
        now = utcnow()
        with self.archive.index.session() as s:
            self.outbox.supersede_pending(s, snap.study_uid)
            row = XdsSubmission(
                study_uid=snap.study_uid,
                kind=KIND_PUBLISH,
                state=PENDING,
                kos_sop_uid=manifest.sop_instance_uid,
                kos_series_uid=manifest.series_uid,
                entry_uuid=new_entry_uuid(),
                submission_set_uid=oid_uid(),
                kos_path=str(kos_path),
                kos_size=manifest.size,
                kos_sha1=manifest.sha1,
                fingerprint=manifest.fingerprint,
                instance_count=manifest.instance_count,
                next_attempt_at=now,
                snapshot=snapshot,
                created_at=now,
                updated_at=now,
            )
            s.add(row)
        log.info("queued manifest %s for study %s (%d instances)", manifest.sop_instance_uid, snap.study_uid, manifest.instance_count)
        return row

    def _enqueue_deprecation(self, study_uid: str, registered: XdsManifest) -> XdsSubmission:
        now = utcnow()
        with self.archive.index.session() as s:
            published = s.get(XdsSubmission, registered.submission_fk)
            snapshot = published.snapshot if published is not None else ""
            self.outbox.supersede_pending(s, study_uid)
            row = XdsSubmission(
                study_uid=study_uid,
                kind=KIND_DEPRECATE,
                state=PENDING,
                kos_sop_uid=registered.kos_sop_uid,
                entry_uuid=registered.entry_uuid,
                submission_set_uid=oid_uid(),
                fingerprint=hashlib.sha1(b"").hexdigest(),
                next_attempt_at=now,
                snapshot=snapshot,
                created_at=now,
                updated_at=now,
            )
            s.add(row)
        log.info("queued deprecation of manifest %s of study %s", registered.kos_sop_uid, study_uid)
        return row

    # -- delivering ------------------------------------------------------------------------------------
    def deliver(self, claim: Claim) -> Outcome:
        row = self.outbox.get(claim.pk)
        assert row is not None
        metadata_xml = ""
        transaction = ""
        endpoint = ""
        replaces = ""
        sub = None  # the submission as built: what the audit record names (patient, submission set)
        sent = False  # the request reached the client (else nothing left us and nothing is audited)
        try:
            snap, created = snapshot_from_json(row.snapshot)
            if row.kind == KIND_DEPRECATE:
                transaction, endpoint = "ITI-57", self.x.update_url or self.x.registry_url
                patient = self._registered_patient(row) or patient_ids(snap, self.x).affinity
                sub = build_deprecation(patient, row.entry_uuid, self.x, self.codes, submission_set_uid=row.submission_set_uid)
                metadata_xml = pretty(sub.request)
                sent = True
                result = self.update_client().update(sub.request)
            else:
                data = self._kos_bytes(row)
                with self.archive.index.session() as s:
                    reg = s.scalars(select(XdsManifest).where(XdsManifest.study_uid == row.study_uid)).one_or_none()
                    if reg is not None and reg.status == "approved" and reg.entry_uuid != row.entry_uuid:
                        replaces = reg.entry_uuid
                doc = DocumentInfo(row.kos_sop_uid, row.entry_uuid, row.kos_size, row.kos_sha1, created)
                integrated = self.x.mode == "integrated"
                sub = build_submission(
                    snap, doc, self.x, self.codes, submission_set_uid=row.submission_set_uid,
                    include_repository=integrated, replaces_entry_uuid=replaces,
                )
                metadata_xml = pretty(sub.request)
                sent = True
                if integrated:
                    transaction, endpoint = "ITI-42", self.x.registry_url
                    result = self.registry().register(sub.request)
                else:
                    transaction, endpoint = "ITI-41", self.x.repository_url
                    result = self.repository().provide_and_register(sub.request, {row.entry_uuid: data})
        except (MetadataError, OSError, ValueError, LookupError) as exc:
            if sent and sub is not None:
                self._audit(transaction, endpoint, sub, "8", f"{transaction} failed: {exc}")
            return self._failed(claim, row, "not sent", str(exc), "", metadata_xml, transaction, endpoint)
        except XdsTransportError as exc:
            self._audit(transaction, endpoint, sub, "8", f"{transaction} transport error: {exc}")
            return self._failed(claim, row, "transport error", str(exc), "", metadata_xml, transaction, endpoint)
        self._keep_answer(row, metadata_xml, result)
        earlier = not result.success and proves_registered(result, row.submission_set_uid, row.kos_sop_uid if row.kind == KIND_PUBLISH else None)
        if result.success:
            self._audit(transaction, endpoint, sub, "0", None)
        elif earlier:
            self._audit(transaction, endpoint, sub, "4", f"registered by an earlier attempt whose answer was lost: {result.error_text()}")
        else:
            self._audit(transaction, endpoint, sub, "8", f"{result.status.rsplit(':', 1)[-1]}: {result.error_text()}")
        if result.success or earlier:
            self.outbox.succeeded(
                claim, status=result.status, response=result.raw, metadata=metadata_xml, error_text=result.error_text(),
                replaces=replaces, transaction=transaction, endpoint=endpoint,
            )
            if earlier:
                log.info("%s of %s for study %s: registered by an earlier attempt whose answer was lost (%s)",
                         transaction, row.kos_sop_uid, row.study_uid, result.error_text())
            else:
                log.info("%s of %s for study %s: Success", transaction, row.kos_sop_uid, row.study_uid)
            return Outcome(row.pk, row.study_uid, DONE, result.status, result.error_text(), transaction)
        return self._failed(claim, row, result.status, result.error_text(), result.raw, metadata_xml, transaction, endpoint)

    def _audit(self, transaction: str, endpoint: str, sub: object, outcome: str, description: str | None) -> None:
        """The ATNA Export for this attempt (issue 12): patient and submission set as sent; no-op when auditing is off."""
        if sub is None or getattr(self.archive, "audit", None) is None:
            return
        from xdsi.audit.xds import submission_sent

        submission_sent(self.archive, transaction, endpoint, sub.submission_set_uid, sub.patient_id, outcome, description)  # type: ignore[attr-defined]

    def _registered_patient(self, row: XdsSubmission) -> str:
        """The patientId the manifest to deprecate was registered under, from the metadata we sent; "" if unknown.

        Withdrawing a manifest must name the entry's own patient, whatever the mapping
        table or unmapped_patients policy says today (a study published before a
        mapping changed is still deprecated, issue 11).
        """
        from xdsi.xds.repository import registered_patient

        return registered_patient(self.archive, row.kos_sop_uid, row.entry_uuid)

    def _kos_bytes(self, row: XdsSubmission) -> bytes:
        """The manifest as archived (any process sharing the index and tiers can read it), checked against its SHA-1."""
        refs = self.archive.retrieve.select(study_uids=[row.study_uid], sop_uids=[row.kos_sop_uid])
        if not refs:
            raise MetadataError(f"manifest {row.kos_sop_uid} is no longer in the archive")
        with self.archive.retrieve.produce(refs[0], [refs[0].transfer_syntax_uid]) as produced:  # as stored
            data = b"".join(produced.chunks())
        if hashlib.sha1(data).hexdigest() != row.kos_sha1:
            raise MetadataError(f"the archived manifest {row.kos_sop_uid} no longer matches its recorded SHA-1")
        return data

    def _failed(self, claim, row, status, text, raw, metadata, transaction, endpoint) -> Outcome:  # type: ignore[no-untyped-def]
        log.warning("%s for study %s failed (%s): %s", transaction or "submission", row.study_uid, status, text)
        self.outbox.failed(claim, status=status, error_text=text, response=raw, metadata=metadata, transaction=transaction, endpoint=endpoint)
        after = self.outbox.get(claim.pk)
        return Outcome(row.pk, row.study_uid, after.state if after else PENDING, status, text, transaction)

    def _keep_answer(self, row: XdsSubmission, metadata_xml: str, result: RegistryResult) -> None:
        try:
            self.study_dir(row.study_uid).mkdir(parents=True, exist_ok=True)
            stem = f"{row.kos_sop_uid}.{row.kind}"
            (self.study_dir(row.study_uid) / f"{stem}.metadata.xml").write_text(metadata_xml)
            (self.study_dir(row.study_uid) / f"{stem}.response.xml").write_text(result.raw)
        except OSError as exc:
            log.warning("could not keep the submission files of %s: %s", row.study_uid, exc)

    # -- the loop -------------------------------------------------------------------------------------
    def run_once(self, now: datetime | None = None) -> list[Outcome]:
        if self.x.auto_publish:
            for study_uid in self.due_studies(now):
                if self._retry_refused.get(study_uid, 0.0) > time.monotonic():
                    continue  # refused a moment ago (a PIX Manager is not asked at every poll)
                try:
                    self.prepare(study_uid)
                    self._retry_refused.pop(study_uid, None)
                except PatientNotPublishable as exc:  # logged once per reason, not at every poll
                    self._retry_refused[study_uid] = time.monotonic() + self.x.retry_initial
                    key = (study_uid, str(exc))
                    if key not in self._refused:
                        self._refused.add(key)
                        log.warning("study %s is not published: %s", study_uid, exc)
                except Exception:  # one bad study must not stop the others
                    log.exception("could not prepare the manifest of %s", study_uid)
        return [self.deliver(c) for c in self.outbox.claim_due(now=now)]

    def publish_now(self, study_uid: str, *, wait: float = 120.0) -> Outcome | None:
        """``xdsi publish``: queue (or re-queue) the study's submission, send it now, and return the answer."""
        row = self.prepare(study_uid)
        if row is None:
            return None
        if row.state == DONE:
            return Outcome(row.pk, row.study_uid, DONE, row.last_status, row.last_error, row.transaction)
        deadline = datetime.now(timezone.utc) + timedelta(seconds=wait)
        self.outbox.requeue(row.pk)
        attempts_before = row.attempts
        while True:
            claim = self.outbox.claim(row.pk)
            if claim is not None:
                return self.deliver(claim)
            current = self.outbox.get(row.pk)
            if current is None:
                return None
            # another process (the server) is sending it, or an older submission of the study is in flight
            if current.state in (DONE, SUPERSEDED, GAVE_UP) or (current.state == PENDING and current.attempts > attempts_before):
                return Outcome(current.pk, current.study_uid, current.state, current.last_status, current.last_error, current.transaction)
            if datetime.now(timezone.utc) > deadline:
                return Outcome(current.pk, current.study_uid, current.state, "timeout", "no answer within the wait time")
            older = self._send_older(row)
            if not older:
                threading.Event().wait(0.2)

    def _send_older(self, row: XdsSubmission) -> bool:
        """Deliver older open submissions of the same study first (they must go in order)."""
        with self.archive.index.session() as s:
            older = s.scalars(
                select(XdsSubmission.pk).where(
                    XdsSubmission.study_uid == row.study_uid, XdsSubmission.pk < row.pk, XdsSubmission.state.in_((PENDING, GAVE_UP))
                )
            ).all()
        sent = False
        for pk in older:
            self.outbox.requeue(pk)
            c = self.outbox.claim(pk)
            if c is not None:
                self.deliver(c)
                sent = True
        return sent


class PublisherThread:
    """The publisher loop inside ``xdsi serve``."""

    def __init__(self, archive: Archive) -> None:
        self.publisher = Publisher(archive)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="xds-publisher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        interval = self.publisher.x.poll_interval
        while not self._stop.is_set():
            try:
                self.publisher.run_once()
            except Exception:
                log.exception("publisher pass failed; next pass in %.0f s", interval)
            self._stop.wait(interval)


def study_report(archive: Archive, study_uid: str) -> dict[str, object]:
    """What ``xdsi status --study`` prints: registered manifest, every submission with the registry's answer, kept files."""
    study_uid = validate_uid(study_uid, "Study Instance UID")
    pub_dir = (archive.settings.xds.keep_dir or archive.settings.data_dir / "xds").resolve() / study_uid
    with archive.index.session() as s:
        reg = s.scalars(select(XdsManifest).where(XdsManifest.study_uid == study_uid)).one_or_none()
        subs = s.scalars(select(XdsSubmission).where(XdsSubmission.study_uid == study_uid).order_by(XdsSubmission.pk)).all()
    return {
        "registered": None if reg is None else {"kos": reg.kos_sop_uid, "entry_uuid": reg.entry_uuid, "status": reg.status, "at": reg.registered_at},
        "submissions": [
            {
                "pk": r.pk, "kind": r.kind, "state": r.state, "kos": r.kos_sop_uid, "entry_uuid": r.entry_uuid,
                "instances": r.instance_count, "attempts": r.attempts, "transaction": r.transaction,
                "replaces": r.replaces_entry_uuid, "status": r.last_status, "error": r.last_error,
                "next_attempt": _aware(r.next_attempt_at) if r.state in (PENDING, SENDING) else None,
                "response": r.last_response, "metadata": r.last_metadata,
            }
            for r in subs
        ],
        "files": sorted(str(p) for p in pub_dir.glob("*")) if pub_dir.is_dir() else [],
    }
