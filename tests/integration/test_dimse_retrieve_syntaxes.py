"""C-MOVE and C-GET sub-operations for every stored transfer syntax and every kind of peer.

The study is made of pydicom's bundled test files (files nobody on this
project wrote), one per stored syntax, with new UIDs, stored by C-STORE as
they are.  It is retrieved by:

* C-MOVE to dcmtk ``storescp +xi`` (accepts only Implicit VR Little Endian,
  the one syntax every AE must accept) and ``storescp +xa`` (accepts all),
  inside a private network namespace;
* C-GET from pynetdicom offering only Implicit VR LE, offering the stored
  syntax first, and asking [JPEG Baseline, Explicit VR LE]; and dcmtk
  ``getscu +xy``;
* C-MOVE to destinations that accept nothing for some SOP classes, reject
  the association, or are not listening: failed sub-operations with the
  UIDs listed, never A801.

Every received instance keeps its SOP Instance UID, its pixels equal
pydicom's decode of the original (colour as RGB), and whatever went in its
stored syntax is byte-identical after the File Meta group.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    UltrasoundImageStorage,
)
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove

from tests.integration.dimse_corpus import SOURCES, Corpus, Item, make_corpus, store
from tests.integration.dimse_support import dataset_bytes, dcmtk_available, free_port, leftover_temp_files, run, stop_processes, tool, wait_for_echo, write_config
from tests.support import netns, retrieve_clients
from tests.support.netns import NetNS
from tests.support.server import XdsiProcess

pytestmark = pytest.mark.dcmtk

TIMEOUT = 30
STORESCP_PORTS = {"IMPLICIT": 11211, "ACCEPTALL": 11212}


def cases(target: str | None) -> list[Any]:  # noqa: ARG001 (target names what the case converts to)
    """One case per stored syntax, converted to ``target`` where that is not the stored one."""
    return [pytest.param(ts, id=Path(name).stem) for name, ts in SOURCES]


def check_instance(item: Item, ds: Dataset, raw_dataset: bytes, expected_ts: str) -> None:
    """Identity, syntax, pixels, and (when sent as stored) the bytes."""
    assert ds.SOPInstanceUID == item.sop_uid
    assert ds.file_meta.TransferSyntaxUID == expected_ts, f"{item.name}: got {ds.file_meta.TransferSyntaxUID.name}"
    assert np.array_equal(ds.pixel_array, item.pixels()), f"{item.name}: pixels differ from pydicom's decode of the original"
    if expected_ts == item.transfer_syntax:
        assert raw_dataset == dataset_bytes(item.path), f"{item.name}: stored-syntax transfer is not byte-identical"
    elif int(item.pixels().ndim) == 3 and int(ds.get("SamplesPerPixel", 1)) == 3:
        assert ds.PhotometricInterpretation == "RGB"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    return make_corpus(tmp_path_factory.mktemp("corpus"))


# -- C-MOVE to dcmtk storescp, in a private network namespace ------------------------------------------


@dataclass
class NsEnv:
    ns: NetNS
    server: XdsiProcess
    received: dict[str, Path]

    def move(self, dest: str, study_uid: str) -> tuple[str, dict[str, Path]]:
        shutil.rmtree(self.received[dest])
        self.received[dest].mkdir()
        args = [tool("movescu"), "-v", "-S", "-aec", self.server.ae_title, "-aem", dest,
                "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}"]
        proc = run(self.ns.cmd(*args, self.server.host, str(self.server.dicom_port)), check=False)
        got = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in self.received[dest].iterdir() if p.is_file()}
        return proc.stdout + proc.stderr, got



@pytest.fixture(scope="module")
def ns_env(tmp_path_factory: pytest.TempPathFactory, corpus: Corpus) -> Iterator[NsEnv]:
    if not netns.available():
        pytest.skip("network namespaces need root")
    if not dcmtk_available():
        pytest.skip("Debian's dcmtk tools are not installed in /usr/bin")
    root = tmp_path_factory.mktemp("ns-move")
    procs: list[subprocess.Popen[bytes]] = []
    with NetNS() as ns:
        received: dict[str, Path] = {}
        try:
            for aet, port in STORESCP_PORTS.items():
                out = root / aet
                out.mkdir()
                received[aet] = out
                accept = "+xi" if aet == "IMPLICIT" else "+xa"
                cmd = ns.cmd(tool("storescp"), "-aet", aet, accept, "+B", "-od", str(out), str(port))
                p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={"TCP_NODELAY": "1"})
                procs.append(p)
                wait_for_echo(ns, aet, port, p)
            config = write_config(root / "xdsi.toml", {aet: ("127.0.0.1", port) for aet, port in STORESCP_PORTS.items()})
            server = XdsiProcess(root / "data", config=config, prefix=ns.cmd()).start()
            try:
                loader = [sys.executable, "-m", "tests.integration.dimse_corpus", server.host, str(server.dicom_port)]
                run(ns.cmd(*loader, *(str(i.path) for i in corpus.items)))
                yield NsEnv(ns, server, received)
            finally:
                server.stop()
        finally:
            stop_processes(procs)


@pytest.fixture(scope="module")
def moved_implicit(ns_env: NsEnv, corpus: Corpus) -> tuple[str, dict[str, Path]]:
    return ns_env.move("IMPLICIT", corpus.study_uid)


@pytest.fixture(scope="module")
def moved_all(ns_env: NsEnv, corpus: Corpus) -> tuple[str, dict[str, Path]]:
    return ns_env.move("ACCEPTALL", corpus.study_uid)


@pytest.mark.parametrize("stored_ts", cases(ImplicitVRLittleEndian))
def test_move_to_implicit_only_storescp(moved_implicit: tuple[str, dict[str, Path]], corpus: Corpus, stored_ts: str) -> None:
    log, got = moved_implicit
    item = corpus.by_ts(stored_ts)
    assert item.sop_uid in got, f"{item.name} not received\n{log}"
    path = got[item.sop_uid]
    check_instance(item, dcmread(path), dataset_bytes(path), ImplicitVRLittleEndian)


def test_move_to_implicit_only_storescp_succeeds(moved_implicit: tuple[str, dict[str, Path]], corpus: Corpus) -> None:
    log, got = moved_implicit
    assert "Received Final Move Response (Success)" in log, log
    assert set(got) == set(corpus.by_sop())


def test_move_to_implicit_only_storescp_is_never_a801(moved_implicit: tuple[str, dict[str, Path]]) -> None:
    log, _ = moved_implicit
    assert "MoveDestinationUnknown" not in log, log
    assert "Received Final Move Response" in log, log


def test_converted_copies_are_not_left_behind(moved_implicit: tuple[str, dict[str, Path]], ns_env: NsEnv) -> None:
    """Each converted instance is spooled in the data directory and removed once sent."""
    assert len(moved_implicit[1]) >= 5  # conversions happened
    assert leftover_temp_files(ns_env.server.data_dir) == []


@pytest.mark.parametrize("stored_ts", cases(None))
def test_move_to_accept_all_storescp_sends_stored_bytes(moved_all: tuple[str, dict[str, Path]], corpus: Corpus, stored_ts: str) -> None:
    log, got = moved_all
    item = corpus.by_ts(stored_ts)
    assert item.sop_uid in got, f"{item.name} not received\n{log}"
    path = got[item.sop_uid]
    check_instance(item, dcmread(path), dataset_bytes(path), stored_ts)


def test_move_to_accept_all_storescp_succeeds(moved_all: tuple[str, dict[str, Path]], corpus: Corpus) -> None:
    log, got = moved_all
    assert "Received Final Move Response (Success)" in log, log
    assert set(got) == set(corpus.by_sop())


# -- a server on 127.0.0.1 for C-GET and pynetdicom move destinations ------------------------------------


@dataclass
class Destinations:
    """pynetdicom storage SCPs in this process that the server knows as move destinations."""

    received: dict[str, list[str]]
    ports: dict[str, int]


@pytest.fixture(scope="module")
def destinations() -> Iterator[Destinations]:
    received: dict[str, list[str]] = {"CTONLY": [], "REJECTER": [], "NOCONTEXT": [], "ABORTER": []}
    ports = {"CTONLY": free_port(), "REJECTER": free_port(), "NOCONTEXT": free_port(), "CLOSED": free_port(), "ABORTER": free_port()}
    servers = []
    for aet in ("CTONLY", "REJECTER", "NOCONTEXT", "ABORTER"):
        ae = AE(ae_title=aet)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = TIMEOUT
        # NOCONTEXT takes only a SOP class the study does not have: it accepts no proposed context
        if aet == "ABORTER":  # every storage class, native syntaxes: it would take the whole study
            for cx in AllStoragePresentationContexts:
                ae.add_supported_context(cx.abstract_syntax, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        else:
            ae.add_supported_context(UltrasoundImageStorage if aet == "NOCONTEXT" else CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        if aet == "REJECTER":
            ae.require_calling_aet = ["SOMEONE-ELSE"]

        def on_store(event: Any, box: list[str] = received[aet], aborts: bool = aet == "ABORTER") -> int:
            box.append(str(event.request.AffectedSOPInstanceUID))
            if aborts and len(box) == 2:  # ABORTER takes one instance, then aborts in the middle of the second
                event.assoc.abort()
            return 0x0000

        servers.append(ae.start_server(("127.0.0.1", ports[aet]), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]))
    try:
        yield Destinations(received, ports)
    finally:
        for s in servers:
            s.shutdown()


@pytest.fixture(scope="module")
def local_server(tmp_path_factory: pytest.TempPathFactory, corpus: Corpus, destinations: Destinations) -> Iterator[XdsiProcess]:
    root = tmp_path_factory.mktemp("local")
    config = write_config(root / "xdsi.toml", {aet: ("127.0.0.1", port) for aet, port in destinations.ports.items()})
    server = XdsiProcess(root / "data", config=config).start()
    try:
        statuses = store(server.host, server.dicom_port, [i.path for i in corpus.items])
        assert statuses == [0] * len(corpus.items)
        yield server
    finally:
        server.stop()


@dataclass
class GetResult:
    final: Dataset
    identifier: Dataset | None
    received: dict[str, tuple[Dataset, bytes]]  # SOP Instance UID -> (decoded Part 10, raw dataset bytes)


def c_get(server: XdsiProcess, contexts: list[tuple[str, list[str]]], query: Dataset) -> GetResult:
    """C-GET with pynetdicom proposing exactly ``contexts``; each instance decoded and its raw bytes kept."""
    received: dict[str, tuple[Dataset, bytes]] = {}

    def on_store(event: Any) -> int:
        part10 = event.encoded_dataset(include_meta=True)
        ds = dcmread(io.BytesIO(part10))
        raw = event.request.DataSet.getvalue()
        received[str(event.request.AffectedSOPInstanceUID)] = (ds, raw)
        return 0x0000

    final, identifier = retrieve_clients.c_get(server, contexts, query, on_store)
    return GetResult(final, identifier, received)


def study_query(corpus: Corpus) -> Dataset:
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.StudyInstanceUID = corpus.study_uid
    return q


def image_query(corpus: Corpus, item: Item) -> Dataset:
    q = Dataset()
    q.QueryRetrieveLevel = "IMAGE"
    q.StudyInstanceUID = corpus.study_uid
    q.SeriesInstanceUID = dcmread(item.path, stop_before_pixels=True).SeriesInstanceUID
    q.SOPInstanceUID = item.sop_uid
    return q


@pytest.fixture(scope="module")
def got_implicit_only(local_server: XdsiProcess, corpus: Corpus) -> GetResult:
    classes = sorted({i.sop_class for i in corpus.items})
    return c_get(local_server, [(c, [ImplicitVRLittleEndian]) for c in classes], study_query(corpus))


@pytest.mark.parametrize("stored_ts", cases(ImplicitVRLittleEndian))
def test_get_offering_only_implicit(got_implicit_only: GetResult, corpus: Corpus, stored_ts: str) -> None:
    item = corpus.by_ts(stored_ts)
    assert item.sop_uid in got_implicit_only.received, f"{item.name} not received: {got_implicit_only.final}"
    ds, raw = got_implicit_only.received[item.sop_uid]
    check_instance(item, ds, raw, ImplicitVRLittleEndian)


def test_get_offering_only_implicit_succeeds(got_implicit_only: GetResult, corpus: Corpus) -> None:
    assert got_implicit_only.final.Status == 0x0000
    assert got_implicit_only.final.NumberOfCompletedSuboperations == len(corpus.items)


@pytest.fixture(scope="module")
def got_stored_first(local_server: XdsiProcess, corpus: Corpus) -> GetResult:
    """One context per instance's (SOP class, stored syntax), the stored syntax first, then Explicit and Implicit."""
    contexts = []
    for i in corpus.items:
        rest = [t for t in (ExplicitVRLittleEndian, ImplicitVRLittleEndian) if t != i.transfer_syntax]
        contexts.append((i.sop_class, [i.transfer_syntax, *rest]))
    return c_get(local_server, contexts, study_query(corpus))


