"""Fuzzing the DICOM upper layer and C-STORE of a running server.

* Raw PDUs on a socket: a valid A-ASSOCIATE-RQ with mutated fields (protocol
  version, AE titles, application context, presentation contexts, user
  information, item and PDU length fields), byte-mutated and truncated PDUs,
  oversized declared lengths, random bytes, and random PDUs sent after an
  accepted association.
* C-STORE with pynetdicom of a valid encoded data set whose bytes were mutated
  (element tags, VRs and length fields, or anywhere), sent exactly as mutated.

After every example: the server process is alive, answers a C-ECHO, and has
no spool file left in its temp dir; after a C-STORE the instance is either
stored complete (found by QIDO, retrieved, every element decodes) when the
status said so, or absent (C-FIND of its study finds nothing, the instance
count unchanged) when it did not.  Memory must not grow with the examples.
"""

from __future__ import annotations

import io
import socket
import struct
import time
import warnings
from pathlib import Path
from typing import Iterator

import pytest
import requests
from hypothesis import given
from hypothesis import strategies as st
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind, Verification
from requests_toolbelt.multipart.decoder import MultipartDecoder

from tests.fuzz.fuzzing import RSS_GROWTH, Budget, assert_no_traceback, assert_running, fixed_uid, mutated, rss
from tests.integration.dimse_support import http_status, leftover_temp_files
from tests.support.server import XdsiProcess

pytestmark = pytest.mark.timeout(150)

ACSE = 2  # the server's A-ASSOCIATE-RQ / ARTIM deadline: how long a silent or half-sent peer may hold a socket
NETWORK = 3  # its idle timeout inside an association
PYNETDICOM_HANDLED = ("pynetdicom.dul", "pynetdicom.utils")  # decode failures it logs, then aborts
# pynetdicom 3.0.4's reactor thread dies on an A-ASSOCIATE-RQ whose presentation context ID is even
# (pdu_items.to_primitive -> ValueError in AE-6); the socket is closed and service goes on.  Upstream bug,
# reproduced by test_even_presentation_context_id_kills_no_thread (xfail) and not failed again by the fuzzer.
KNOWN_PYNETDICOM = ("'context_id' must be an odd integer between 1 and 255",)
APP_CONTEXT = b"1.2.840.10008.3.1.1.1"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[XdsiProcess]:
    root = tmp_path_factory.mktemp("fuzzdimse")
    cfg = root / "xdsi.toml"
    cfg.write_text(f"[dimse]\nacse_timeout = {ACSE}\nnetwork_timeout = {NETWORK}\ndimse_timeout = {NETWORK}\n")
    srv = XdsiProcess(root / "data", config=cfg).start()
    try:
        yield srv
    finally:
        srv.stop()


# -- checks --------------------------------------------------------------------------------------


