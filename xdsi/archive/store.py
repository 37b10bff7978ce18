"""The one store path: C-STORE, STOW-RS and ``xdsi import`` all end here.

Order of events for every instance, so that an acknowledgement means the
instance is safe:

1. parse and check the whole file once (:func:`read_header_dataset`); bad
   input is refused before anything is written;
2. place the bytes on the hot tier durably (temporary name, fsync, rename,
   fsync directory);
3. commit the index rows, in a transaction shared with the instances other
   associations store at the same moment (:mod:`xdsi.archive.group_commit`),
   and wait for that commit;
4. only then report success to the caller (who acknowledges the peer); the
   metadata journal line is built from the parse of step 1, not by parsing
   the stored file again.

A failure at 2 or 3 removes what 2 wrote.  Step 2 never replaces a file
already at the instance's path (another store of the same instance may have
placed it and not yet committed: replacing it, then deleting "our" copy when
that store wins the index, lost the copy it acknowledged); the file is placed
beside it under a unique name.  So a crash between 2 and 3 leaves an unindexed
file, never acknowledged and never served, beside which a re-sent copy is
stored.
"""

from __future__ import annotations

import enum
import logging
import os
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from pydicom.filewriter import write_file_meta_info
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID

from sqlalchemy import bindparam, select

from xdsi.archive.group_commit import GroupCommitter
from xdsi.archive.header import InstanceHeader, InvalidDataset, read_header_dataset
from xdsi.config import Settings
from xdsi.index import catalog
from xdsi.index.db import Index
from xdsi.index.models import Instance
from xdsi.storage.early_sync import Written
from xdsi.storage.tiers import TierSet, instance_path

log = logging.getLogger(__name__)

_ARCHIVED = select(Instance.pk).where(Instance.sop_instance_uid == bindparam("uid"))


def _compiled_lookup(index: Index) -> tuple[str, Callable[[str], Any]]:
    """:data:`_ARCHIVED` as SQL text for this database's driver, and how to build its parameters."""
    compiled = _ARCHIVED.compile(dialect=index.engine.dialect)
    if compiled.positional:
        names = list(compiled.positiontup or ())
        return compiled.string, lambda uid: tuple(compiled.construct_params({"uid": uid})[n] for n in names)
    return compiled.string, lambda uid: compiled.construct_params({"uid": uid})


class Outcome(enum.Enum):
    STORED = "stored"
    REPLACED = "replaced"
    DUPLICATE = "duplicate"  # already archived, first copy kept
    REJECTED = "rejected"  # bad input
    FAILED = "failed"  # our fault: disk, database


@dataclass(frozen=True)
class StoreResult:
    outcome: Outcome
    sop_instance_uid: str = ""
    sop_class_uid: str = ""
    study_uid: str = ""
    reason: str = ""
    # for a refusal: the keyword of the attribute that does not match what the transfer declared
    # (the C-STORE command, the presentation context), so the adapter can answer A900 rather than C000
    mismatch: str = ""

    @property
    def ok(self) -> bool:
        return self.outcome in (Outcome.STORED, Outcome.REPLACED, Outcome.DUPLICATE)


@dataclass(frozen=True)
class Expected:
    """What the sender declared about the dataset before sending it; empty fields are not checked."""

    sop_class_uid: str = ""
    sop_instance_uid: str = ""

    def refusal(self, header: InstanceHeader) -> StoreResult | None:
        ids = dict(sop_instance_uid=header.sop_instance_uid, sop_class_uid=header.sop_class_uid, study_uid=header.study_uid)
        if self.sop_class_uid and header.sop_class_uid != self.sop_class_uid:
            return StoreResult(
                Outcome.REJECTED,
                reason=f"data set is SOP Class {header.sop_class_uid}, not {self.sop_class_uid} as declared",
                mismatch="SOPClassUID",
                **ids,
            )
        if self.sop_instance_uid and header.sop_instance_uid != self.sop_instance_uid:
            return StoreResult(
                Outcome.REJECTED,
                reason=f"data set is SOP Instance {header.sop_instance_uid}, not {self.sop_instance_uid} as declared",
                mismatch="SOPInstanceUID",
                **ids,
            )
        return None


