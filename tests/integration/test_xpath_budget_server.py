"""Against a running ``xdsi serve``: XPath time, size and count budgets answer with RegistryErrors, never a hung thread.

A document with a 2,000-item sequence (~14,600 model nodes) makes ``count(//*/following::*)`` run for
minutes in-process although the static guard lets it through: only the worker budget stops it.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import psutil
import pytest
from pydicom import Dataset, dcmread
from pydicom.sequence import Sequence

from tests.support.ids import NIST_REPOSITORY, OUR_WSDL, exchange, make_wado_study, populate, registry_errors, status_of, zeep_client
from tests.support.server import XdsiProcess
from xdsi.uids import new_uid
from xdsi.standards.constants import ACTION_INFORMATION, NS_WADO, STATUS_FAILURE, STATUS_PARTIAL_SUCCESS, STATUS_SUCCESS

OP = "ImagingDocumentSource_RetrieveImagingDocumentSetInformation"
BOMB_61 = "count(/*/*[0 * /*/*[0 * /*/*[0 * /*/*[0 * /*/*[0 * /*/*]]]]])"
SLOW = "count(//*/following::*)"  # passes the static guard; minutes on the big document
BUDGET = 1.0
MARGIN = 4.0


def _big_copy(src: Path, out: Path) -> tuple[str, str, Path]:
    ds = dcmread(src)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = new_uid()
    items = []
    for i in range(2000):
        it = Dataset()
        it.CodeValue, it.CodingSchemeDesignator, it.CodeMeaning = str(i), "99X", f"m{i}"
        items.append(it)
    ds.ProcedureCodeSequence = Sequence(items)
    ds.save_as(out, enforce_file_format=True)
    return ds.SeriesInstanceUID, ds.SOPInstanceUID, out


def _start(tmp: Path, limits: str) -> tuple[XdsiProcess, Any, tuple[str, str, Path], tuple[str, str, Path]]:
    w = make_wado_study(tmp / "w")
    big = _big_copy(w.image[2], tmp / "big.dcm")
    populate(tmp / "data", [*w.study.files, big[2]])
    cfg = tmp / "xdsi.toml"
    cfg.write_text(f"[limits]\n{limits}\n")
    proc = XdsiProcess(tmp / "data", config=cfg, env={"XDSI_REPOSITORY_UNIQUE_ID": NIST_REPOSITORY}).start()
    return proc, w, w.image, big


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[XdsiProcess, Any, tuple[str, str, Path], tuple[str, str, Path]]]:
    s = _start(tmp_path_factory.mktemp("xb"), f"xpath_seconds = {BUDGET}\nxpath_workers = 1\nxpath_per_request = 20\nxpath_response_bytes = 200000")
    try:
        yield s
    finally:
        s[0].stop()


def ask(proc: XdsiProcess, study: str, docs: list[tuple[tuple[str, str, Path], list[str]]]) -> Any:
    client, service = zeep_client(OUR_WSDL, f"http://127.0.0.1:{proc.http_port}/xdsi/ImagingDocumentSource")
    series: dict[str, list[dict[str, Any]]] = {}
    for (s, sop, _f), xpaths in docs:
        series.setdefault(s, []).append({"RepositoryUniqueId": NIST_REPOSITORY, "DocumentUniqueId": sop, "XPath": xpaths})
    return exchange(
        client, service, OP, "ours", ACTION_INFORMATION,
        StudyRequest=[{"studyInstanceUID": study, "SeriesRequest": [{"seriesInstanceUID": s, "DocumentRequest": d} for s, d in series.items()]}],
    )


def answers(resp: Any) -> list[list[Any]]:
    return [[x.text for x in d.iter(f"{{{NS_WADO}}}XPathResponse")] for d in resp.body.iter(f"{{{NS_WADO}}}DocumentInformationResponse")]


def _children(proc: XdsiProcess) -> list[psutil.Process]:
    assert proc.proc is not None
    return psutil.Process(proc.proc.pid).children(recursive=True)


def _xpath_workers(proc: XdsiProcess) -> list[psutil.Process]:
    """The XPath pool's processes (not the resource tracker, nor the server's own workers with ``--workers N``)."""
    return [k for k in _children(proc) if "spawn_main" in " ".join(k.cmdline())]


def test_issue_bomb_refused_quickly(server: Any) -> None:
    proc, w, image, _big = server
    t0 = time.monotonic()
    resp = ask(proc, w.study.uid, [(image, [BOMB_61])])
    assert time.monotonic() - t0 < BUDGET + MARGIN
    assert status_of(resp.body) == STATUS_FAILURE
    assert [e["errorCode"] for e in registry_errors(resp.body)] == ["urn:dicom:wado:0012"]


def test_slow_xpath_hits_the_budget_and_the_worker_is_replaced(server: Any) -> None:
    proc, w, image, big = server
    t0 = time.monotonic()
    resp = ask(proc, w.study.uid, [(big, [SLOW]), (image, ["count(/NativeDicomModel/DicomAttribute) > 10"])])
    took = time.monotonic() - t0
    assert took < BUDGET + MARGIN, took
    assert status_of(resp.body) == STATUS_PARTIAL_SUCCESS
    errs = registry_errors(resp.body)
    assert [(e["errorCode"], e["location"]) for e in errs] == [("urn:dicom:wado:0005", big[1])]
    assert "budget" in errs[0]["codeContext"]
    assert answers(resp) == [["true"]]  # the next document was evaluated by a fresh worker
    # and a normal request on the big document right after succeeds
    resp = ask(proc, w.study.uid, [(big, ['count(/NativeDicomModel/DicomAttribute[@keyword="ProcedureCodeSequence"]/Item)'])])
    assert status_of(resp.body) == STATUS_SUCCESS and answers(resp) == [["2000"]]
    pools = Counter(k.ppid() for k in _xpath_workers(proc))  # one XPath pool per server process (per worker with --workers N)
    assert pools and set(pools.values()) == {1}, pools  # xpath_workers = 1: the killed one is gone, its replacement serves


def test_response_and_count_budgets(server: Any) -> None:
    proc, w, image, big = server
    resp = ask(proc, w.study.uid, [(image, ["/NativeDicomModel"]), (big, ["/NativeDicomModel"])])  # big: ~700 KB > 200 KB
    assert status_of(resp.body) == STATUS_PARTIAL_SUCCESS
    assert [(e["errorCode"], e["location"]) for e in registry_errors(resp.body)] == [("urn:dicom:wado:0005", big[1])]
    assert len(resp.http.content) < 200_000 + 20_000
    resp = ask(proc, w.study.uid, [(image, ["count(/*)"] * 11), (big, ["count(/*)"] * 10)])  # 21 > xpath_per_request
    assert status_of(resp.body) == STATUS_FAILURE
    assert {e["errorCode"] for e in registry_errors(resp.body)} == {"urn:dicom:wado:0005"}


def test_sigterm_during_evaluation_exits_promptly_without_leftovers(tmp_path: Path) -> None:
    proc, w, _image, big = _start(tmp_path, "xpath_seconds = 120\nxpath_workers = 1")
    try:
        errors: list[BaseException] = []

        def call() -> None:
            try:
                ask(proc, w.study.uid, [(big, [SLOW])])
            except BaseException as exc:  # noqa: BLE001  (the connection may drop at stop)
                errors.append(exc)

        t = threading.Thread(target=call, daemon=True)
        t.start()
        deadline = time.monotonic() + 30
        kids: list[psutil.Process] = []
        while time.monotonic() < deadline:
            kids = [k for k in _xpath_workers(proc) if k.cpu_percent(0.2) > 20]
            if kids:
                break
        assert kids, "no busy XPath worker appeared"
        everyone = _children(proc)
        t0 = time.monotonic()
        rc = proc.stop(timeout=30)
        took = time.monotonic() - t0
        assert took < 10, took
        assert rc == 0
        time.sleep(0.5)
        left = [k for k in everyone if k.is_running() and k.status() != psutil.STATUS_ZOMBIE]
        assert not left, left
    finally:
        proc.stop()
