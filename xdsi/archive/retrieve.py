"""The retrieval service: every read path (C-GET/C-MOVE, WADO-URI, WADO-RS, RAD-69, ITI-43) asks it.

Adapters name an instance (an :class:`InstanceRef` from :meth:`RetrieveService.select`)
and what the requester accepts; they never see a path, a tier or the index.
The service picks the fastest tier holding a copy, recalls a cold-only
instance to the hot tier when configured to, stamps the read time that the
tier policy uses to decide what is cold, chooses the transfer syntax by the
one policy (:func:`xdsi.archive.transcode.choose`), and produces converted
bytes into a spool *before* returning (:mod:`xdsi.archive.produced`), so an
adapter can still refuse or report a failure before it announces success.
Rendering parameters are parsed by one parser (:mod:`xdsi.render.request`) and
presentation states loaded by one loader (:meth:`RetrieveService.presentation_state`).
"""

from __future__ import annotations

import logging
import os
import stat
import time
from datetime import timedelta
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, Iterable, Iterator, Sequence

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from sqlalchemy import bindparam, select, update
from sqlalchemy.exc import IntegrityError

from xdsi.archive import content, transcode
from xdsi.archive.coercion import Identity  # issue 15: patient attributes coerced after an HL7 update
from xdsi.archive import coercion
from xdsi.archive import jpip_header  # issue 16: JPIP Referenced (.94/.95) headers
from xdsi.archive.produced import BulkValue, FrameSet, Produced, new_spool
from xdsi.config import Settings
from xdsi.index.catalog import CopyRecord, add_copy, as_utc, utcnow
from xdsi.index.db import Index
from xdsi.index.models import FileCopy, Instance, Patient, Series, Study
from xdsi.storage.tiers import ChecksumMismatch, TierSet
from xdsi.uids import InvalidUID, validate_uid

if TYPE_CHECKING:
    from xdsi.render.request import RenderParams

log = logging.getLogger(__name__)
OCTET_STREAM = "application/octet-stream"


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
    # (tier, last_read_at) as :meth:`RetrieveService.select_by_identifier` found them for a C-GET/C-MOVE
    # that reads them right away: a copy read within TOUCH_INTERVAL is served without asking the index
    # again (one query per instance was a fifth of a C-GET's CPU); empty: the index is asked on each read
    read_at: tuple[tuple[str, datetime | None], ...] = field(default=(), compare=False)
    # the index's patient attributes when HL7 changed the study's identity after storage (study.identity_updated_at):
    # every read path then sends them instead of the stored ones, never the stored bytes as they are (issue 15)
    identity: Identity | None = field(default=None, compare=False)

    @property
    def size(self) -> int:
        return self.copies[0][2] if self.copies else 0


TOUCH_INTERVAL = timedelta(minutes=10)
# how long a tier folder's resolved path is reused (RetrieveService._locate): a C-GET reads a series' files
# from one folder, and resolving every component of every file's path (realpath) was a fifth of the
# sub-operation's own CPU
FOLDER_TTL = 10.0



class _SyntaxChanged(Exception):
    """The instance was switched to another transfer syntax (a compressing tier) while a recall copied it."""


class NotAvailable(LookupError):
    """The index knows the instance but no tier can deliver it."""


class CannotProvide(LookupError):
    """No transfer syntax the requester accepts can be produced for this instance (HTTP 406, WADO 0007)."""


class PresentationStateError(LookupError):
    """A presentation state named by a rendering request cannot be used; ``reason`` says why.

    ``unknown`` (no such instance), ``series`` (not in the named series),
    ``sop_class`` (not a Grayscale Softcopy Presentation State), ``study``
    (another study than the image's), ``unreadable`` (no tier delivers it).
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


GSPS_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.11.1"
NATIVE_LE = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")


@dataclass(frozen=True)
class FrameInfo:
    """What frame negotiation needs to know about an instance's Pixel Data."""

    transfer_syntax: str
    frames: int
    encapsulated: bool
    media_types: tuple[str, ...]  # PS3.18 Table 8.7.3-5 types of a stored (encapsulated) frame, standard first; () if native
    decodable: bool