class StoreService:
    def __init__(self, settings: Settings, index: Index, tiers: TierSet) -> None:
        self.settings = settings
        self.index = index
        self.tiers = tiers
        self.replace = settings.effective_storage.duplicate_policy == "replace"
        self.compress_on_receive = settings.effective_storage.compress_on_receive  # issue 16: a COMPRESS_METHODS key or None
        self.committer = GroupCommitter(index)
        self._archived_query = _compiled_lookup(index)
        # called after each instance is durable and indexed: (header, stored path, sha256);
        # a listener's failure is logged, never turned into a store failure
        self.listeners: list[Callable[[InstanceHeader, Path, str], None]] = []
        # the metadata journal (xdsi.archive.metadata.MetadataService), called before the listeners with the
        # data set the store path parsed, so it does not parse the stored file again
        self.metadata: Any = None

    def store_file(
        self, path: Path, *, source_ae: str = "", move: bool = False, expect: Expected | None = None,
        defer: Callable[[Callable[[], None]], None] | None = None, written: Written | None = None,
    ) -> StoreResult:
        """Archive the DICOM file at ``path``.

        ``move``: the file is a spool file we own (an incoming C-STORE); it may
        be renamed into the tier instead of copied.  ``expect``: the SOP Class
        and Instance the transfer announced (C-STORE command, presentation
        context); a dataset that is something else is refused, not stored.
        ``defer``: takes the metadata journal work of an instance stored (a
        callable) to run after the acknowledgement (the C-STORE adapter runs it
        right after sending the response); None runs it here.  The journal
        repairs a missing line from the stored file, so no promise depends on it.
        ``written``: ``path``'s size, sha256 and fsync as it was received (:meth:`Tier.place_file`).
        """
        try:
            header, dataset = read_header_dataset(path)
        except InvalidDataset as exc:
            return StoreResult(Outcome.REJECTED, reason=str(exc))
        if expect is not None:
            refused = expect.refusal(header)
            if refused is not None:
                return refused
        if self.compress_on_receive and header.has_file_meta and header.has_preamble:
            squeezed = self._compressed(path, header)
            if squeezed is not None:  # issue 16: stored losslessly compressed, verified against the received pixels
                header = replace(header, transfer_syntax_uid=squeezed.transfer_syntax)
                try:
                    return self._store(
                        # no parsed data set: the metadata journal reads the stored (converted) file itself
                        header, source_ae, lambda rel: self.tiers.hot.place_file(squeezed.path, rel, move=True, exclusive=True),
                        None, original_size=squeezed.original_size, defer=defer,
                    )
                finally:
                    squeezed.path.unlink(missing_ok=True)
        if not header.has_file_meta or not header.has_preamble:
            # a bare dataset, or a File Meta group without the preamble (STOW-RS parts from some
            # clients): write a complete Part 10 file so every reader (dcmtk, /metadata) can parse it
            return self._store_with_meta(path, header, source_ae, dataset, defer=defer)
        return self._store(header, source_ae,
                           lambda rel: self.tiers.hot.place_file(path, rel, move=move, exclusive=True, written=written),
                           dataset, defer=defer)

    def _compressed(self, path: Path, header: InstanceHeader) -> Any:
        """``[storage] compress_on_receive``: the received file compressed and verified, or None to store it as received.

        Anything that prevents it (not an image, already compressed, pixels the encoder does not take, an
        encoder failure or a verification mismatch) stores the instance as it came: compression is a saving,
        never a reason to refuse an instance.
        """
        from xdsi.storage import compress as compression

        target = compression.target_syntax(self.compress_on_receive)
        try:
            squeezed, why = compression.squeeze(path, target, self.tiers.hot.new_temp())
        except Exception as exc:  # CompressionMismatch, OSError, a decoder's own error: keep what was received
            log.warning("%s stored as received, not compressed: %s: %s", header.sop_instance_uid, exc.__class__.__name__, exc)
            return None
        if squeezed is None:
            log.debug("%s stored as received: %s", header.sop_instance_uid, why)
        return squeezed

    def _store_with_meta(self, path: Path, header: InstanceHeader, source_ae: str, dataset: Dataset | None = None,
                         defer: Callable[[Callable[[], None]], None] | None = None) -> StoreResult:
        """A file without a Part 10 preamble: write preamble and complete File Meta, keep the dataset bytes as they are.

        Any File Meta group the file had is replaced, not patched: the new one
        is built from the dataset's own identifying attributes and the
        transfer syntax the dataset was checked to be encoded in.
        """
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = header.sop_class_uid
        meta.MediaStorageSOPInstanceUID = header.sop_instance_uid
        meta.TransferSyntaxUID = header.transfer_syntax_uid
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        if source_ae:
            meta.SourceApplicationEntityTitle = source_ae

        def chunks():  # type: ignore[no-untyped-def]
            from io import BytesIO

            buf = BytesIO()
            buf.write(b"\x00" * 128 + b"DICM")
            write_file_meta_info(buf, meta, enforce_standard=True)  # type: ignore[arg-type]
            yield buf.getvalue()
            with open(path, "rb") as fh:
                fh.seek(header.dataset_offset)
                while chunk := fh.read(1 << 20):
                    yield chunk

        return self._store(header, source_ae, lambda rel: self.tiers.hot.place_stream(chunks(), rel, exclusive=True), dataset,
                           defer=defer)

    def _archived(self, sop_instance_uid: str) -> bool:
        """Whether the index already holds this instance: one indexed lookup on a pooled connection.

        Only a hint for where to place the file (and to spare writing a
        duplicate): the write transaction of :meth:`_store` decides, so a
        concurrent store of the same instance is still caught there.  It runs
        on the DBAPI connection, outside any transaction and the ORM: through a
        read-only ORM session the same SELECT cost ~10 % of the server's CPU per
        stored instance (measured with py-spy, issue 14).
        """
        sql, params = self._archived_query
        conn = self.index.engine.raw_connection()
        try:
            cur = conn.cursor()
            try:
                cur.execute(sql, params(sop_instance_uid))
                return cur.fetchone() is not None
            finally:
                cur.close()
        finally:
            conn.close()  # back to the pool (which rolls back whatever the driver began)

    def _store(self, header: InstanceHeader, source_ae: str, place, dataset: Dataset | None = None,  # type: ignore[no-untyped-def]
               original_size: int | None = None, defer: Callable[[Callable[[], None]], None] | None = None) -> StoreResult:
        ids = dict(
            sop_instance_uid=header.sop_instance_uid, sop_class_uid=header.sop_class_uid, study_uid=header.study_uid
        )
        existing = self._archived(header.sop_instance_uid) or None
        if existing is not None and not self.replace:
            return StoreResult(Outcome.DUPLICATE, reason="already archived; first copy kept", **ids)
        rel = instance_path(header.study_uid, header.series_uid, header.sop_instance_uid)
        if existing is not None:
            rel = rel[: -len(".dcm")] + f".{uuid.uuid4().hex[:8]}.dcm"
        hot = self.tiers.hot
        try:
            placed = place(rel)
        except OSError as exc:
            log.error("cannot write %s to tier %s: %s", header.sop_instance_uid, hot.name, exc)
            return StoreResult(Outcome.FAILED, reason=f"storage failure: {exc.strerror or exc}", **ids)
        copy = catalog.CopyRecord(hot.name, placed.rel_path, placed.size, placed.sha256, header.transfer_syntax_uid, original_size)
        try:
            # shares a transaction with instances stored at the same moment; returns once it has committed
            _, old = self.committer.run(
                lambda s: catalog.record_instance(s, header, copy, source_ae=source_ae, replace=self.replace),
                driver=lambda c: _new_only(catalog.record_new_instance(c, header, copy, source_ae=source_ae)),
            )
        except catalog.PatientMismatch as exc:
            # the study is archived for another patient: refuse rather than file it under the wrong person
            hot.delete(placed.rel_path)
            log.warning("refused %s: %s", header.sop_instance_uid, exc)
            return StoreResult(Outcome.REJECTED, reason=str(exc), **ids)
        except catalog.DuplicateInstance:
            # a concurrent store of the same instance won the race: keep its copy
            hot.delete(placed.rel_path)
            return StoreResult(Outcome.DUPLICATE, reason="already archived; first copy kept", **ids)
        except Exception as exc:
            hot.delete(placed.rel_path)
            log.exception("index commit failed for %s", header.sop_instance_uid)
            return StoreResult(Outcome.FAILED, reason=f"index failure: {exc.__class__.__name__}", **ids)
        for c in old:
            if c.tier in self.tiers and (c.tier, c.rel_path) != (hot.name, placed.rel_path):
                try:
                    self.tiers[c.tier].delete(c.rel_path)
                except OSError as exc:  # the index no longer points at it; log and go on
                    log.warning("could not delete superseded copy %s on %s: %s", c.rel_path, c.tier, exc)
        stored = placed.path if placed.path is not None else hot.abspath(placed.rel_path)
        if self.metadata is not None:
            metadata = self.metadata

            def journal() -> None:
                try:
                    metadata.record(header.study_uid, header.series_uid, header.sop_instance_uid, stored, placed.sha256,
                                    dataset=dataset, transfer_syntax_uid=header.transfer_syntax_uid)
                except Exception:
                    log.exception("metadata journal failed for %s", header.sop_instance_uid)

            if defer is None:
                journal()
            else:
                defer(journal)
        for listener in self.listeners:
            try:
                listener(header, stored, placed.sha256)
            except Exception:
                log.exception("store listener failed for %s", header.sop_instance_uid)
        return StoreResult(Outcome.REPLACED if old or existing is not None else Outcome.STORED, **ids)


def _new_only(pk: int | None) -> tuple[int, list[catalog.CopyRecord]] | None:
    """:func:`catalog.record_new_instance`'s answer in :func:`catalog.record_instance`'s form (no superseded copies)."""
    return None if pk is None else (pk, [])


def iter_dicom_paths(paths: list[Path]):  # type: ignore[no-untyped-def]
    """Every regular file under the given files and folders, sorted, for ``xdsi import``."""
    for p in paths:
        if p.is_dir():
            for root, dirs, files in os.walk(p):
                dirs.sort()
                for f in sorted(files):
                    yield Path(root) / f
        else:
            yield p
