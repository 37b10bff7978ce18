"""C-FIND answers streamed from index rows (find_responses.stream_pending) reach real SCUs whole.

A running ``xdsi serve`` indexes 900 studies; pynetdicom (implicit and explicit VR, and a
256-byte maximum PDU that splits every identifier over several PDUs) and dcmtk ``findscu``
receive every match, each identifier equal to what ``QueryService.find`` answers for the same
index, then Success; a C-CANCEL part-way ends the answer with Cancel.
"""

from __future__ import annotations

import random
import subprocess
from pathlib import Path
from typing import Any, Iterator

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND

from tests.integration.dimse_support import dcmtk_available
from tests.support.server import XdsiProcess
from xdsi.archive.header import InstanceHeader
from xdsi.archive.query import QueryService
from xdsi.index import catalog
from xdsi.index.db import open_index

N = 900
NAMES = ["SMITH^ANNA", "MÜLLER^JOHN", "GARCIA^EVA", "NGUYEN^TOM"]
KEYS = ("PatientName", "PatientID", "StudyDate", "StudyTime", "AccessionNumber", "StudyDescription", "StudyInstanceUID",
        "ModalitiesInStudy", "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances")


def _populate(url: str) -> None:
    """N studies of N/3 patients written through the catalog (headers only, no files: this is about answers)."""
    rng = random.Random(14)
    index = open_index(url)
    try:
        for start in range(0, N, 250):  # a few hundred instances per transaction, as an import would
            with index.session() as s:
                for i in range(start, min(N, start + 250)):
                    study, series = (f"2.25.{rng.getrandbits(100)}" for _ in range(2))
                    for k in range(1 + (i // len(NAMES)) % 2):
                        h = InstanceHeader(
                            patient_id=f"P{i % (N // 3):05d}", issuer_of_patient_id="", patient_name=NAMES[i % len(NAMES)],
                            birth_date="19700101", sex="O", study_uid=study, study_date=f"2024{1 + i % 12:02d}15",
                            study_time="101500", accession_number=f"A{i:06d}", accession_issuer="", study_id=str(i),
                            study_description="STREAM", referring_physician="", procedure_code=None, series_uid=series,
                            modality=("CT", "MR")[i % 2], series_number=1, series_description="", body_part="",
                            series_date="", series_time="", institution_name="", station_name="",
                            sop_class_uid="1.2.840.10008.5.1.4.1.1.2", sop_instance_uid=f"2.25.{rng.getrandbits(100)}",
                            transfer_syntax_uid="1.2.840.10008.1.2.1", instance_number=k + 1, number_of_frames=None,
                            content_date="", content_time="", rows=8, columns=8, has_file_meta=True,
                        )
                        copy = catalog.CopyRecord("cache", f"x/{h.sop_instance_uid}.dcm", 1, "0" * 64, h.transfer_syntax_uid)
                        catalog.record_instance(s, h, copy)
    finally:
        index.dispose()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[XdsiProcess, str]]:
    data = tmp_path_factory.mktemp("stream") / "data"
    url = f"sqlite:///{data / 'index.sqlite'}"
    _populate(url)
    proc = XdsiProcess(data, env={"XDSI_INDEX_URL": url}).start(timeout=60)
    try:
        yield proc, url
    finally:
        proc.stop()


def _query(**match: Any) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    for kw in KEYS:
        setattr(ds, kw, None)
    for kw, v in match.items():
        setattr(ds, kw, v)
    return ds


def _expected(url: str, query: Dataset) -> list[dict]:  # type: ignore[type-arg]
    index = open_index(url, migrate=False)
    try:
        return [ds.to_json_dict() for ds in QueryService(index, "XDSI").find(query)]
    finally:
        index.dispose()


def _find(server: XdsiProcess, query: Dataset, syntax: str, max_pdu: int, cancel_after: int | None = None) -> tuple[list[Dataset], int]:
    ae = AE(ae_title="STREAMSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    ae.maximum_pdu_size = max_pdu
    ae.add_requested_context(FIND, [syntax])
    assoc = ae.associate(server.host, server.dicom_port, ae_title="XDSI")
    assert assoc.is_established
    out: list[Dataset] = []
    final = -1
    try:
        for st, ident in assoc.send_c_find(query, FIND, msg_id=7):
            assert st is not None, "no response"
            if st.Status in (0xFF00, 0xFF01):
                out.append(ident)
                if cancel_after is not None and len(out) == cancel_after:
                    assoc.send_c_cancel(7, assoc.accepted_contexts[0].context_id)
            else:
                final = st.Status
    finally:
        assoc.release()
        ae.shutdown()
    return out, final


@pytest.mark.parametrize(("syntax", "max_pdu"), [(ImplicitVRLittleEndian, 16382), (ExplicitVRLittleEndian, 256), (ImplicitVRLittleEndian, 0)],
                         ids=["implicit", "explicit-256-byte-pdu", "implicit-unlimited-pdu"])
def test_every_match_arrives_equal_to_the_query_service(server: tuple[XdsiProcess, str], syntax: str, max_pdu: int) -> None:
    proc, url = server
    query = _query()
    got, final = _find(proc, query, syntax, max_pdu)
    assert final == 0x0000
    expected = _expected(url, query)
    assert len(expected) == N
    assert [ds.to_json_dict() for ds in got] == expected


def test_non_ascii_and_counts_over_the_wire(server: tuple[XdsiProcess, str]) -> None:
    proc, url = server
    query = _query(PatientName="MÜL*")
    got, final = _find(proc, query, ExplicitVRLittleEndian, 16382)
    assert final == 0x0000 and len(got) == N // len(NAMES)
    assert all(str(ds.PatientName) == "MÜLLER^JOHN" and ds.SpecificCharacterSet == "ISO_IR 192" for ds in got)
    assert {int(ds.NumberOfStudyRelatedInstances) for ds in got} == {1, 2}
    assert [ds.to_json_dict() for ds in got] == _expected(url, query)


def test_cancel_part_way_ends_with_cancel(server: tuple[XdsiProcess, str]) -> None:
    """A C-CANCEL after the first match cuts the answer short with FE00.

    The C-CANCEL races the server: on a fast machine all 900 Pending responses can be in the socket
    buffers before it arrives (CI once saw Success after a cancel sent at the third match), and
    pynetdicom drops a C-CANCEL that arrives before the request's handler runs, so it cannot be sent
    earlier.  Each attempt must be consistent (FE00 with fewer than N matches, or Success with all N),
    and one of five must be cut short; what stream_pending does on a cancel is shown without a race in
    tests/unit/test_find_responses.py::test_stream_pending_stops_at_a_cancel.
    """
    proc, _ = server
    outcomes = []
    for _ in range(5):
        got, final = _find(proc, _query(), ImplicitVRLittleEndian, 16382, cancel_after=1)
        outcomes.append((final, len(got)))
        assert (final == 0xFE00 and 1 <= len(got) < N) or (final == 0x0000 and len(got) == N), outcomes
        if final == 0xFE00:
            break
    assert outcomes[-1][0] == 0xFE00, f"no C-CANCEL cut the answer short in {len(outcomes)} attempts: {outcomes}"


@pytest.mark.skipif(not dcmtk_available(), reason="Debian's dcmtk tools are not installed in /usr/bin")
def test_findscu_receives_every_match(server: tuple[XdsiProcess, str], tmp_path: Path) -> None:
    proc, _ = server
    args = ["/usr/bin/findscu", "-v", "-S", "-aec", "XDSI", "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID",
            "-k", "PatientName", "-k", "NumberOfStudyRelatedInstances", proc.host, str(proc.dicom_port)]
    out = subprocess.run(args, capture_output=True, text=True, errors="replace", timeout=120, env={"TCP_NODELAY": "1"})
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-2000:]
    assert log.count("(Pending)") == N
    assert "Received Final Find Response (Success)" in log


def test_many_queries_on_one_association(server: tuple[XdsiProcess, str]) -> None:
    """After the first C-FIND the association's threads wake on activity (xdsi.dimse.wakeup): every later
    request on it is still answered whole, in order, and the association still releases."""
    from xdsi.dimse import wakeup

    assert wakeup.check_pynetdicom(), "pynetdicom's polling loops changed: xdsi.dimse.wakeup no longer applies"
    proc, url = server
    ae = AE(ae_title="MANYSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    ae.add_requested_context(FIND, [ExplicitVRLittleEndian])
    assoc = ae.associate(proc.host, proc.dicom_port, ae_title="XDSI")
    assert assoc.is_established
    try:
        for i in range(60):
            query = _query(PatientID=f"P{(i * 7) % (N // 3):05d}")
            got, final = [], -1
            for st, ident in assoc.send_c_find(query, FIND, msg_id=i + 1):
                assert st is not None, "no response"
                if st.Status in (0xFF00, 0xFF01):
                    got.append(ident.to_json_dict())
                else:
                    final = st.Status
            assert final == 0x0000
            assert got == _expected(url, query) and len(got) == 3
    finally:
        assoc.release()
        ae.shutdown()
    assert assoc.is_released