@pytest.mark.parametrize("stored_ts", cases(None))
def test_get_offering_stored_syntax_first_gets_stored_bytes(got_stored_first: GetResult, corpus: Corpus, stored_ts: str) -> None:
    item = corpus.by_ts(stored_ts)
    assert item.sop_uid in got_stored_first.received, f"{item.name} not received: {got_stored_first.final}"
    ds, raw = got_stored_first.received[item.sop_uid]
    check_instance(item, ds, raw, stored_ts)


def test_get_offering_stored_syntax_first_succeeds(got_stored_first: GetResult, corpus: Corpus) -> None:
    assert got_stored_first.final.Status == 0x0000
    assert got_stored_first.final.NumberOfCompletedSuboperations == len(corpus.items)


@pytest.fixture(scope="module", params=[ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian], ids=["big-endian", "deflated"])
def got_uncompressed_first(request: pytest.FixtureRequest, local_server: XdsiProcess, corpus: Corpus) -> tuple[str, GetResult]:
    """getscu +xb / +xd: [Big Endian or Deflated, Explicit VR LE, Implicit VR LE] for every class of the study."""
    first = str(request.param)
    classes = sorted({i.sop_class for i in corpus.items})
    return first, c_get(local_server, [(c, [first, ExplicitVRLittleEndian, ImplicitVRLittleEndian]) for c in classes], study_query(corpus))