def _ae() -> AE:
    ae = AE(ae_title="FUZZSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    return ae


def echo(server: XdsiProcess) -> None:
    """A normal C-ECHO is answered Success (retrying briefly: a fuzzed peer may still hold its slot)."""
    ae = _ae()
    ae.add_requested_context(Verification)
    deadline = time.monotonic() + ACSE + 5
    while True:
        assoc = ae.associate(server.host, server.dicom_port, ae_title=server.ae_title)
        if assoc.is_established:
            try:
                rsp = assoc.send_c_echo()
                assert rsp is not None and rsp.Status == 0, rsp
                return
            finally:
                assoc.release()
        assert_running(server)
        assert time.monotonic() < deadline, "no association accepted for a C-ECHO:\n" + server.output()[-3000:]
        time.sleep(0.2)


def assert_no_spool(server: XdsiProcess, within: float = NETWORK + 3) -> None:
    deadline = time.monotonic() + within
    while (left := leftover_temp_files(server.data_dir)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert left == [], left


# -- raw PDUs ------------------------------------------------------------------------------------


def item(kind: int, value: bytes, length: int | None = None) -> bytes:
    return struct.pack(">BBH", kind, 0, len(value) if length is None else length & 0xFFFF) + value


def presentation_context(ctx_id: int, abstract: bytes, syntaxes: list[bytes]) -> bytes:
    return item(0x20, bytes([ctx_id & 0xFF, 0, 0, 0]) + item(0x30, abstract) + b"".join(item(0x40, s) for s in syntaxes))


def associate_rq(
    *, version: int = 1, called: bytes = b"XDSI", calling: bytes = b"FUZZ", app: bytes = APP_CONTEXT, contexts: list[bytes] | None = None,
    max_pdu: int = 16384, user_extra: bytes = b"", extra_items: bytes = b"", pdu_length: int | None = None, pdu_type: int = 1,
) -> bytes:  # fmt: skip
    if contexts is None:
        contexts = [presentation_context(1, Verification.encode(), [ImplicitVRLittleEndian.encode()])]
    user = item(0x51, struct.pack(">I", max_pdu & 0xFFFFFFFF)) + item(0x52, b"1.2.826.0.1.3680043.9.9999") + user_extra
    body = struct.pack(">HH", version & 0xFFFF, 0) + called.ljust(16)[:16] + calling.ljust(16)[:16] + bytes(32)
    body += item(0x10, app) + b"".join(contexts) + item(0x50, user) + extra_items
    return struct.pack(">BBI", pdu_type, 0, len(body) if pdu_length is None else pdu_length & 0xFFFFFFFF) + body


uid_bytes = st.one_of(st.sampled_from([Verification.encode(), CTImageStorage.encode(), ExplicitVRLittleEndian.encode(), ImplicitVRLittleEndian.encode(), b"", b"1.2", b"1." * 40]), st.binary(max_size=80))
sub_item = st.builds(lambda k, v, n: item(k, v, n), st.integers(0, 255), st.binary(max_size=40), st.one_of(st.none(), st.integers(0, 0xFFFF)))


@st.composite
def association_requests(draw: st.DrawFn) -> bytes:
    contexts = draw(st.one_of(
        st.none(),
        st.lists(st.builds(presentation_context, st.integers(0, 255), uid_bytes, st.lists(uid_bytes, max_size=3)), max_size=4),
        st.lists(sub_item, max_size=3),
    ))  # fmt: skip
    rq = associate_rq(
        version=draw(st.one_of(st.just(1), st.integers(0, 0xFFFF))),
        called=draw(st.one_of(st.just(b"XDSI"), st.binary(max_size=20))),
        calling=draw(st.one_of(st.just(b"FUZZ"), st.binary(max_size=20))),
        app=draw(st.one_of(st.just(APP_CONTEXT), uid_bytes)),
        contexts=contexts,
        max_pdu=draw(st.one_of(st.just(16384), st.sampled_from([0, 1, 6, 0xFFFFFFFF]), st.integers(0, 0xFFFFFFFF))),
        user_extra=b"".join(draw(st.lists(sub_item, max_size=3))),
        extra_items=b"".join(draw(st.lists(sub_item, max_size=2))),
        pdu_length=draw(st.one_of(st.none(), st.none(), st.integers(0, 0xFFFFFFFF), st.sampled_from([0, 1, 0x7FFFFFFF, 0xFFFFFFFF]))),
        pdu_type=draw(st.sampled_from([1, 1, 1, 2, 3, 4, 5, 6, 7, 0, 255])),
    )
    how = draw(st.sampled_from(["fields", "mutated", "truncated", "random"]))
    if how == "mutated":
        rq = draw(mutated(rq))
    elif how == "truncated":
        rq = rq[: draw(st.integers(0, len(rq)))]
    elif how == "random":
        rq = draw(st.binary(max_size=512))
    return rq


def pdv_pdu(ctx: int, header: int, data: bytes) -> bytes:
    pdv = struct.pack(">IBB", len(data) + 2, ctx, header) + data
    return struct.pack(">BBI", 4, 0, len(pdv)) + pdv


followups = st.one_of(
    st.builds(pdv_pdu, st.sampled_from([1, 1, 3, 0, 255]), st.integers(0, 255), st.binary(max_size=200)),
    st.sampled_from([struct.pack(">BBI", 5, 0, 4) + bytes(4), struct.pack(">BBI", 7, 0, 4) + bytes(4), struct.pack(">BBI", 5, 0, 0xFFFFFFFF), struct.pack(">BBI", 4, 0, 0x7FFFFFFF) + b"x"]),
    st.binary(max_size=300),
)


def exchange(server: XdsiProcess, first: bytes, then: list[bytes]) -> bytes:
    """Send ``first``, read the answer (up to 0.4 s), send ``then`` if an A-ASSOCIATE-AC came back; close."""
    answer = b""
    with socket.create_connection((server.host, server.dicom_port), timeout=0.4) as s:
        try:
            s.sendall(first)
            answer = s.recv(65536)
            if answer[:1] == b"\x02":
                for pdu in then:
                    s.sendall(pdu)
                answer += s.recv(65536)
        except (socket.timeout, ConnectionError):
            pass
    return answer


def test_associate_rj_with_a_bad_source_logs_no_traceback(server: XdsiProcess) -> None:
    """Found by test_raw_pdus in CI: an A-ASSOCIATE-RJ (an acceptor's PDU) with Source 9, sent to us after
    the association is accepted, made pynetdicom's standard logging handler raise (logged with a traceback)."""
    log0 = len(server.log)
    rj = struct.pack(">BBIBBBB", 0x03, 0, 4, 0, 1, 9, 1)  # result 1, source 9 (not 1, 2 or 3), reason 1
    answer = exchange(server, associate_rq(), [rj])
    assert answer[:1] == b"\x02"
    echo(server)
    time.sleep(0.5)
    text = "\n".join(server.log[log0:])
    assert "Traceback (most recent call last)" not in text, text[-3000:]


def test_raw_pdus(server: XdsiProcess) -> None:
    budget, before, log0 = Budget(12), rss(server), len(server.log)
    assert exchange(server, associate_rq(), [])[:1] == b"\x02"  # the unmutated request is accepted

    @given(first=association_requests(), then=st.lists(followups, max_size=3))
    def run(first: bytes, then: list[bytes]) -> None:
        if budget.spent():
            return
        answer = exchange(server, first, then)
        assert answer[:1] in (b"", b"\x02", b"\x03", b"\x04", b"\x06", b"\x07"), answer[:64]  # an upper-layer PDU or nothing
        assert_running(server)
        echo(server)

    run()
    echo(server)
    assert_no_traceback(server, log0, PYNETDICOM_HANDLED, KNOWN_PYNETDICOM)
    assert_no_spool(server)
    assert rss(server) - before < RSS_GROWTH
    print(f"raw pdus: {budget.examples} examples")


@pytest.mark.xfail(strict=True, reason="pynetdicom 3.0.4: an even presentation context ID in an A-ASSOCIATE-RQ raises ValueError in its "
                   "reactor thread (fsm AE-6 -> PresentationContext.context_id); the thread dies with a traceback instead of "
                   "answering A-ASSOCIATE-RJ/A-ABORT. Found by test_raw_pdus; upstream fix needed (or a pre-decode check)")
def test_even_presentation_context_id_kills_no_thread(server: XdsiProcess) -> None:
    log0 = len(server.log)
    answer = exchange(server, associate_rq(contexts=[presentation_context(2, Verification.encode(), [ImplicitVRLittleEndian.encode()])]), [])
    time.sleep(0.5)
    echo(server)
    assert answer[:1] in (b"\x03", b"\x07"), answer[:16]  # A-ASSOCIATE-RJ or A-ABORT (PS3.8 9.3.2.2: ID must be odd)
    assert_no_traceback(server, log0, PYNETDICOM_HANDLED)


# -- mutated data sets by C-STORE ------------------------------------------------------------------


def ct_dataset() -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = fixed_uid()
    ds.StudyInstanceUID = fixed_uid()
    ds.SeriesInstanceUID = fixed_uid()
    ds.PatientID = "FUZZ-DIMSE"
    ds.PatientName = "Fuzz^Dimse"
    ds.StudyDate = "20240102"
    ds.Modality = "CT"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.Rows = ds.Columns = 4
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.SamplesPerPixel = 1
    ds.PixelRepresentation = 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = bytes(range(32))
    return ds


def encode(ds: Dataset) -> bytes:
    buf = DicomBytesIO()
    buf.is_implicit_VR, buf.is_little_endian = False, True
    write_dataset(buf, ds)
    return buf.getvalue()


LONG_VRS = {b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"SQ", b"UN", b"UT", b"UC", b"UR", b"SV", b"UV"}


def element_offsets(data: bytes) -> list[tuple[int, int]]:
    """(offset, header length) of each top-level element of explicit-VR little-endian ``data`` (no sequences)."""
    out, pos = [], 0
    while pos + 8 <= len(data):
        vr = data[pos + 4 : pos + 6]
        if vr in LONG_VRS:
            length = struct.unpack("<I", data[pos + 8 : pos + 12])[0]
            out.append((pos, 12))
            pos += 12 + length
        else:
            length = struct.unpack("<H", data[pos + 6 : pos + 8])[0]
            out.append((pos, 8))
            pos += 8 + length
    return out


@st.composite
def mutated_dataset(draw: st.DrawFn, data: bytes) -> bytes:
    out = bytearray(data)
    elements = element_offsets(data)
    for _ in range(draw(st.integers(1, 3))):
        pos, head = draw(st.sampled_from(elements))
        what = draw(st.sampled_from(["tag", "vr", "length", "anywhere"]))
        if what == "tag":
            out[pos : pos + 4] = draw(st.one_of(st.binary(min_size=4, max_size=4), st.sampled_from([b"\xfe\xff\x00\xe0", b"\xfe\xff\xdd\xe0", b"\x02\x00\x10\x00", b"\x08\x00\x16\x00", b"\x08\x00\x18\x00", b"\xe0\x7f\x10\x00"])))
        elif what == "vr":
            out[pos + 4 : pos + 6] = draw(st.one_of(st.sampled_from([b"SQ", b"OB", b"UN", b"UI", b"US", b"FD", b"AT", b"  ", b"\x00\x00", b"UT"]), st.binary(min_size=2, max_size=2)))
        elif what == "length":
            if head == 12:
                out[pos + 8 : pos + 12] = struct.pack("<I", draw(st.one_of(st.sampled_from([0, 1, 0xFFFFFFFF, 0xFFFFFFFE, 0x7FFFFFFF]), st.integers(0, 0xFFFFFFFF))))
            else:
                out[pos + 6 : pos + 8] = struct.pack("<H", draw(st.one_of(st.sampled_from([0, 1, 0xFFFF]), st.integers(0, 0xFFFF))))
        else:
            out = bytearray(draw(mutated(bytes(out), max_ops=2)))
    return bytes(out)


def part10(path: Path, ds: Dataset, body: bytes) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    out = io.BytesIO()
    out.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(out, meta, enforce_standard=True)
    path.write_bytes(out.getvalue() + body)
    return path


def study_found(server: XdsiProcess, study_uid: str) -> int:
    """How many studies a C-FIND (Study Root, STUDY level) finds for ``study_uid``."""
    ae = _ae()
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.StudyInstanceUID = study_uid
    q.NumberOfStudyRelatedInstances = ""
    assoc = ae.associate(server.host, server.dicom_port, ae_title=server.ae_title)
    assert assoc.is_established
    try:
        found = [ident for status, ident in assoc.send_c_find(q, StudyRootQueryRetrieveInformationModelFind) if status and status.Status in (0xFF00, 0xFF01)]
    finally:
        assoc.release()
    return len(found)


def assert_stored_complete(server: XdsiProcess, sop_uid: str) -> None:
    base = f"http://127.0.0.1:{server.http_port}/dicomweb"
    r = requests.get(base + "/instances", params={"SOPInstanceUID": sop_uid}, timeout=30)
    assert r.status_code == 200, (r.status_code, r.text[:500])
    [hit] = r.json()
    url = hit["00081190"]["Value"][0]
    g = requests.get(url, headers={"Accept": 'multipart/related; type="application/dicom"'}, timeout=30)
    assert g.status_code == 200, (g.status_code, g.text[:500])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's VR guess is checked below, against the File Meta
        ds = dcmread(io.BytesIO(MultipartDecoder(g.content, g.headers["Content-Type"]).parts[0].content))
        for _ in ds.iterall():
            pass
    assert ds.original_encoding[0] == ds.file_meta.TransferSyntaxUID.is_implicit_VR, "the stored file's body is not in its File Meta's transfer syntax"
    assert ds.SOPInstanceUID == sop_uid


def test_mutated_datasets_by_c_store(server: XdsiProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # send our bytes exactly as mutated
    budget, before, log0 = Budget(15), rss(server), len(server.log)
    template = encode(ct_dataset())
    outcomes: dict[str, int] = {}
    ds = ct_dataset()
    rsp = _store(server, part10(tmp_path / "baseline.dcm", ds, encode(ds)))
    assert rsp.Status == 0, rsp  # the unmutated data set is stored

    @given(mutation=mutated_dataset(template))
    def run(mutation: bytes) -> None:
        if budget.spent():
            return
        ds = ct_dataset()  # fresh UIDs of the template's lengths, put where the template had its own
        fresh = mutation
        for tag, new in ((0x00080018, ds.SOPInstanceUID), (0x0020000D, ds.StudyInstanceUID), (0x0020000E, ds.SeriesInstanceUID)):
            fresh = fresh.replace(_uid_bytes(template, tag).rstrip(b"\0"), new.encode())
        path = part10(tmp_path / "m.dcm", ds, fresh)
        count = int(http_status(server)["instances"])
        rsp = _store(server, path)
        if rsp is NOT_SENT:
            return
        status = int(rsp.Status) if rsp is not None and "Status" in rsp else None
        ok = status is not None and (status == 0 or status & 0xF000 == 0xB000)
        key = "stored" if ok else f"{status:04X}" if status is not None else "no answer"
        outcomes[key] = outcomes.get(key, 0) + 1
        assert_running(server)
        assert_no_spool(server)
        if ok:
            assert int(http_status(server)["instances"]) == count + 1
            assert_stored_complete(server, ds.SOPInstanceUID)
        else:
            assert int(http_status(server)["instances"]) == count, "refused, yet an instance was added"
            assert study_found(server, ds.StudyInstanceUID) == 0, "refused, yet its study is in the index"
        echo(server)

    run()
    echo(server)
    assert_no_traceback(server, log0, PYNETDICOM_HANDLED, KNOWN_PYNETDICOM)
    assert rss(server) - before < RSS_GROWTH
    print(f"c-store: {budget.examples} examples, outcomes {outcomes}")


def _store(server: XdsiProcess, path: Path) -> Dataset | None:
    ae = _ae()
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    assoc = ae.associate(server.host, server.dicom_port, ae_title=server.ae_title)
    assert assoc.is_established
    try:
        return assoc.send_c_store(path)
    except (TypeError, ValueError, AttributeError, KeyError):
        # pynetdicom could not read our file's File Meta (the mutation reached into it): nothing was sent
        return NOT_SENT
    finally:
        if assoc.is_established:
            assoc.release()


NOT_SENT = Dataset()


def _uid_bytes(template: bytes, tag: int) -> bytes:
    """The value bytes of ``tag`` (a UI element) in the template encoding."""
    for pos, head in element_offsets(template):
        group, elem = struct.unpack("<HH", template[pos : pos + 4])
        if (group << 16 | elem) == tag:
            length = struct.unpack("<H", template[pos + 6 : pos + 8])[0]
            return template[pos + 8 : pos + 8 + length]
    raise KeyError(hex(tag))