def _uid_list(value: object, what: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)) or value.__class__.__name__ == "MultiValue":
        items = [str(v) for v in value]  # type: ignore[union-attr]
    else:
        items = [v for v in str(value).split("\\")]
    return [validate_uid(v.strip(), what) for v in items if v.strip()]


_COPIES = select(FileCopy.instance_fk, FileCopy.tier, FileCopy.rel_path, FileCopy.size, FileCopy.sha256, FileCopy.last_read_at)
_ONE_INSTANCE = (
    select(
        Instance.pk, Instance.sop_instance_uid, Instance.sop_class_uid, Instance.transfer_syntax_uid,
        Series.series_uid, Study.study_uid,
        FileCopy.tier, FileCopy.rel_path, FileCopy.size, FileCopy.sha256, FileCopy.last_read_at,
        Study.identity_updated_at, Patient.patient_id, Patient.issuer_of_patient_id,
        Study.patient_name, Study.patient_birth_date, Study.patient_sex,
    )
    .join(Series, Instance.series_fk == Series.pk)
    .join(Study, Series.study_fk == Study.pk)
    .join(Patient, Study.patient_fk == Patient.pk)
    .outerjoin(FileCopy, FileCopy.instance_fk == Instance.pk)
    .where(Instance.sop_instance_uid == bindparam("sop"))
)  # fmt: skip


def _identity(row: Any) -> Identity | None:
    """The identity to coerce for a row of :meth:`RetrieveService.select` / :data:`_ONE_INSTANCE`; None: send as stored."""
    if row.identity_updated_at is None:
        return None
    return Identity(row.patient_id or "", row.issuer_of_patient_id or "", row.patient_name or "",
                    row.patient_birth_date or "", row.patient_sex or "")


