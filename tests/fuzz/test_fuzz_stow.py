"""Fuzzing STOW-RS multipart bodies against a running server.

A valid one-part STOW-RS request is mutated at the MIME level (boundary,
part headers, type parameter, preamble, closing delimiter) and inside the
DICOM part (byte edits of a valid Part 10 file).  Every answer must be a 2xx
or 4xx (never 5xx); a 200/202/409 must carry a parseable application/dicom+json
body; every instance the server reports as stored must be retrievable as a
complete Part 10 file that pydicom reads; no STOW spool file may be left; memory
must not grow with the examples; and a valid STOW must still work afterwards.
"""

from __future__ import annotations

import io
import json
from typing import Iterator

import pytest
import requests
from hypothesis import given
from hypothesis import strategies as st
from pydicom import dcmread
from requests_toolbelt.multipart.decoder import MultipartDecoder

from tests.fuzz.fuzzing import RSS_GROWTH, Budget, fixed_uid, assert_no_traceback, assert_running, mutated, rss, text_mutation
from tests.integration.dimse_support import leftover_temp_files
from tests.support.objects import secondary_capture
from tests.support.server import XdsiProcess

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[XdsiProcess]:
    d = tmp_path_factory.mktemp("fuzzstow")
    srv = XdsiProcess(d / "data").start()
    try:
        yield srv
    finally:
        srv.stop()


def part10() -> bytes:
    """A small valid Secondary Capture with fresh (deterministic) UIDs."""
    return secondary_capture("FUZZ^STOW", "FUZZ01", new_uid=fixed_uid)[0]


def base(server: XdsiProcess) -> str:
    return f"http://127.0.0.1:{server.http_port}/dicomweb"


def stow(server: XdsiProcess, body: bytes, ct: str) -> requests.Response:
    return requests.post(base(server) + "/studies", data=body, headers={"Content-Type": ct, "Accept": "application/dicom+json"}, timeout=60)


def check(server: XdsiProcess, r: requests.Response) -> None:
    assert r.status_code < 500, (r.status_code, r.text[:3000])
    if r.status_code in (200, 202, 409):
        assert r.headers.get("Content-Type", "").startswith("application/dicom+json"), r.headers
        answer = json.loads(r.content)
        for item in answer.get("00081199", {}).get("Value", []):  # ReferencedSOPSequence: what the server says it stored
            url = item["00081190"]["Value"][0]
            g = requests.get(url, headers={"Accept": 'multipart/related; type="application/dicom"'}, timeout=30)
            assert g.status_code == 200, (url, g.status_code, g.text[:500])
            parts = MultipartDecoder(g.content, g.headers["Content-Type"]).parts
            assert len(parts) == 1
            ds = dcmread(io.BytesIO(parts[0].content))
            for _ in ds.iterall():  # every element decodes: nothing half-stored
                pass
            assert ds.SOPInstanceUID == item["00081155"]["Value"][0]


def assert_no_spool(server: XdsiProcess) -> None:
    assert leftover_temp_files(server.data_dir) == []


@st.composite
def stow_message(draw: st.DrawFn) -> tuple[bytes, str]:
    dicom = part10()
    how = draw(st.sampled_from(["as-is", "mutated", "no-preamble", "no-preamble-mutated", "truncated"]))
    if how == "mutated":
        dicom = draw(mutated(dicom, max_ops=4))
    elif how.startswith("no-preamble"):
        dicom = dicom[128:]
        if how.endswith("mutated"):
            dicom = draw(mutated(dicom, max_ops=3))
    elif how == "truncated":
        dicom = dicom[: draw(st.integers(0, len(dicom) - 1))]
    boundary = draw(st.one_of(st.just("b0undary"), st.text(alphabet=st.characters(codec="ascii", exclude_characters='"\r\n'), max_size=75)))
    part_ct = draw(st.sampled_from(["application/dicom", "application/dicom; transfer-syntax=1.2.840.10008.1.2.1", "application/dicom+json", "text/plain", "", "application/dicom; transfer-syntax=1.2.3"]))
    extra = draw(st.lists(st.tuples(st.sampled_from(["Content-Length", "Content-Location", "Content-ID", "Content-Transfer-Encoding", "X"]), text_mutation()), max_size=2))
    b = boundary.encode()
    head = (f"Content-Type: {part_ct}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in extra)).encode("utf-8", "surrogatepass")
    parts = [b"--" + b + b"\r\n" + head + b"\r\n" + dicom + b"\r\n"] * draw(st.integers(0, 2))
    closing = draw(st.sampled_from([b"--" + b + b"--\r\n", b"", b"--" + b + b"--", b"--" + b]))
    body = draw(st.sampled_from([b"", b"preamble text\r\n"])) + b"".join(parts) + closing
    if draw(st.booleans()):
        body = draw(mutated(body, max_ops=2))
    typ = draw(st.sampled_from(['; type="application/dicom"', "; type=application/dicom", "", '; type="application/dicom+xml"', '; type="text/html"']))
    bparam = draw(st.sampled_from([f'; boundary="{boundary}"', f"; boundary={boundary}", "", "; boundary=other"]))
    ct = draw(st.sampled_from(["multipart/related", "multipart/form-data", "application/dicom", "multipart/related; boundary"])) + typ + bparam
    return body, ct


def test_mutated_stow_bodies(server: XdsiProcess) -> None:
    budget, before, log0 = Budget(10), rss(server), len(server.log)
    # a baseline that must store
    r = stow(server, b"--b\r\nContent-Type: application/dicom\r\n\r\n" + part10() + b"\r\n--b--\r\n", 'multipart/related; type="application/dicom"; boundary=b')
    assert r.status_code == 200, r.text
    check(server, r)

    @given(message=stow_message())
    def run(message: tuple[bytes, str]) -> None:
        if budget.spent():
            return
        body, ct = message
        check(server, stow(server, body, ct.strip()))
        assert_no_spool(server)

    run()
    assert_running(server)
    assert_no_traceback(server, log0)
    r = stow(server, b"--b\r\nContent-Type: application/dicom\r\n\r\n" + part10() + b"\r\n--b--\r\n", 'multipart/related; type="application/dicom"; boundary=b')
    assert r.status_code == 200, r.text
    assert_no_spool(server)
    assert rss(server) - before < RSS_GROWTH
    print(f"stow: {budget.examples} examples")