@pytest.mark.parametrize("stored_ts", cases(None))
def test_get_big_endian_or_deflated_first_converts_every_instance(
    got_uncompressed_first: tuple[str, GetResult], corpus: Corpus, stored_ts: str
) -> None:
    """The requestor's first choice is accepted for the whole SOP class: instances stored otherwise arrive converted to it."""
    first, result = got_uncompressed_first
    item = corpus.by_ts(stored_ts)
    assert item.sop_uid in result.received, f"{item.name} not received: {result.final}"
    ds, raw = result.received[item.sop_uid]
    check_instance(item, ds, raw, first)


def test_get_big_endian_or_deflated_first_succeeds(got_uncompressed_first: tuple[str, GetResult], corpus: Corpus) -> None:
    _, result = got_uncompressed_first
    assert result.final.Status == 0x0000
    assert result.final.NumberOfCompletedSuboperations == len(corpus.items)


def test_get_jpeg_baseline_preferred_is_unchanged(local_server: XdsiProcess, corpus: Corpus) -> None:
    """[JPEG Baseline, Explicit VR LE] in one context: we accept the requestor's first choice and send the JPEG as stored."""
    item = corpus.by_ts(JPEGBaseline8Bit)
    result = c_get(local_server, [(item.sop_class, [JPEGBaseline8Bit, ExplicitVRLittleEndian])], image_query(corpus, item))
    assert result.final.Status == 0x0000
    ds, raw = result.received[item.sop_uid]
    check_instance(item, ds, raw, JPEGBaseline8Bit)


