"""Fuzzing DICOMweb QIDO-RS query strings, WADO-RS paths and WADO-URI parameters against a running server.

Random keys and values (unicode, control characters, very long values,
wildcards, malformed UIDs and dates and ranges, repeated keys) must never give
a 5xx; every response header must be a clean Latin-1 string (cheroot answers
500 when an application hands it anything else); the server's memory must not
grow with the examples and a normal query must still work afterwards.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterator

import pytest
import requests
from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz.fuzzing import RSS_GROWTH, Budget, assert_no_traceback, assert_running, rss, text_mutation
from tests.support.ids import Study, make_study, start_ids
from tests.support.server import XdsiProcess

pytestmark = pytest.mark.timeout(120)

QIDO_KEYS = [
    "PatientName", "PatientID", "StudyDate", "StudyTime", "AccessionNumber", "ModalitiesInStudy", "StudyInstanceUID",
    "SeriesInstanceUID", "SOPInstanceUID", "Modality", "00100010", "0020000D", "00080020", "ReferringPhysicianName",
    "StudyDescription", "IssuerOfPatientID", "includefield", "fuzzymatching", "limit", "offset", "charset",
    "PatientBirthDate", "SeriesNumber", "InstanceNumber", "00081190", "ffffffff", "0008", "Nonsense",
]  # fmt: skip
WADO_KEYS = [
    "requestType", "studyUID", "seriesUID", "objectUID", "contentType", "charset", "anonymize", "annotation", "rows",
    "columns", "region", "windowCenter", "windowWidth", "frameNumber", "imageQuality", "presentationUID",
    "presentationSeriesUID", "transferSyntax",
]  # fmt: skip
CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[XdsiProcess, Study]]:
    tmp = tmp_path_factory.mktemp("fuzzweb")
    study = make_study(tmp / "s", series=1, per_series=2, rows=16, columns=16)
    srv = start_ids(tmp, [study])
    try:
        yield srv, study
    finally:
        srv.stop()


def base(server: XdsiProcess) -> str:
    return f"http://127.0.0.1:{server.http_port}"


def check_response(r: requests.Response) -> None:
    assert r.status_code < 500, (r.request.url, r.status_code, r.text[:2000])
    for k, v in r.raw.headers.items():
        v.encode("latin-1")  # http.client decodes as Latin-1: this guards the invariant if that ever changes
        assert not CONTROL.search(v), (k, v)
    if r.status_code == 200 and r.headers.get("Content-Type", "").startswith("application/dicom+json"):
        json.loads(r.content)


def values(study: Study) -> st.SearchStrategy[str]:
    s = study.spec
    real = [study.uid, s.patient_id, s.patient_name, *study.series]
    return st.one_of(
        text_mutation(),
        st.sampled_from(real),
        st.builds(lambda a, b: f"{a}-{b}", st.sampled_from(["", "2024", "20240101", "1900", "99999999", "2024-01-01", "abc"]), st.sampled_from(["", "20241231", "0", "x", "2024"])),
        st.builds(lambda v, c: v[: len(v) // 2] + c + v[len(v) // 2 :], st.sampled_from(real), st.sampled_from(["*", "?", "\\", "^", "=", "é", "\x7f"])),
    )


@st.composite
def query(draw: st.DrawFn, study: Study, keys: list[str]) -> list[tuple[str, str]]:
    n = draw(st.integers(0, 6))
    key = st.one_of(st.sampled_from(keys), st.text(max_size=20))
    return [(draw(key), draw(values(study))) for _ in range(n)]


def qido_paths(study: Study) -> list[str]:
    series = next(iter(study.series))
    return ["/dicomweb/studies", "/dicomweb/series", "/dicomweb/instances", f"/dicomweb/studies/{study.uid}/series", f"/dicomweb/studies/{study.uid}/instances", f"/dicomweb/studies/{study.uid}/series/{series}/instances"]


def test_qido_query_strings(server: tuple[XdsiProcess, Study]) -> None:
    srv, study = server
    budget = Budget(12)
    before, log0 = rss(srv), len(srv.log)
    session = requests.Session()

    @given(path=st.sampled_from(qido_paths(study)), params=query(study, QIDO_KEYS))
    def run(path: str, params: list[tuple[str, str]]) -> None:
        if budget.spent():
            return
        check_response(session.get(base(srv) + path, params=params, timeout=30))

    run()
    assert_running(srv)
    assert_no_traceback(srv, log0)
    r = session.get(base(srv) + "/dicomweb/studies", params={"PatientID": study.spec.patient_id}, timeout=30)
    assert r.status_code == 200 and [x["0020000D"]["Value"][0] for x in r.json()] == [study.uid]
    assert rss(srv) - before < RSS_GROWTH
    print(f"qido: {budget.examples} examples")


def test_wado_uri_parameters(server: tuple[XdsiProcess, Study]) -> None:
    srv, study = server
    budget = Budget(10)
    series, [(sop, _f), *_] = next(iter(study.series.items()))
    valid = {"requestType": "WADO", "studyUID": study.uid, "seriesUID": series, "objectUID": sop}
    before, log0 = rss(srv), len(srv.log)
    session = requests.Session()

    @given(keep=st.lists(st.sampled_from(sorted(valid)), unique=True), extra=query(study, WADO_KEYS), accept=st.one_of(st.none(), text_mutation(), st.sampled_from(["image/jpeg", "*/*", "application/dicom;q=x", "image/*, text/html;q=0.1"])))
    def run(keep: list[str], extra: list[tuple[str, str]], accept: str | None) -> None:
        if budget.spent():
            return
        params = [(k, valid[k]) for k in keep] + extra
        headers = {"Accept": accept.encode("utf-8").decode("latin-1")} if accept is not None and not CONTROL.search(accept) else {}
        check_response(session.get(base(srv) + "/wado", params=params, headers=headers, timeout=30))

    run()
    assert_running(srv)
    assert_no_traceback(srv, log0)
    r = session.get(base(srv) + "/wado", params={**valid, "contentType": "application/dicom"}, timeout=30)
    assert r.status_code == 200 and r.content[128:132] == b"DICM"
    assert rss(srv) - before < RSS_GROWTH
    print(f"wado-uri: {budget.examples} examples")


def test_wado_rs_path_segments(server: tuple[XdsiProcess, Study]) -> None:
    srv, study = server
    budget = Budget(8)
    series, [(sop, _f), *_] = next(iter(study.series.items()))
    log0 = len(srv.log)
    session = requests.Session()
    segment = st.one_of(text_mutation(), st.sampled_from([study.uid, series, sop, "1", "1,1", "0", "-1", "1,,2", "99999999999999999999", "00100010", "7FE00010"]))

    @given(
        shape=st.sampled_from(["/dicomweb/studies/{0}/metadata", "/dicomweb/studies/{0}/series/{1}/metadata", "/dicomweb/studies/{0}/series/{1}/instances/{2}/frames/{3}",
                               "/dicomweb/studies/{0}/series/{1}/instances/{2}/rendered", "/dicomweb/studies/{0}/series/{1}/instances/{2}/bulkdata/{3}",
                               "/dicomweb/studies/{0}/series/{1}/instances/{2}/frames/{3}/rendered"]),
        parts=st.tuples(segment, segment, segment, segment),
        which=st.lists(st.integers(0, 3), max_size=4),
        params=query(study, ["quality", "viewport", "window", "accept", "charset", "annotation", "iccprofile"]),
    )  # fmt: skip
    def run(shape: str, parts: tuple[str, str, str, str], which: list[int], params: list[tuple[str, str]]) -> None:
        if budget.spent():
            return
        good = [study.uid, series, sop, "1"]
        for i in which:  # mostly valid paths with a few fuzzed segments, so the deeper handlers are reached
            good[i] = parts[i]
        path = shape.format(*(requests.utils.quote(p, safe="") for p in good))
        check_response(session.get(base(srv) + path, params=params, timeout=30))

    run()
    assert_running(srv)
    assert_no_traceback(srv, log0)
    print(f"wado-rs: {budget.examples} examples")