class RetrieveService:
    def __init__(self, settings: Settings, index: Index, tiers: TierSet) -> None:
        self.settings = settings
        self.index = index
        self.tiers = tiers
        self.recall = settings.effective_storage.recall_on_read
        # issue 15: set by the gateway when it is on; called with Study Instance UIDs a selection found nothing of
        self.fetch_missing: Callable[[list[str]], bool] | None = None
        self._folders: dict[tuple[str, str], tuple[float, Path]] = {}  # (tier, folder) -> (resolved at, path)

    def select(
        self,
        *,
        study_uids: Iterable[str] = (),
        series_uids: Iterable[str] = (),
        sop_uids: Iterable[str] = (),
        patient_id: str | None = None,
        issuer_of_patient_id: str | None = None,
        read_stamps: bool = False,
        fetch_remote: bool = False,
    ) -> list[InstanceRef]:
        """Instances matching every given constraint; an empty constraint matches anything.

        At least one constraint is required: a retrieve never means "everything".
        ``read_stamps``: keep each copy's last read time in the refs (:attr:`InstanceRef.read_at`),
        for a caller that reads them all at once, so a fresh stamp is not looked up again per read.
        ``fetch_remote``: a study found nowhere here is fetched from the gateway's remotes first (issue 15):
        for the web retrieves (WADO-RS, WADO-URI); C-MOVE/C-GET are forwarded and RAD-69 fetches itself.
        """
        study_uids, series_uids, sop_uids = list(study_uids), list(series_uids), list(sop_uids)
        if not (study_uids or series_uids or sop_uids or patient_id):
            raise InvalidUID("a retrieve needs at least one Patient ID or Study, Series or SOP Instance UID")
        # plain columns, not ORM entities: hydrating 200 Instance and FileCopy objects was most of a
        # whole-study WADO-RS's time before its first byte
        stmt = (
            select(
                Instance.pk, Instance.sop_instance_uid, Instance.sop_class_uid, Instance.transfer_syntax_uid,
                Series.series_uid, Study.study_uid,
                # the identity to send when HL7 changed it after storage, read with the rows themselves (issue 15)
                Study.identity_updated_at, Patient.patient_id, Patient.issuer_of_patient_id,
                Study.patient_name, Study.patient_birth_date, Study.patient_sex,
            )
            .join(Series, Instance.series_fk == Series.pk)
            .join(Study, Series.study_fk == Study.pk)
            .join(Patient, Study.patient_fk == Patient.pk)
        )  # fmt: skip
        if patient_id is not None:
            stmt = stmt.where(Patient.patient_id == patient_id)
            if issuer_of_patient_id is not None:
                # (Patient ID, Issuer) is the patient: the same ID from another assigning authority is someone else
                stmt = stmt.where(Patient.issuer_of_patient_id == issuer_of_patient_id)
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
            pks = [r.pk for r in rows]
            copies: dict[int, list[Any]] = {}
            for i in range(0, len(pks), 500):
                for c in s.execute(_COPIES.where(FileCopy.instance_fk.in_(pks[i : i + 500]))):
                    copies.setdefault(c.instance_fk, []).append(c)
        rank = self.tiers.rank
        for r in rows:
            cs = sorted((c for c in copies.get(r.pk, []) if c.tier in self.tiers), key=lambda c: rank(c.tier))
            out.append(
                InstanceRef(
                    pk=r.pk,
                    study_uid=r.study_uid,
                    series_uid=r.series_uid,
                    sop_instance_uid=r.sop_instance_uid,
                    sop_class_uid=r.sop_class_uid,
                    transfer_syntax_uid=r.transfer_syntax_uid,
                    copies=tuple((c.tier, c.rel_path, c.size, c.sha256) for c in cs),
                    read_at=tuple((c.tier, c.last_read_at) for c in cs) if read_stamps else (),
                    identity=_identity(r),
                )
            )
        if not out and study_uids and fetch_remote and self.fetch_missing is not None and self.fetch_missing(study_uids):
            return self.select(study_uids=study_uids, series_uids=series_uids, sop_uids=sop_uids, patient_id=patient_id,
                               issuer_of_patient_id=issuer_of_patient_id, read_stamps=read_stamps, fetch_remote=False)  # fetched (issue 15)
        return out

    def instance(self, study_uid: str, series_uid: str, sop_uid: str) -> InstanceRef | None:
        """The one instance the three UIDs name, with its copies and read stamps; None if not there (or not under them).

        Why not :meth:`select`: a viewer asks for each frame of each instance separately, and the
        ORM selection cost ~1.7 ms a request where the query itself takes ~0.1 ms.  This is one
        Core query of plain columns (instance, series, study and its copies) on the SOP Instance
        UID's unique index.  The read stamps are kept, as ``select(read_stamps=True)`` keeps them.
        """
        with self.index.engine.connect() as c:
            c.execution_options(xdsi_readonly=True)  # a deferred read transaction on SQLite (Index.read_session)
            rows = c.execute(_ONE_INSTANCE, {"sop": sop_uid}).all()
        if not rows or rows[0].study_uid != study_uid or rows[0].series_uid != series_uid:
            return None
        first = rows[0]
        cs = sorted((r for r in rows if r.tier is not None and r.tier in self.tiers), key=lambda r: self.tiers.rank(r.tier))
        return InstanceRef(
            pk=first.pk,
            study_uid=first.study_uid,
            series_uid=first.series_uid,
            sop_instance_uid=first.sop_instance_uid,
            sop_class_uid=first.sop_class_uid,
            transfer_syntax_uid=first.transfer_syntax_uid,
            copies=tuple((r.tier, r.rel_path, r.size, r.sha256) for r in cs),
            read_at=tuple((r.tier, r.last_read_at) for r in cs),
            identity=_identity(first),
        )

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
        issuer = str(identifier.get("IssuerOfPatientID", "") or "").strip() or None
        if level != "PATIENT":
            patient_id = issuer = None
        # C-GET/C-MOVE send the selection at once: a copy stamped within TOUCH_INTERVAL when selected is not asked about again
        return self.select(
            study_uids=study, series_uids=series, sop_uids=sops, patient_id=patient_id, issuer_of_patient_id=issuer, read_stamps=True
        )

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
            if fresh and fresh[0].transfer_syntax_uid != ref.transfer_syntax_uid:
                # compressed onto a tier meanwhile (issue 16): the new file is not in the syntax this ref (and the
                # caller's choice) says; serving it under the old one would be wrong pixels, a retry selects afresh
                raise NotAvailable(f"{ref.sop_instance_uid}: stored as {fresh[0].transfer_syntax_uid} since it was selected; ask again")
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
            found = self._locate(tier, rel)
            if found is None:
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
            self._touch(ref.pk, tier_name, now, dict(ref.read_at).get(tier_name))
            return found
        return None

    def _locate(self, tier, rel: str) -> Path | None:  # type: ignore[no-untyped-def]
        """The copy's resolved path, checked to stay in the tier (``Tier.abspath``), or None if it is no regular file.

        The folder is resolved by ``Tier.abspath`` at most once per :data:`FOLDER_TTL` and the file
        name joined to it; a file name that is itself a symbolic link (which ``abspath`` would follow and
        check) takes the whole ``abspath`` path, so no copy outside the tier is ever served.
        """
        folder, _, name = rel.rpartition("/")
        if not folder or name in ("", ".", "..") or "\0" in rel:
            found = tier.abspath(rel)
            return found if found.is_file() else None
        key, now = (tier.name, folder), time.monotonic()
        cached = self._folders.get(key)
        if cached is None or now - cached[0] > FOLDER_TTL:
            if len(self._folders) > 4096:
                self._folders.clear()
            cached = self._folders[key] = (now, tier.abspath(folder))
        found = cached[1] / name
        try:
            mode = os.lstat(found).st_mode
        except OSError:
            return None
        if stat.S_ISLNK(mode):
            found = tier.abspath(rel)
            return found if found.is_file() else None
        return found if stat.S_ISREG(mode) else None

    def _recall(self, ref: InstanceRef, tier, rel: str, sha: str) -> Path | None:  # type: ignore[no-untyped-def]
        """Copy to the hot tier, verified, and record the copy; the hot path, or None if it vanished."""
        hot = self.tiers.hot
        placed = hot.copy_from(tier, rel, sha)
        now = utcnow()
        try:
            with self.index.session() as s:
                # the instance row locked, as the tier policy locks it to switch an instance to a compressed syntax
                # (issue 16): a copy is recorded only in the syntax the instance still has, its size before compression kept
                current = s.scalar(select(Instance.transfer_syntax_uid).where(Instance.pk == ref.pk).with_for_update())
                if current != ref.transfer_syntax_uid:
                    raise _SyntaxChanged(str(current))
                original = s.scalar(select(FileCopy.original_size).where(FileCopy.instance_fk == ref.pk, FileCopy.tier == tier.name))
                record = CopyRecord(hot.name, placed.rel_path, placed.size, placed.sha256, ref.transfer_syntax_uid, original)
                add_copy(s, ref.pk, record, now=now)
        except IntegrityError:
            pass  # a concurrent reader recalled it first; same bytes, same path
        except _SyntaxChanged as exc:
            hot.delete(placed.rel_path)
            log.info("%s: not recalled, stored as %s since it was selected", ref.sop_instance_uid, exc)
            return None
        log.info("recalled %s from %s to %s", ref.sop_instance_uid, tier.name, hot.name)
        self._touch(ref.pk, hot.name, now)
        p = hot.abspath(placed.rel_path)
        return p if p.is_file() else None

    def _touch(self, instance_pk: int, tier: str, now, known: datetime | None = None) -> None:  # type: ignore[no-untyped-def]
        """Stamp the read time the tier policy ages studies by.

        The policy works in days, so a stamp younger than ``TOUCH_INTERVAL`` is
        left alone: reading the frames of a study does not cost one durable
        index write per frame.  ``known`` is the stamp :meth:`select` read with
        the instance: when it is fresh, the index is not asked again (a C-GET of
        200 instances made 200 such queries); when it is old or missing, the
        index is (another reader may have stamped it meanwhile).
        """
        if known is not None and as_utc(known) > now - TOUCH_INTERVAL:
            return
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

    def hot_path(self, ref: InstanceRef) -> Path | None:
        """The path of the instance's copy on the hot tier if it has a readable one; nothing recalled or stamped.

        For reading ahead (the C-GET/C-MOVE sender reads the next instance's file while the peer
        answers): the instance's own turn still goes through :meth:`path`, which stamps the read.
        """
        hot = self.tiers.hot
        for tier_name, rel, _size, _sha in ref.copies:
            if tier_name == hot.name:
                return self._locate(hot, rel)
        return None

    def open(self, ref: InstanceRef):  # type: ignore[no-untyped-def]
        return open(self.path(ref), "rb")

    def iter_paths(self, refs: Iterable[InstanceRef]) -> Iterator[tuple[InstanceRef, Path | None, str]]:
        """(ref, path, error) one at a time, so a large study is recalled and sent instance by instance."""
        for ref in refs:
            try:
                yield ref, self.path(ref), ""
            except (NotAvailable, OSError) as exc:
                yield ref, None, str(exc)

    # -- the service API of the adapters ---------------------------------------------------------

    def choose(self, ref: InstanceRef, accepted: Sequence[str], path: Path | None = None) -> tuple[transcode.Choice | None, Path | None]:
        """The one transfer-syntax policy, reading the header only when the answer depends on the pixels.

        Without the header only unchanged and native choices are known; the
        header is read (recalling a cold instance) only when a syntax we can
        produce for some pixels only (an encodable compressed syntax, or
        Explicit VR Big Endian) comes before or is that answer.
        """
        accepted = transcode.preference(accepted)
        if jpip_header.asked(accepted):  # JPIP Referenced listed: its own step in the same policy
            return jpip_header.choose(self, ref, accepted, path)
        quick = transcode.choose(ref.transfer_syntax_uid, accepted)
        if quick is not None and quick.unchanged:
            return quick, path
        cut = accepted.index(quick.transfer_syntax) if quick is not None else len(accepted)
        if not any(transcode.depends_on_pixels(t) for t in accepted[: cut + 1]):
            return quick, path
        path = path or self.path(ref)
        try:
            facts = transcode.facts(path)
        except OSError:
            raise
        except Exception as exc:  # an unreadable header: only what needs no header can be sent
            log.warning("%s: header unreadable (%s); compressed targets not considered", ref.sop_instance_uid, exc)
            return quick, path
        return transcode.choose(ref.transfer_syntax_uid, accepted, facts), path

    def produce(self, ref: InstanceRef, accepted: Sequence[str]) -> Produced:
        """The instance as a Part 10 file in the first syntax of ``accepted`` we can produce, bytes ready.

        Unchanged: the stored file (recalled to the hot tier first if it was
        cold).  Converted: written completely into a spool under
        ``settings.temp_dir`` before this returns.  Raises
        :class:`CannotProvide` (no accepted syntax fits), :class:`NotAvailable`
        (no tier delivers it), :class:`transcode.TranscodeError` (the decoder
        or encoder failed) or ``OSError`` (e.g. the spool disk is full), each
        before anything has been announced.
        """
        choice, path = self.choose(ref, accepted)
        if choice is None:
            raise CannotProvide(
                f"instance {ref.sop_instance_uid} (stored as {ref.transfer_syntax_uid}) cannot be provided in {', '.join(accepted) or '(none)'}"
            )
        path = path or self.path(ref)
        identity = ref.identity
        if choice.unchanged and identity is None:
            return Produced(choice.transfer_syntax, path, unchanged=True, spooled=False)
        # a study whose patient identity HL7 changed after storage is always written anew, even in its stored
        # syntax: the stored bytes name the old (or merged-away) patient (issue 15, xdsi.archive.coercion)
        target = choice.transfer_syntax
        write: Callable[[BinaryIO], None] = (
            jpip_header.writer(path, target, self.settings, ref.sop_instance_uid, identity)
            if jpip_header.asked([target])
            else (lambda out: transcode.write_converted(path, target, out, identity))
        )
        spool = self._spool(
            "produce-",
            write,
            lambda exc: transcode.TranscodeError(f"cannot convert to {target}: {exc.__class__.__name__}: {exc}"),
            keep=(transcode.TranscodeError, OSError),
        )
        log.debug("produced %s in %s%s", ref.sop_instance_uid, choice.transfer_syntax, " (patient identity from the index)" if identity else "")
        return Produced(choice.transfer_syntax, spool, unchanged=False, spooled=True)

    def header(self, ref: InstanceRef) -> Dataset:
        """The instance's attributes without Pixel Data (any stored syntax, deflated and big endian included).

        The patient attributes are the index's when HL7 changed the study's identity after storage (issue 15)."""
        ds = dcmread(self.path(ref), stop_before_pixels=True)
        if ref.identity is not None:
            coercion.apply(ds, ref.identity)
        return ds

    def frame_info(self, ref: InstanceRef) -> FrameInfo:
        """Raises content.NoSuchPart (no Pixel Data) or content.CannotConvert (frames we cannot cut)."""
        info = content.pixel_info(self.path(ref))
        ts = info.transfer_syntax_uid
        media_types = content.FRAME_MEDIA_TYPES.get(ts, ()) if info.encapsulated else ()
        return FrameInfo(ts, info.frames, info.encapsulated, media_types, transcode.can_decode(ts))

    def frames(self, ref: InstanceRef, numbers: Sequence[int], *, stored: bool) -> FrameSet:
        """The requested frames, produced before this returns (PS3.18 8.7.3 frame retrieval).

        ``stored``: each frame in its stored encoding (an encapsulated frame's
        bitstream; for native syntaxes the frame's bytes, inflated and in
        little endian).  Otherwise native frames: decoded, little endian,
        colour as RGB.  Raises content.NoSuchPart (no such frame, HTTP 404),
        content.CannotConvert (cannot decode, 406) or NotAvailable.
        """
        numbers = list(numbers)
        path = self.path(ref)
        info = content.pixel_info(path)
        content.check_frames(info, numbers)
        ts = info.transfer_syntax_uid
        if not info.encapsulated and ts in NATIVE_LE:  # plain ranges of the stored file: nothing can fail
            spans = [(n, info.value_offset + (n - 1) * info.frame_length, info.frame_length) for n in numbers]
            return FrameSet(str(ExplicitVRLittleEndian), OCTET_STREAM, path, spans, spooled=False)
        if stored and info.encapsulated:
            out_ts, media_type, source = ts, content.frame_media_type(ts) or OCTET_STREAM, content.stored_frames
        elif stored:
            out_ts, media_type, source = str(ExplicitVRLittleEndian), OCTET_STREAM, content.stored_frames
        else:
            if info.encapsulated and not transcode.can_decode(ts):
                raise content.CannotConvert(f"frames in {ts} cannot be decoded here")
            out_ts, media_type, source = str(ExplicitVRLittleEndian), OCTET_STREAM, content.native_frames
        spans: list[tuple[int, int, int]] = []

        def write(out: BinaryIO) -> None:
            offset = 0
            for n, data in zip(numbers, source(path, numbers)):
                out.write(data)
                spans.append((n, offset, len(data)))
                offset += len(data)
            if len(spans) != len(numbers):
                raise content.CannotConvert("fewer frames were produced than requested")

        spool = self._spool(
            "frames-",
            write,
            lambda exc: content.CannotConvert(f"cannot produce the frames: {exc.__class__.__name__}: {exc}"),
            keep=(content.ContentError, OSError),
        )
        return FrameSet(out_ts, media_type, spool, spans, spooled=True)

    def _spool(
        self,
        prefix: str,
        write: Callable[[BinaryIO], None],
        failed: Callable[[Exception], Exception],
        *,
        keep: tuple[type[Exception], ...],
    ) -> Path:
        """A spool file under ``temp_dir`` filled by ``write``, complete before anyone announces it.

        On any failure the spool is removed; the ``keep`` errors (the caller's own,
        and OSError, e.g. a full disk) pass through, anything else a decoder raises becomes ``failed(exc)``:
        still a failed conversion of this instance, never a server fault.
        """
        fd, spool = new_spool(self.settings.temp_dir, prefix)
        try:
            with os.fdopen(fd, "wb") as out:
                write(out)
        except BaseException as exc:
            spool.unlink(missing_ok=True)
            if isinstance(exc, keep) or not isinstance(exc, Exception):
                raise
            raise failed(exc) from exc
        return spool

    def bulk(self, ref: InstanceRef, tag: int) -> BulkValue:
        """A top-level element value in little-endian encoding; its length is known before anything is sent.

        Raises content.NoSuchPart (HTTP 404) or content.CannotConvert (406).
        """
        path = self.path(ref)
        length, first = content.bulk_value(path, tag)
        return BulkValue(length, first, lambda start, end: content.bulk_value(path, tag, start, end)[1])

    def presentation_state(self, study_uid: str, series_uid: str, sop_uid: str) -> Dataset:
        """The one presentation-state loader of every rendering front door (raises PresentationStateError)."""
        refs = self.select(sop_uids=[sop_uid])
        if not refs:
            raise PresentationStateError("unknown", f"no presentation state {sop_uid}")
        ref = refs[0]
        if ref.series_uid != series_uid:
            raise PresentationStateError("series", f"presentation state {sop_uid} is not in series {series_uid}")
        if ref.sop_class_uid != GSPS_SOP_CLASS:
            raise PresentationStateError(
                "sop_class", f"{sop_uid} is not a Grayscale Softcopy Presentation State ({ref.sop_class_uid})"
            )
        if ref.study_uid != study_uid:
            raise PresentationStateError("study", f"presentation state {sop_uid} belongs to another study")
        try:
            return content.dataset(self.path(ref))
        except (NotAvailable, OSError) as exc:
            raise PresentationStateError("unreadable", f"presentation state {sop_uid} cannot be read: {exc}") from None

    def render(self, ref: InstanceRef, params: "RenderParams", presentation_state: Dataset | None = None) -> bytes:
        """One rendered frame (raises xdsi.render.RenderError subclasses, NotAvailable).

        The renderer reads the file itself, decoding only the requested frame
        where the transfer syntax allows (deflated and big-endian objects whole).
        """
        from xdsi.render import InvalidParameter, NotRenderable, render

        limit = self.settings.limits.max_render_size
        for name in ("rows", "columns"):
            asked = getattr(params, name)
            if asked is not None and asked > limit:
                raise InvalidParameter(name, f"{asked} is more than this server renders ({limit}, [limits] max_render_size)")
        path = self.path(ref)
        hdr = dcmread(path, stop_before_pixels=True)
        if "Rows" not in hdr or "Columns" not in hdr:
            raise NotRenderable("object", "the object has no pixel data")
        rows, columns = int(hdr.Rows), int(hdr.Columns)
        if params.viewport_source is not None:
            params = params.resolved(rows, columns)
        if params.rows is None and params.columns is None and max(rows, columns) > limit:
            # a rendered image is a view: a source larger than the limit is scaled down to fit it,
            # so one request cannot make us build a whole-slide-sized bitmap
            params = replace(params, **({"rows": limit} if rows >= columns else {"columns": limit}))
        if ref.identity is not None and "patient" in params.annotation:
            # the patient annotation is burnt into the image: from the object as it is sent (index identity, issue 15),
            # pixels copied byte for byte into the spool
            with self.produce(ref, [ref.transfer_syntax_uid]) as produced:
                return render(produced.file_path(), presentation_state=presentation_state, **params.render_kwargs())  # type: ignore[arg-type]
        return render(path, presentation_state=presentation_state, **params.render_kwargs())  # type: ignore[arg-type]

    # -- frames re-encoded for a viewer (issue 16: HTJ2K over DICOMweb) ------------------------------

    def frame_encoding_refusal(self, ref: InstanceRef, target: str) -> str | None:
        """None when this instance's frames can be re-encoded in ``target`` (:mod:`xdsi.archive.frame_codec`), else why not."""
        from xdsi.archive import frame_codec

        return frame_codec.why_not(self.path(ref), target)

    def encoded_frames(self, ref: InstanceRef, numbers: Sequence[int], target: str) -> FrameSet:
        """The requested frames re-encoded in ``target`` (HTJ2K, JPEG 2000 lossless), produced before this returns.

        Raises content.NoSuchPart (no such frame), content.CannotConvert (these
        pixels cannot be re-encoded, or the codec failed: HTTP 406) or NotAvailable.
        """
        from xdsi.archive import frame_codec

        numbers = list(numbers)
        path = self.path(ref)
        content.check_frames(content.pixel_info(path), numbers)
        spans: list[tuple[int, int, int]] = []

        def write(out: BinaryIO) -> None:
            spans.extend(frame_codec.write_encoded(path, numbers, target, out))

        spool = self._spool(
            "frames-",
            write,
            lambda exc: content.CannotConvert(f"cannot produce the frames: {exc.__class__.__name__}: {exc}"),
            keep=(content.ContentError, OSError),
        )
        return FrameSet(target, frame_codec.media_type(target), spool, spans, spooled=True)