def test_get_jpeg_baseline_preferred_fails_instances_it_cannot_have(local_server: XdsiProcess, corpus: Corpus) -> None:
    """The same context for the whole study: the Deflated Secondary Capture cannot be made JPEG Baseline (we never
    encode lossy JPEG), so it is a failed sub-operation, listed, and the JPEG one still arrives as stored."""
    jpeg = corpus.by_ts(JPEGBaseline8Bit)
    same_class = [i for i in corpus.items if i.sop_class == jpeg.sop_class]
    others = [i for i in same_class if i is not jpeg]
    assert others, "the corpus needs a second Secondary Capture instance"
    result = c_get(local_server, [(jpeg.sop_class, [JPEGBaseline8Bit, ExplicitVRLittleEndian])], study_query(corpus))
    assert set(result.received) == {jpeg.sop_uid}
    assert result.final.Status == 0xB000, hex(result.final.Status)  # some sub-operations failed
    assert result.final.NumberOfCompletedSuboperations == 1
    assert result.final.NumberOfFailedSuboperations == len(corpus.items) - 1
    assert result.identifier is not None
    failed = set(result.identifier.FailedSOPInstanceUIDList)
    assert failed == {i.sop_uid for i in corpus.items} - {jpeg.sop_uid}


def test_getscu_prefer_jpeg8_gets_stored_jpeg(local_server: XdsiProcess, corpus: Corpus, tmp_path: Path) -> None:
    """dcmtk ``getscu +xy`` proposes [JPEG Baseline, uncompressed...] for every storage class."""
    item = corpus.by_ts(JPEGBaseline8Bit)
    out = tmp_path / "getscu"
    out.mkdir()
    q = image_query(corpus, item)
    keys = ["-k", "QueryRetrieveLevel=IMAGE", "-k", f"StudyInstanceUID={q.StudyInstanceUID}",
            "-k", f"SeriesInstanceUID={q.SeriesInstanceUID}", "-k", f"SOPInstanceUID={item.sop_uid}"]
    run([tool("getscu"), "-v", "-S", "-aec", "XDSI", "+xy", "+B", "-od", str(out), *keys, local_server.host, str(local_server.dicom_port)])
    (path,) = list(out.iterdir())
    ds = dcmread(path)
    check_instance(item, ds, dataset_bytes(path), JPEGBaseline8Bit)


