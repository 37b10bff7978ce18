"""Consistent Time: clock offsets read from peers' HTTP ``Date`` (xdsi.security.clock).

Peers are real HTTP servers on 127.0.0.1 whose ``Date`` is stamped from a clock moved by a known
skew (http.server's own ``date_time_string``), reached through the same ``requests`` hook the XDS
clients and the PIXm lookup use; the strict registry double does the same for ITI-42.
"""

from __future__ import annotations

import http.server
import multiprocessing
import re
import threading
import time
from datetime import datetime, timezone
from email.utils import format_datetime
from pathlib import Path
from typing import Iterator

import pytest
import requests

from xdsi.security import clock
from xdsi.security.clock import ClockBook, Reading, offset_from, peer_of


class SkewedPeer:
    """An HTTP server whose every answer carries ``Date`` from a clock ``skew`` seconds off (or a fixed text)."""

    def __init__(self, skew: float = 0.0, status: int = 200, date_text: str | None = None) -> None:
        peer = self
        self.skew, self.status, self.date_text = skew, status, date_text

        class Handler(http.server.BaseHTTPRequestHandler):
            def date_time_string(self, timestamp: float | None = None) -> str:
                if peer.date_text is not None:
                    return peer.date_text
                return super().date_time_string(time.time() + peer.skew)

            def do_GET(self) -> None:
                body = b'{"resourceType": "OperationOutcome"}'
                self.send_response(peer.status)
                self.send_header("Content-Type", "application/fhir+json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def book(tmp_path: Path) -> Iterator[ClockBook]:
    b = clock.install(tmp_path)
    try:
        yield b
    finally:
        clock.uninstall()


@pytest.fixture(scope="module")
def peers() -> Iterator[dict[str, SkewedPeer]]:
    ps = {"ahead": SkewedPeer(5.0), "behind": SkewedPeer(-3.0), "true": SkewedPeer(0.0), "garbage": SkewedPeer(date_text="yesterday")}
    try:
        yield ps
    finally:
        for p in ps.values():
            p.stop()


def _get(url: str) -> requests.Response:
    with requests.Session() as s:
        s.hooks["response"].append(clock.observe)
        return s.get(url, timeout=10)


# -- the arithmetic ---------------------------------------------------------------------------------------


def test_offset_is_date_plus_half_a_second_minus_our_midpoint() -> None:
    mid = datetime(2026, 11, 30, 6, 0, 0, tzinfo=timezone.utc).timestamp()
    r = offset_from("Mon, 30 Nov 2026 06:00:10 GMT", mid - 0.2, mid + 0.2)
    assert r is not None
    assert r.offset == pytest.approx(10.5) and r.uncertainty == pytest.approx(0.7)
    assert r.at == datetime(2026, 11, 30, 6, 0, 0, tzinfo=timezone.utc) and r.flagged
    behind = offset_from("Mon, 30 Nov 2026 05:59:59 GMT", mid, mid)
    assert behind is not None and behind.offset == pytest.approx(-0.5) and not behind.flagged


def test_the_obsolete_http_date_forms_are_gmt_too() -> None:
    """RFC 9110 5.6.7: recipients accept RFC 850 and asctime() dates, both GMT."""
    mid = datetime(1994, 11, 6, 8, 49, 37, tzinfo=timezone.utc).timestamp()
    for text in ("Sun, 06 Nov 1994 08:49:37 GMT", "Sunday, 06-Nov-94 08:49:37 GMT", "Sun Nov  6 08:49:37 1994"):
        r = offset_from(text, mid, mid)
        assert r is not None and r.offset == pytest.approx(0.5), text


@pytest.mark.parametrize("text", ["", "yesterday", "Mon, 99 Foo 2026 25:61:61 GMT"])
def test_an_unusable_date_is_no_reading(text: str) -> None:
    assert offset_from(text, time.time(), time.time()) is None


@pytest.mark.parametrize(
    "url,peer",
    [
        ("https://Registry.example.org/xds/registry?x=1", "https://registry.example.org:443"),
        ("http://127.0.0.1:8080/repository", "http://127.0.0.1:8080"),
        ("https://[::1]:8443/fhir", "https://[::1]:8443"),
    ],
)
def test_one_clock_per_origin(url: str, peer: str) -> None:
    assert peer_of(url) == peer


# -- the book ---------------------------------------------------------------------------------------------


def test_book_keeps_the_last_n_per_peer_across_instances(tmp_path: Path) -> None:
    b = ClockBook(tmp_path, keep=3)
    t0 = datetime(2026, 11, 30, tzinfo=timezone.utc).timestamp()
    for i in range(5):
        b.record("https://a:443", Reading(datetime.fromtimestamp(t0 + i, timezone.utc), float(i), 0.5))
    b.record("https://b:443", Reading(datetime.fromtimestamp(t0, timezone.utc), -2.0, 0.6))
    again = ClockBook(tmp_path).peers()  # a new process would read the same file
    assert [r.offset for r in again["https://a:443"]] == [2.0, 3.0, 4.0]
    assert again["https://b:443"] == [Reading(datetime.fromtimestamp(t0, timezone.utc), -2.0, 0.6)]


def _write_many(data_dir: str, peer: str, n: int) -> None:
    b = ClockBook(Path(data_dir), keep=1000)
    for i in range(n):
        b.record(peer, Reading(datetime.now(timezone.utc), float(i), 0.5))


def test_two_processes_writing_lose_nothing(tmp_path: Path) -> None:
    """The server's publisher and an `xdsi publish` may write at once: the flock keeps every reading."""
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_write_many, args=(str(tmp_path), f"https://p{k}:443", 40)) for k in range(3)]
    for p in procs:
        p.start()
    _write_many(str(tmp_path), "https://p0:443", 40)  # and this process, on the same peer as one of them
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    got = ClockBook(tmp_path).peers()
    assert {k: len(v) for k, v in got.items()} == {"https://p0:443": 80, "https://p1:443": 40, "https://p2:443": 40}


