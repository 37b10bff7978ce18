"""pynetdicom retrieve clients for tests: a study-level C-GET and C-MOVE, and a storage SCP that records what it got.

Each records, per SOP Instance UID, the presentation context's transfer syntax and the raw data set bytes as
received, so a test can check both the syntax chosen and every byte (or decode it as it likes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet, StudyRootQueryRetrieveInformationModelMove

from tests.support.server import XdsiProcess, free_port

TIMEOUT = 30

Received = dict[str, tuple[str, bytes]]  # SOP Instance UID -> (transfer syntax of the context, raw data set)


def _recorder(received: Received):  # type: ignore[no-untyped-def]
    def on_store(event: Any) -> int:
        received[str(event.request.AffectedSOPInstanceUID)] = (str(event.context.transfer_syntax), event.request.DataSet.getvalue())
        return 0x0000
    return on_store


def _study_query(study_uid: str) -> Dataset:
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.StudyInstanceUID = study_uid
    return q


class RecordingStorage:
    """A pynetdicom Storage SCP on 127.0.0.1 accepting ``contexts`` (SOP class -> transfer syntaxes); stop() it."""

    def __init__(self, ae_title: str, contexts: Iterable[tuple[str, list[str]]]) -> None:
        self.port = free_port()
        self.received: Received = {}
        ae = AE(ae_title=ae_title)
        for sop_class, syntaxes in contexts:
            ae.add_supported_context(sop_class, syntaxes)
        self.ae = ae
        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, _recorder(self.received))])

    def stop(self) -> None:
        self.server.shutdown()


@dataclass
class GetResult:
    final: Dataset
    identifier: Dataset | None
    received: Received


def c_get(proc: XdsiProcess, contexts: Iterable[tuple[str, list[str]]], query: Dataset,
          on_store: Callable[[Any], int]) -> tuple[Dataset, Dataset | None]:
    """C-GET proposing exactly ``contexts`` for storage (SCP role for each class), each C-STORE given to
    ``on_store``; the final response's status and identifier."""
    contexts = list(contexts)
    ae = AE(ae_title="GETTER")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = TIMEOUT
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    for sop_class, syntaxes in contexts:
        ae.add_requested_context(sop_class, syntaxes)
    roles = [build_role(c, scp_role=True) for c in sorted({c for c, _ in contexts})]
    assoc = ae.associate(proc.host, proc.dicom_port, ae_title=proc.ae_title, ext_neg=roles,
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    try:
        responses = list(assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet))
    finally:
        assoc.release()
    final, identifier = responses[-1]
    return final, identifier


def c_get_study(proc: XdsiProcess, contexts: Iterable[tuple[str, list[str]]], study_uid: str) -> GetResult:
    """C-GET of a whole study, recording each instance's context transfer syntax and raw data set."""
    received: Received = {}
    final, identifier = c_get(proc, contexts, _study_query(study_uid), _recorder(received))
    return GetResult(final, identifier, received)


def c_move_study(proc: XdsiProcess, study_uid: str, destination: str) -> list[tuple[Dataset, Dataset | None]]:
    """C-MOVE of a whole study to ``destination`` (an AE title the server knows); every response, in order."""
    ae = AE(ae_title="MOVER")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = TIMEOUT
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = ae.associate(proc.host, proc.dicom_port, ae_title=proc.ae_title)
    assert assoc.is_established
    try:
        return list(assoc.send_c_move(_study_query(study_uid), destination, StudyRootQueryRetrieveInformationModelMove))
    finally:
        assoc.release()
