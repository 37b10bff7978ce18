"""xdsi serve against pynetdicom peers: exact C-FIND values, C-MOVE/C-GET status and bytes, bad input, commitment."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Iterator

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, JPEG2000Lossless, MRImageStorage
from pynetdicom import AE, _config, build_role, evt
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    StorageCommitmentPushModel,
    StorageCommitmentPushModelInstance,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from tests.integration.conftest import load
from tests.integration.dimse_support import (
    NON_ASCII_NAME,
    StudySet,
    dataset_bytes,
    free_port,
    http_status,
    leftover_temp_files,
    write_config,
)
from tests.support.server import XdsiProcess
from xdsi.uids import new_uid

pytestmark = pytest.mark.dcmtk  # the shared server is loaded with storescu

TIMEOUT = 30


def _scu(*contexts: Any, ae_title: str = "PYSCU") -> AE:
    ae = AE(ae_title=ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = TIMEOUT
    for cx in contexts:
        if isinstance(cx, tuple):
            ae.add_requested_context(*cx)
        else:
            ae.add_requested_context(cx)
    return ae


def find(server: XdsiProcess, query: Dataset, model: str = StudyRootQueryRetrieveInformationModelFind) -> tuple[list[Dataset], int]:
    ae = _scu(model)
    assoc = ae.associate(server.host, server.dicom_port, ae_title="XDSI")
    assert assoc.is_established
    out: list[Dataset] = []
    final = -1
    try:
        for st, ident in assoc.send_c_find(query, model):
            assert st is not None, "no response"
            if st.Status in (0xFF00, 0xFF01):
                out.append(ident)
            else:
                final = st.Status
    finally:
        assoc.release()
    return out, final


def _q(**kw: Any) -> Dataset:
    ds = Dataset()
    for k, v in kw.items():
        setattr(ds, k, v)
    return ds


# -- C-FIND, exact values ------------------------------------------------------------------


def test_find_study_level_values(loaded_server: XdsiProcess, test_data: StudySet) -> None:
    q = _q(
        QueryRetrieveLevel="STUDY",
        StudyInstanceUID=test_data.spec_a.study_uid,
        PatientName="",
        PatientID="",
        StudyDate="",
        StudyTime="",
        AccessionNumber="",
        StudyDescription="",
        ReferringPhysicianName="",
        ModalitiesInStudy="",
        NumberOfStudyRelatedSeries="",
        NumberOfStudyRelatedInstances="",
    )
    (r,), status = find(loaded_server, q)
    assert status == 0x0000
    assert str(r.PatientName) == NON_ASCII_NAME
    assert r.SpecificCharacterSet == "ISO_IR 192"
    assert (r.PatientID, r.StudyDate, r.StudyTime, r.AccessionNumber, r.StudyDescription) == ("PAT001", "20240115", "101500", "ACC001", "CT CHEST")
    assert str(r.ReferringPhysicianName) == "SMITH^JOHN"
    assert r.ModalitiesInStudy == "CT"
    assert (int(r.NumberOfStudyRelatedSeries), int(r.NumberOfStudyRelatedInstances)) == (4, 10)
    assert r.RetrieveAETitle == "XDSI"


def test_find_patient_level_non_ascii_query(loaded_server: XdsiProcess) -> None:
    q = _q(
        SpecificCharacterSet="ISO_IR 192",
        QueryRetrieveLevel="PATIENT",
        PatientName=NON_ASCII_NAME,
        PatientID="",
        PatientBirthDate="",
        PatientSex="",
        NumberOfPatientRelatedStudies="",
        NumberOfPatientRelatedInstances="",
    )
    (r,), status = find(loaded_server, q, PatientRootQueryRetrieveInformationModelFind)
    assert status == 0x0000
    assert str(r.PatientName) == NON_ASCII_NAME
    assert (r.PatientID, r.PatientBirthDate, r.PatientSex) == ("PAT001", "19700101", "F")
    assert (int(r.NumberOfPatientRelatedStudies), int(r.NumberOfPatientRelatedInstances)) == (1, 10)
    assert {e.keyword for e in r} == {e.keyword for e in q} | {"RetrieveAETitle"}


def test_find_series_and_image_values(loaded_server: XdsiProcess, test_data: StudySet) -> None:
    q = _q(
        QueryRetrieveLevel="SERIES",
        StudyInstanceUID=test_data.spec_a.study_uid,
        SeriesInstanceUID="",
        Modality="",
        SeriesNumber="",
        NumberOfSeriesRelatedInstances="",
    )
    rows, status = find(loaded_server, q)
    assert status == 0x0000
    assert sorted((int(r.SeriesNumber), r.Modality, int(r.NumberOfSeriesRelatedInstances)) for r in rows) == [
        (1, "CT", 3),
        (2, "CT", 3),
        (3, "CT", 3),
        (4, "CT", 1),
    ]
    j2k_series = str(dcmread(test_data.j2k, stop_before_pixels=True).SeriesInstanceUID)
    q = _q(
        QueryRetrieveLevel="IMAGE",
        StudyInstanceUID=test_data.spec_a.study_uid,
        SeriesInstanceUID=j2k_series,
        SOPInstanceUID="",
        SOPClassUID="",
        InstanceNumber="",
        Rows=None,
        Columns=None,
        AvailableTransferSyntaxUID="",
    )
    (r,), status = find(loaded_server, q)
    assert status == 0x0000
    assert (r.SOPInstanceUID, r.SOPClassUID, int(r.InstanceNumber), r.Rows, r.Columns) == (test_data.j2k.stem, CTImageStorage, 1, 64, 64)
    assert r.AvailableTransferSyntaxUID == JPEG2000Lossless
    assert "PatientName" not in r and "StudyDate" not in r


def test_find_invalid_uid_is_refused(loaded_server: XdsiProcess) -> None:
    rows, status = find(loaded_server, _q(QueryRetrieveLevel="STUDY", StudyInstanceUID="1.2.abc"))
    assert rows == []
    assert status in (0xA900, 0xC000, 0xC001), hex(status)


# -- C-MOVE status, C-GET bytes -----------------------------------------------------------------


def test_move_unknown_destination_status(loaded_server: XdsiProcess, test_data: StudySet) -> None:
    ae = _scu(StudyRootQueryRetrieveInformationModelMove)
    assoc = ae.associate(loaded_server.host, loaded_server.dicom_port, ae_title="XDSI")
    assert assoc.is_established
    try:
        responses = list(
            assoc.send_c_move(_q(QueryRetrieveLevel="STUDY", StudyInstanceUID=test_data.spec_a.study_uid), "NOWHERE", StudyRootQueryRetrieveInformationModelMove)
        )
    finally:
        assoc.release()
    assert [st.Status for st, _ in responses] == [0xA801]


def test_get_with_pynetdicom_is_byte_identical(loaded_server: XdsiProcess, test_data: StudySet) -> None:
    """Two contexts per storage class (as stored uncompressed, and JPEG 2000): everything goes as stored."""
    received: dict[str, tuple[str, bytes]] = {}

    def on_store(event: Any) -> int:
        raw = event.request.DataSet.getvalue() if event.request.DataSet is not None else dataset_bytes(Path(event.dataset_path))
        received[str(event.request.AffectedSOPInstanceUID)] = (str(event.context.transfer_syntax), raw)
        return 0x0000

    ae = _scu(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    ae.add_requested_context(CTImageStorage, [JPEG2000Lossless])
    roles = [build_role(CTImageStorage, scp_role=True)]
    assoc = ae.associate(loaded_server.host, loaded_server.dicom_port, ae_title="XDSI", ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    try:
        responses = list(assoc.send_c_get(_q(QueryRetrieveLevel="STUDY", StudyInstanceUID=test_data.spec_a.study_uid), StudyRootQueryRetrieveInformationModelGet))
    finally:
        assoc.release()
    final = responses[-1][0]
    assert final.Status == 0x0000
    assert (final.NumberOfCompletedSuboperations, final.get("NumberOfFailedSuboperations", 0)) == (10, 0)
    originals = test_data.by_sop()
    assert set(received) == {u for uids in test_data.series_of(test_data.spec_a).values() for u in uids}
    for sop, (ts, raw) in received.items():
        assert ts == (JPEG2000Lossless if sop == test_data.j2k.stem else ExplicitVRLittleEndian)
        assert raw == dataset_bytes(originals[sop]), f"{sop} differs"


def test_get_without_context_for_stored_class_fails_suboperations(loaded_server: XdsiProcess, test_data: StudySet) -> None:
    """A C-GET requestor that offers no context for the stored SOP class gets failed sub-operations, not a hang."""
    received: list[str] = []

    def on_store(event: Any) -> int:
        received.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    assert {dcmread(p, stop_before_pixels=True).SOPClassUID for p in test_data.files_b} == {MRImageStorage}
    ae = _scu(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CTImageStorage)  # the MR study needs MR Image Storage
    assoc = ae.associate(
        loaded_server.host,
        loaded_server.dicom_port,
        ae_title="XDSI",
        ext_neg=[build_role(CTImageStorage, scp_role=True)],
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )
    assert assoc.is_established
    try:
        responses = list(assoc.send_c_get(_q(QueryRetrieveLevel="STUDY", StudyInstanceUID=test_data.spec_b.study_uid), StudyRootQueryRetrieveInformationModelGet))
    finally:
        assoc.release()
    final = responses[-1][0]
    assert final.Status in (0xA702, 0xB000), hex(final.Status)
    assert final.NumberOfFailedSuboperations == len(test_data.files_b)
    assert received == []


# -- bad input over the wire -----------------------------------------------------------------------


@pytest.fixture
def empty_server(tmp_path: Path) -> Iterator[XdsiProcess]:
    server = XdsiProcess(tmp_path / "data").start()
    try:
        yield server
    finally:
        server.stop()


def test_bad_datasets_are_refused_and_association_stays_usable(
    empty_server: XdsiProcess, test_data: StudySet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # send the files' bytes as they are
    good, other = test_data.files_a[0], test_data.files_a[1]
    truncated = tmp_path / "truncated.dcm"
    raw = good.read_bytes()
    truncated.write_bytes(raw[: len(raw) - 3000])  # cut inside Pixel Data
    bad_uid = tmp_path / "bad-uid.dcm"
    ds = dcmread(other)
    ds.SOPInstanceUID = "1.2.840.abc.7"
    ds.save_as(bad_uid, enforce_file_format=True)  # the File Meta keeps the valid UID: only the dataset is wrong

    ae = _scu((CTImageStorage, [ExplicitVRLittleEndian]))
    assoc = ae.associate(empty_server.host, empty_server.dicom_port, ae_title="XDSI")
    assert assoc.is_established
    try:
        statuses = []
        for path in (truncated, bad_uid, good):
            rsp = assoc.send_c_store(path)
            assert rsp is not None and "Status" in rsp, f"no response for {path.name}"
            statuses.append(rsp.Status)
        assert assoc.is_established
    finally:
        assoc.release()
    refused = statuses[:2]
    assert all(0xC000 <= s <= 0xCFFF or s in (0xA700, 0xA900) for s in refused), [hex(s) for s in statuses]
    assert statuses[2] == 0x0000
    st = http_status(empty_server)
    assert (st["instances"], st["tiers"]["cache"]["files"]) == (1, 1)
    assert not leftover_temp_files(empty_server.data_dir)
    stored = list((empty_server.data_dir / "storage").rglob("*.dcm"))
    assert [p.stem for p in stored] == [good.stem]


# -- Storage Commitment Push Model -------------------------------------------------------------------


class CommitRequester:
    """A modality: stores nothing itself here, asks for commitment, collects the N-EVENT-REPORT."""

    AE_TITLE = "COMMITSCU"

    def __init__(self) -> None:
        self.port = free_port()
        self.reports: list[tuple[int, Dataset, bool]] = []  # (event type, event information, on a new association)
        self.got = threading.Event()
        self.ae = AE(ae_title=self.AE_TITLE)
        self.ae.acse_timeout = self.ae.dimse_timeout = self.ae.network_timeout = TIMEOUT
        self.ae.add_requested_context(StorageCommitmentPushModel)
        # Acceptor side: xdsi opens an association proposing itself as Storage Commitment SCP
        # (SCP/SCU role selection scu_role=0, scp_role=1); we accept that role and act as the SCU.
        self.ae.add_supported_context(StorageCommitmentPushModel, scu_role=True, scp_role=True)
        self.server: Any = None

    def on_report(self, event: Any) -> tuple[int, None]:
        self.reports.append((event.event_type, event.event_information, event.assoc.is_acceptor))
        self.got.set()
        return 0x0000, None

    def __enter__(self) -> "CommitRequester":
        self.server = self.ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_N_EVENT_REPORT, self.on_report)])
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()

    def request(self, xdsi: XdsiProcess, refs: list[tuple[str, str]], *, keep_open: bool) -> int:
        info = Dataset()
        info.TransactionUID = new_uid()
        items = []
        for cls, uid in refs:
            item = Dataset()
            item.ReferencedSOPClassUID = cls
            item.ReferencedSOPInstanceUID = uid
            items.append(item)
        info.ReferencedSOPSequence = items
        handlers = [(evt.EVT_N_EVENT_REPORT, self.on_report)]
        assoc = self.ae.associate(xdsi.host, xdsi.dicom_port, ae_title="XDSI", evt_handlers=handlers, bind_address=("127.0.0.1", 0))
        assert assoc.is_established
        try:
            st, _ = assoc.send_n_action(info, 1, StorageCommitmentPushModel, StorageCommitmentPushModelInstance)
            assert st is not None
            if keep_open:
                assert self.got.wait(TIMEOUT), "no N-EVENT-REPORT on the open association"
        finally:
            assoc.release()
        if not keep_open:
            assert self.got.wait(TIMEOUT), "no N-EVENT-REPORT on a new association"
        self.transaction = str(info.TransactionUID)
        return int(st.Status)


@pytest.fixture
def commit_env(tmp_path: Path, test_data: StudySet) -> Iterator[tuple[XdsiProcess, CommitRequester]]:
    with CommitRequester() as requester:
        config = write_config(tmp_path / "xdsi.toml", {CommitRequester.AE_TITLE: ("127.0.0.1", requester.port)})
        server = XdsiProcess(tmp_path / "data", config=config).start()
        try:
            load(server, test_data)
            yield server, requester
        finally:
            server.stop()


@pytest.mark.parametrize("keep_open", [True, False], ids=["same-association", "new-association"])
def test_storage_commitment(commit_env: tuple[XdsiProcess, CommitRequester], test_data: StudySet, keep_open: bool) -> None:
    server, requester = commit_env
    stored = [(CTImageStorage, dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in (*test_data.files_a[:3], test_data.j2k)]
    unknown = (CTImageStorage, new_uid())
    status = requester.request(server, [*stored, unknown], keep_open=keep_open)
    assert status == 0x0000
    (event_type, info, on_new_association), = requester.reports
    assert on_new_association is (not keep_open)
    assert event_type == 2  # some failures
    assert info.TransactionUID == requester.transaction
    assert [(i.ReferencedSOPClassUID, i.ReferencedSOPInstanceUID) for i in info.ReferencedSOPSequence] == [(c, str(u)) for c, u in stored]
    (failed,) = info.FailedSOPSequence
    assert (failed.ReferencedSOPClassUID, failed.ReferencedSOPInstanceUID, failed.FailureReason) == (*unknown, 0x0112)


def test_implementation_class_uid_is_pynetdicoms_on_the_wire_and_in_received_files(loaded_server: XdsiProcess) -> None:
    """xdsi sets no Implementation Class UID of its own: associations and C-STORE-received files carry pynetdicom's."""
    from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
    from pynetdicom.sop_class import Verification

    assoc = _scu(Verification).associate(loaded_server.host, loaded_server.dicom_port, ae_title="XDSI")
    assert assoc.is_established
    try:
        assert assoc.acceptor.implementation_class_uid == PYNETDICOM_IMPLEMENTATION_UID
        assert assoc.acceptor.implementation_version_name == PYNETDICOM_IMPLEMENTATION_VERSION
    finally:
        assoc.release()
    # the test data was sent by dcmtk's storescu; the File Meta of the archived files is written by pynetdicom
    stored = [p for p in (loaded_server.data_dir / "storage").rglob("*") if p.is_file()]
    assert stored
    for p in stored[:5]:
        meta = dcmread(p, stop_before_pixels=True).file_meta
        assert meta.ImplementationClassUID == PYNETDICOM_IMPLEMENTATION_UID, p