def test_a_damaged_file_reads_as_no_readings_and_is_replaced(tmp_path: Path) -> None:
    (tmp_path / clock.FILE_NAME).write_text("{not json")
    b = ClockBook(tmp_path)
    assert b.peers() == {}
    b.record("https://a:443", Reading(datetime.now(timezone.utc), 0.1, 0.5))
    assert len(ClockBook(tmp_path).peers()["https://a:443"]) == 1


# -- the hook, against real peers -------------------------------------------------------------------------


def test_hook_reads_skewed_peers(book: ClockBook, peers: dict[str, SkewedPeer]) -> None:
    for name in ("ahead", "behind", "true"):
        assert _get(peers[name].url + "/x").status_code == 200
    got = {p: rs[-1] for p, rs in book.peers().items()}
    for name, skew in (("ahead", 5.0), ("behind", -3.0), ("true", 0.0)):
        r = got[peer_of(peers[name].url)]
        # truncation to the second and the exchange's duration are all the error there is
        assert abs(r.offset - skew) <= r.uncertainty + 0.05, (name, r)
        assert r.uncertainty < 1.0
        assert abs((r.at - datetime.now(timezone.utc)).total_seconds()) < 10
    assert got[peer_of(peers["ahead"].url)].flagged and got[peer_of(peers["behind"].url)].flagged
    assert not got[peer_of(peers["true"].url)].flagged


def test_report_flags_only_peers_beyond_one_second(book: ClockBook, peers: dict[str, SkewedPeer], tmp_path: Path) -> None:
    for name in ("ahead", "true"):
        _get(peers[name].url)
    lines = list(clock.report(tmp_path))
    assert lines[0].startswith("clock:      offsets seen from peers' HTTP Date")
    ahead = next(line for line in lines if peer_of(peers["ahead"].url) in line)
    true = next(line for line in lines if peer_of(peers["true"].url) in line)
    offset, unc = (float(x) for x in re.search(r": ([+-]\d+\.\d\d) s \(\+-(\d+\.\d\d)\) at ", ahead).groups())  # type: ignore[union-attr]
    assert abs(offset - 5.0) <= unc + 0.01 and ahead.endswith("** more than 1 s off **"), ahead
    assert "**" not in true, true
    assert list(clock.report(tmp_path / "nowhere"))[0].startswith("clock:      no readings yet")


def test_a_bad_date_is_ignored_and_never_breaks_the_exchange(book: ClockBook, peers: dict[str, SkewedPeer]) -> None:
    r = _get(peers["garbage"].url)
    assert r.status_code == 200 and r.json()["resourceType"] == "OperationOutcome"
    assert peer_of(peers["garbage"].url) not in book.peers()


def test_nothing_is_written_when_no_book_is_installed(tmp_path: Path, peers: dict[str, SkewedPeer]) -> None:
    clock.uninstall()
    assert _get(peers["ahead"].url).status_code == 200
    assert not (tmp_path / clock.FILE_NAME).exists()


def test_pixm_lookup_is_read(book: ClockBook, peers: dict[str, SkewedPeer]) -> None:
    """ITI-83: a PIX Manager that does not know the patient (404) still showed its clock."""
    from xdsi.xds.pix import pix_lookup

    slow = SkewedPeer(-7.0, status=404)
    try:
        assert pix_lookup(slow.url, "P1", "1.2.3", "1.2.4", timeout=10) is None
        [r] = book.peers()[peer_of(slow.url)]
        assert abs(r.offset + 7.0) <= r.uncertainty + 0.05
    finally:
        slow.stop()


def test_registry_double_with_a_skewed_clock_via_zeep(book: ClockBook, tmp_path: Path) -> None:
    """ITI-42 through the zeep client (MtomTransport): the strict registry's skewed Date is read, whatever it answers."""
    from lxml import etree

    from tests.support.registry import TestRegistry
    from tests.support.xds import PATIENT_CX
    from xdsi.standards import constants as C
    from xdsi.xds.client import RegistryClient
    from xdsi.xds.codes import CodeTable

    with TestRegistry(CodeTable.load(), {PATIENT_CX}) as registry:
        registry.date_skew = 12.0
        empty = etree.Element(C.q("lcm", "SubmitObjectsRequest"))
        etree.SubElement(empty, C.q("rim", "RegistryObjectList"))
        result = RegistryClient(registry.registry_url, timeout=10).register(empty)  # no SubmissionSet: a RegistryError
        assert result.status != C.STATUS_SUCCESS
        [r] = book.peers()[peer_of(registry.registry_url)]
    assert abs(r.offset - 12.0) <= r.uncertainty + 0.05 and r.flagged


def test_format_of_our_own_dates_round_trips() -> None:
    """The Date we would parse is what http.server writes (format_datetime with usegmt)."""
    now = datetime.now(timezone.utc).replace(microsecond=0)
    r = offset_from(format_datetime(now, usegmt=True), now.timestamp(), now.timestamp())
    assert r is not None and r.offset == pytest.approx(0.5)
