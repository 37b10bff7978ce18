"""A remote's delivery for a relay or fetch must be what was asked (issue 15, patient safety): wrong ones refused (A900)."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import pytest
from pydicom.dataset import Dataset

from xdsi.gateway import identity
from xdsi.gateway import relay as r
from xdsi.tools.synth import StudySpec, write_study

CT = "1.2.840.10008.5.1.4.1.1.2"


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> tuple[StudySpec, list[Path], StudySpec, list[Path]]:
    root = tmp_path_factory.mktemp("identity")
    asked = StudySpec(patient_id="PAT-A", patient_name="ASKED^ANNA", accession="IA1")
    other = StudySpec(patient_id="PAT-B", patient_name="OTHER^OTTO", accession="IB1")
    return asked, write_study(root / "a", asked, series=2, per_series=2), other, write_study(root / "b", other, series=1, per_series=1)


def _ident(level: str, **keys: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for k, v in keys.items():
        setattr(ds, k, v)
    return ds


def _header(path: Path) -> Dataset:
    from pydicom import dcmread

    return dcmread(path, stop_before_pixels=True)


def test_study_level(studies: Any) -> None:
    asked, a_files, other, b_files = studies
    exp = identity.Expected.of(_ident("STUDY", StudyInstanceUID=asked.study_uid))
    ha = _header(a_files[0])
    assert identity.check_file(exp, a_files[0], CT, str(ha.SOPInstanceUID)) is None
    hb = _header(b_files[0])
    reason = identity.check_file(exp, b_files[0], CT, str(hb.SOPInstanceUID))
    assert reason is not None and "StudyInstanceUID" in reason
    # the C-STORE command claims an instance of the asked study, the data set is another: the data set decides
    assert "SOP Instance UID" in identity.check_file(exp, b_files[0], CT, str(ha.SOPInstanceUID))


def test_series_image_and_patient_levels(studies: Any) -> None:
    asked, a_files, _, _ = studies
    h = [_header(p) for p in a_files]
    series0 = str(h[0].SeriesInstanceUID)
    other_series = next(x for x in h if str(x.SeriesInstanceUID) != series0)
    exp = identity.Expected.of(_ident("SERIES", StudyInstanceUID=asked.study_uid, SeriesInstanceUID=series0))
    assert identity.check_file(exp, a_files[0], CT, str(h[0].SOPInstanceUID)) is None
    i = h.index(other_series)
    assert "SeriesInstanceUID" in identity.check_file(exp, a_files[i], CT, str(other_series.SOPInstanceUID))
    exp = identity.Expected.of(_ident("IMAGE", StudyInstanceUID=asked.study_uid, SeriesInstanceUID=series0,
                                      SOPInstanceUID=str(h[0].SOPInstanceUID)))
    j = next(k for k, x in enumerate(h) if str(x.SeriesInstanceUID) == series0 and k != 0)
    assert "SOPInstanceUID" in identity.check_file(exp, a_files[j], CT, str(h[j].SOPInstanceUID))
    # Patient ID given in the request: held to it; the value is not in the reason (PHI in logs)
    exp = identity.Expected.of(_ident("STUDY", StudyInstanceUID=asked.study_uid, PatientID="PAT-X"))
    reason = identity.check_file(exp, a_files[0], CT, str(h[0].SOPInstanceUID))
    assert reason == "Patient ID differs from the request's"
    exp = identity.Expected.of(_ident("PATIENT", PatientID="PAT-A"))
    assert identity.check_file(exp, a_files[0], CT, str(h[0].SOPInstanceUID)) is None
    # a wildcard is no restriction, a wrong SOP Class is
    exp = identity.Expected.of(_ident("STUDY", StudyInstanceUID=asked.study_uid, PatientID="PAT*"))
    assert identity.check_file(exp, a_files[0], CT, str(h[0].SOPInstanceUID)) is None
    assert "SOP Class" in identity.check_file(exp, a_files[0], "1.2.840.10008.5.1.4.1.1.4", str(h[0].SOPInstanceUID))


def test_unreadable_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "junk.dcm"
    p.write_bytes(b"\x00" * 10)
    exp = identity.Expected(study_uids=("1.2.3",))
    assert identity.check_file(exp, p, CT, "1.2.3.4") is not None


def _event(path: Path, relay: r.Relay, sop: str) -> Any:
    req = SimpleNamespace(AffectedSOPClassUID=CT, AffectedSOPInstanceUID=sop, MoveOriginatorMessageID=relay.msg_id,
                          MoveOriginatorApplicationEntityTitle=relay.originator)
    return SimpleNamespace(request=req, assoc=SimpleNamespace(requestor=SimpleNamespace(ae_title=relay.remote_ae), dul=None),
                           dataset_path=path, context=SimpleNamespace(transfer_syntax="1.2.840.10008.1.2.1"))


@pytest.fixture()
def relay(tmp_path: Path, studies: Any) -> Iterator[r.Relay]:
    r.INBOX_ROOT = tmp_path / "relay"
    rel = r.Relay(tmp_path / "spool", "PACS1", 7)
    rel.originator = "XDSI"
    rel.expected = identity.Expected.of(_ident("STUDY", StudyInstanceUID=studies[0].study_uid))
    r.register(rel)
    try:
        yield rel
    finally:
        r.unregister(rel)
        r.INBOX_ROOT = None


def _copy(src: Path, tmp_path: Path, name: str) -> Path:
    p = tmp_path / name
    p.write_bytes(src.read_bytes())
    return p


@pytest.mark.parametrize("other_process", [False, True])
def test_hand_over_refuses_another_study(relay: r.Relay, tmp_path: Path, studies: Any, other_process: bool) -> None:
    _, a_files, _, b_files = studies
    if other_process:  # as in another worker: only the inbox (and its expectation file) is known here
        with r._lock:
            r._relays.pop((relay.remote_ae, relay.originator, relay.msg_id))
    try:
        wrong = _copy(b_files[0], tmp_path, "wrong.dcm")
        assert r.hand_over(_event(wrong, relay, str(_header(b_files[0]).SOPInstanceUID))) == identity.REFUSED_MISMATCH
        assert wrong.exists()  # not taken: pynetdicom removes its own spool file
        right = _copy(a_files[0], tmp_path, "right.dcm")
        assert r.hand_over(_event(right, relay, str(_header(a_files[0]).SOPInstanceUID))) == 0x0000
        got = relay.from_inbox() if other_process else [relay.items.get_nowait()[1]]
        assert [a.sop_instance_uid for a in got] == [str(_header(a_files[0]).SOPInstanceUID)]
        assert relay.items.empty() and not relay.from_inbox()
        # refused in another worker too: recorded in the inbox, so the relay's own process audits it (outcome 4)
        assert [u for u, _ in relay.refused] == [str(_header(b_files[0]).SOPInstanceUID)]
        assert not [n for n in os.listdir(relay.inbox) if n.endswith(r.REFUSED)] if relay.inbox else True
    finally:
        with r._lock:
            r._relays[(relay.remote_ae, relay.originator, relay.msg_id)] = relay


def test_inbox_without_expectation_refuses(relay: r.Relay, tmp_path: Path, studies: Any) -> None:
    """Fail closed: an inbox whose expectation file is gone does not take anything."""
    _, a_files, _, _ = studies
    with r._lock:
        r._relays.pop((relay.remote_ae, relay.originator, relay.msg_id))
    try:
        (relay.inbox / r.EXPECTED).unlink()
        right = _copy(a_files[0], tmp_path, "right.dcm")
        assert r.hand_over(_event(right, relay, str(_header(a_files[0]).SOPInstanceUID))) == identity.REFUSED_MISMATCH
        assert not relay.from_inbox()
    finally:
        with r._lock:
            r._relays[(relay.remote_ae, relay.originator, relay.msg_id)] = relay


def test_head_kept_by_the_reader_decides_as_the_file_does(studies: Any, tmp_path: Path) -> None:
    """identity.check with ``head`` (the spool file's first HEAD_BYTES as the direct reader wrote them, issue 15) gives
    the file's answer: the asked study passes, another study's instance is refused; a file the head scanner does not
    read (big endian here) still goes to pydicom, from the file."""
    from pydicom import dcmread
    from pydicom.data import get_testdata_file
    from pydicom.uid import ExplicitVRBigEndian

    from xdsi.gateway.headscan import HEAD_BYTES

    asked, a_files, other, b_files = studies
    exp = identity.Expected.of(_ident("STUDY", StudyInstanceUID=asked.study_uid))
    for path in (a_files[0], b_files[0]):
        sop = str(_header(path).SOPInstanceUID)
        head = path.read_bytes()[:HEAD_BYTES]
        with_head, _ = identity.check(exp, path, CT, sop, head)
        assert with_head == identity.check_file(exp, path, CT, sop)
        assert (with_head is None) == (path == a_files[0])
    # the head decides, not the file: a head of the other study refuses a file of the asked one (so it is really used)
    sop_b = str(_header(b_files[0]).SOPInstanceUID)
    assert identity.check(exp, a_files[0], CT, sop_b, b_files[0].read_bytes()[:HEAD_BYTES])[0] is not None
    big = Path(get_testdata_file("MR_small_bigendian.dcm"))
    assert str(dcmread(big, stop_before_pixels=True).file_meta.TransferSyntaxUID) == ExplicitVRBigEndian
    sop_big = str(_header(big).SOPInstanceUID)
    reason, got = identity.check(exp, big, str(_header(big).SOPClassUID), sop_big, big.read_bytes()[:HEAD_BYTES])
    assert reason is not None and "StudyInstanceUID" in reason and not isinstance(got, dict)  # read by pydicom
    assert reason == identity.check_file(exp, big, str(_header(big).SOPClassUID), sop_big)


@pytest.mark.parametrize("other_process", [False, True])
def test_hand_over_checks_the_head_the_reader_kept(relay: r.Relay, tmp_path: Path, studies: Any, other_process: bool) -> None:
    """A request read by the direct reader carries the spool file's head (receive_direct.HEAD): hand_over checks those
    bytes, in this process and in another worker's (inbox); a head of another study refuses (so it is what decides),
    the file's own head takes it."""
    from xdsi.dimse import receive_direct
    from xdsi.gateway.headscan import HEAD_BYTES

    _, a_files, _, b_files = studies
    if other_process:
        with r._lock:
            r._relays.pop((relay.remote_ae, relay.originator, relay.msg_id))
    try:
        sop = str(_header(a_files[0]).SOPInstanceUID)
        right = _copy(a_files[0], tmp_path, "right.dcm")
        event = _event(right, relay, sop)
        setattr(event.request, receive_direct.HEAD, b_files[0].read_bytes()[:HEAD_BYTES])
        assert r.hand_over(event) == identity.REFUSED_MISMATCH and right.exists()
        setattr(event.request, receive_direct.HEAD, a_files[0].read_bytes()[:HEAD_BYTES])
        assert r.hand_over(event) == 0x0000
        got = relay.from_inbox() if other_process else [relay.items.get_nowait()[1]]
        assert [a.sop_instance_uid for a in got] == [sop]
    finally:
        with r._lock:
            r._relays[(relay.remote_ae, relay.originator, relay.msg_id)] = relay