# -- C-MOVE failures: statuses and Failed SOP Instance UID List ---------------------------------------------


def c_move(server: XdsiProcess, dest: str, query: Dataset) -> tuple[Dataset, Dataset | None]:
    ae = AE(ae_title="MOVER")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = TIMEOUT
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = ae.associate(server.host, server.dicom_port, ae_title="XDSI")
    assert assoc.is_established
    try:
        responses = list(assoc.send_c_move(query, dest, StudyRootQueryRetrieveInformationModelMove))
    finally:
        assoc.release()
    return responses[-1]


def test_move_destination_without_context_for_some_classes(local_server: XdsiProcess, corpus: Corpus, destinations: Destinations) -> None:
    """CTONLY accepts CT Image Storage only: the MR and SC instances are failed sub-operations, listed; B000."""
    destinations.received["CTONLY"].clear()
    final, identifier = c_move(local_server, "CTONLY", study_query(corpus))
    ct = {i.sop_uid for i in corpus.items if i.sop_class == CTImageStorage}
    assert ct and len(ct) < len(corpus.items)
    assert final.Status == 0xB000, hex(final.Status)
    assert final.NumberOfCompletedSuboperations == len(ct)
    assert final.NumberOfFailedSuboperations == len(corpus.items) - len(ct)
    assert identifier is not None
    assert set(identifier.FailedSOPInstanceUIDList) == set(corpus.by_sop()) - ct
    assert set(destinations.received["CTONLY"]) == ct


@pytest.mark.parametrize("dest", ["REJECTER", "NOCONTEXT", "CLOSED"])
def test_move_destination_refusing_association_fails_every_suboperation(local_server: XdsiProcess, corpus: Corpus, dest: str) -> None:
    """A known destination that rejects the association, accepts no context, or is not listening:
    A702 with every UID, not A801."""
    final, identifier = c_move(local_server, dest, study_query(corpus))
    assert final.Status == 0xA702, hex(final.Status)
    assert final.NumberOfFailedSuboperations == len(corpus.items)
    assert final.get("NumberOfCompletedSuboperations", 0) == 0
    assert identifier is not None
    assert set(identifier.FailedSOPInstanceUIDList) == set(corpus.by_sop())
    assert dest in str(final.get("ErrorComment", ""))


def test_move_destination_aborting_midway_fails_the_rest_promptly(local_server: XdsiProcess, corpus: Corpus, destinations: Destinations) -> None:
    """ABORTER stores the first instance and aborts during the second C-STORE: the C-MOVE ends at once
    (well inside the DIMSE timeout) with one completed and every other instance failed and listed, and the
    server goes on serving moves (the sub-association's reactor, held paused between sub-operations, has ended)."""
    ct = [i for i in corpus.items if i.sop_class == CTImageStorage]
    assert len(corpus.items) >= 3 and ct
    destinations.received["ABORTER"].clear()
    q = study_query(corpus)
    t = time.monotonic()
    final, identifier = c_move(local_server, "ABORTER", q)
    assert time.monotonic() - t < TIMEOUT / 3
    assert final.Status in (0xA702, 0xB000), hex(final.Status)
    assert final.NumberOfCompletedSuboperations == 1
    assert final.NumberOfFailedSuboperations == len(corpus.items) - 1
    assert identifier is not None
    assert set(identifier.FailedSOPInstanceUIDList) == set(corpus.by_sop()) - {destinations.received["ABORTER"][0]}
    destinations.received["CTONLY"].clear()
    final, _ = c_move(local_server, "CTONLY", q)
    assert final.NumberOfCompletedSuboperations == len(ct)
    assert set(destinations.received["CTONLY"]) == {i.sop_uid for i in ct}


def test_move_unknown_destination_is_still_a801(local_server: XdsiProcess, corpus: Corpus) -> None:
    final, _ = c_move(local_server, "NOWHERE", study_query(corpus))
    assert final.Status == 0xA801


def test_move_and_get_with_invalid_uid_are_a900(local_server: XdsiProcess, destinations: Destinations) -> None:
    """An identifier with an invalid UID is refused (A900), not answered Success with nothing; no destination is contacted."""
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.StudyInstanceUID = "1.2.abc"
    destinations.received["CTONLY"].clear()
    final, _ = c_move(local_server, "CTONLY", q)
    assert final.Status == 0xA900, hex(final.Status)
    assert "1.2.abc" in str(final.get("ErrorComment", ""))
    assert destinations.received["CTONLY"] == []
    result = c_get(local_server, [(CTImageStorage, [ExplicitVRLittleEndian])], q)
    assert result.final.Status == 0xA900, hex(result.final.Status)
    assert result.received == {}
