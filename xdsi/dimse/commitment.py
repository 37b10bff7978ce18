"""Storage Commitment Push Model SCP (PS3.4 J).

A modality deletes its local copy when we commit; what counts as committed
is decided by :class:`xdsi.archive.commitment.CommitmentService`.  The
N-EVENT-REPORT goes back on the requesting association if it is still open,
otherwise on a new association to the requester, looked up by AE title in the
AE table.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any, Callable

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pynetdicom.presentation import build_context, build_role
from pynetdicom.sop_class import StorageCommitmentPushModel, StorageCommitmentPushModelInstance
from pynetdicom.status import Status

from xdsi.archive import Archive
from xdsi.archive.commitment import CommitFailure
from xdsi.dimse import status
from xdsi.uids import is_valid_uid

log = logging.getLogger(__name__)

REQUEST_COMMIT = 1
EVENT_ALL_SUCCESS = 1
EVENT_FAILURES = 2

FAILURE_REASON = {
    CommitFailure.NO_SUCH_INSTANCE: status.FAILURE_NO_SUCH_OBJECT_INSTANCE,
    CommitFailure.CLASS_CONFLICT: status.FAILURE_CLASS_INSTANCE_CONFLICT,
    CommitFailure.NOT_DURABLE: status.FAILURE_PROCESSING,
}


class CommitmentSCP:
    def __init__(self, ae: Any, archive_for: Callable[[Any], Archive]) -> None:
        self.ae = ae
        self.archive_for = archive_for  # the archive of the AE title an association called
        self._work: "queue.Queue[tuple[Any, str, Dataset, Archive] | None]" = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="storage-commitment", daemon=True)
        self._thread.start()

    # -- N-ACTION ------------------------------------------------------------

    def on_n_action(self, event: Any) -> tuple[int, Dataset | None]:
        req = event.request
        if req.RequestedSOPClassUID != StorageCommitmentPushModel:
            return status.NO_SUCH_ACTION_TYPE, None
        if req.ActionTypeID != REQUEST_COMMIT:
            return status.NO_SUCH_ACTION_TYPE, None
        try:
            info = event.action_information
            tx = str(info.TransactionUID)
            refs = info.ReferencedSOPSequence
        except Exception:
            return status.INVALID_ARGUMENT_VALUE, None
        if not is_valid_uid(tx) or not refs:
            return status.INVALID_ARGUMENT_VALUE, None
        # The response goes out first; the report follows from the worker thread.
        self._work.put((event.assoc, event.assoc.requestor.ae_title, info, self.archive_for(event.assoc)))
        return Status.SUCCESS, None

    # -- the report ------------------------------------------------------------

    def evaluate(self, info: Dataset, archive: Archive) -> Dataset:
        """Build the N-EVENT-REPORT Event Information for a commitment request."""
        wanted = [(str(i.get("ReferencedSOPClassUID", "")), str(i.get("ReferencedSOPInstanceUID", ""))) for i in info.ReferencedSOPSequence]
        ok, failed = Sequence(), Sequence()
        for check in archive.commitment.check(wanted):
            item = Dataset()
            item.ReferencedSOPClassUID = check.sop_class_uid
            item.ReferencedSOPInstanceUID = check.sop_instance_uid
            if check.committed:
                ok.append(item)
            else:
                item.FailureReason = FAILURE_REASON[check.failure]
                failed.append(item)
        report = Dataset()
        report.TransactionUID = info.TransactionUID
        report.RetrieveAETitle = archive.settings.ae_title
        report.ReferencedSOPSequence = ok
        if failed:
            report.FailedSOPSequence = failed
        return report

    def _run(self) -> None:
        while True:
            job = self._work.get()
            if job is None:
                return
            assoc, requester, info, archive = job
            try:
                report = self.evaluate(info, archive)
                event_type = EVENT_FAILURES if "FailedSOPSequence" in report else EVENT_ALL_SUCCESS
                self._send(assoc, requester, report, event_type, archive)
            except Exception:
                log.exception("storage commitment for %s failed", requester)

    def _send(self, assoc: Any, requester: str, report: Dataset, event_type: int, archive: Archive) -> None:
        # The report cannot overtake the N-ACTION response: pynetdicom's send_*
        # waits for the reactor to pause, which it does only after answering.
        # The pause is for requesters that release right after the response
        # (they expect the report on a new association): without it we would
        # start the report on an association that is being released.
        time.sleep(0.2)
        if assoc.is_established:
            try:
                rsp = assoc.send_n_event_report(
                    report, event_type, StorageCommitmentPushModel, StorageCommitmentPushModelInstance
                )
                if rsp and getattr(rsp[0], "Status", None) == 0:
                    log.info("commitment %s reported to %s on the same association", report.TransactionUID, requester)
                    return
            except Exception as exc:
                log.info("same-association report to %s failed (%s); opening a new one", requester, exc)
        peer = archive.settings.peer(requester)
        if peer is None:
            log.error("cannot report commitment %s: %s is not in the AE table", report.TransactionUID, requester)
            return
        # We are the Storage Commitment SCP sending on an association we open: negotiate the SCP role.
        role = build_role(StorageCommitmentPushModel, scp_role=True, scu_role=False)
        tls: dict[str, Any] = {}
        if peer.tls:  # [peers.X] tls = true: our certificate, the peer's verified against [tls] ca_certificates
            from xdsi.security.tls import client_context

            tls["tls_args"] = (client_context(archive.settings.tls, check_hostname=False), peer.host)
        out = self.ae.associate(
            peer.host,
            peer.port,
            ae_title=peer.ae_title,
            contexts=[build_context(StorageCommitmentPushModel)],
            ext_neg=[role],
            **tls,
        )
        if not out.is_established:
            log.error("cannot report commitment %s: association to %s refused", report.TransactionUID, requester)
            return
        try:
            rsp = out.send_n_event_report(report, event_type, StorageCommitmentPushModel, StorageCommitmentPushModelInstance)
            log.info("commitment %s reported to %s: %s", report.TransactionUID, requester, getattr(rsp[0], "Status", None))
        finally:
            out.release()

    def stop(self) -> None:
        self._work.put(None)
        self._thread.join(timeout=5)


