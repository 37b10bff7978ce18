"""XPath evaluation is bounded by a time budget (worker killed and replaced), a result-size budget and counts.

The expressions are the issue-9 CPU bombs (``count(/*/*[0 * /*/*[...]])``: 41 s of CPU at four levels
on pydicom's CT_small in-process, hours at six) and fuzzed nestings of the same shapes.  The pool
evaluates what it is given (the static guard runs before it, in the service), so these tests prove
the budget holds even for expressions the guard would let through.
"""

from __future__ import annotations

import random
import threading
import time
from typing import Iterator

import psutil
import pytest
from lxml import etree
from pydicom import dcmread
from pydicom.data import get_testdata_file

from xdsi.archive.native_xml import to_native_xml
from xdsi.config import ConfigError, LimitsSettings, load_settings
from xdsi.ids.xpath import XPathRefused, check
from xdsi.ids.xpath_pool import XPathBudgetExceeded, XPathPool, XPathPoolBusy, XPathWorkerFailed

BUDGET = 1.0
MARGIN = 3.0  # process kill + join + a loaded 2-core CI machine


def bomb(levels: int, op: str = "0 *") -> str:
    e = "/*/*"
    for _ in range(levels - 1):
        e = f"/*/*[{op} {e}]"
    return f"count({e})"


BOMB_61 = "count(/*/*[0 * /*/*[0 * /*/*[0 * /*/*[0 * /*/*[0 * /*/*]]]]])"


def fuzzed(seed: int) -> str:
    """A random nesting of the shapes that blow up: absolute or parent-relative rescans joined by operators."""
    rng = random.Random(seed)
    e = rng.choice(["/*/*", "../*", "//*"])
    for _ in range(rng.randint(4, 7)):
        step = rng.choice(["/*/*", "/*/*/..", "../*", "/*//*", "//*/.."])
        op = rng.choice(["0 *", "0 div", "1 = 0 and", "-", "0 mod", "count(/*) >"])
        e = f"{step}[{op} {e}]"
    return f"count({e})"


@pytest.fixture(scope="module")
def xml() -> bytes:
    ds = dcmread(get_testdata_file("CT_small.dcm"), stop_before_pixels=True)
    return etree.tostring(to_native_xml(ds, namespace=None))


@pytest.fixture(scope="module")
def pool() -> Iterator[XPathPool]:
    p = XPathPool(LimitsSettings(xpath_seconds=BUDGET, xpath_workers=2))
    try:
        yield p
    finally:
        p.stop()


def test_issue_bomb_is_exactly_the_reported_expression() -> None:
    assert bomb(6) == BOMB_61 and len(BOMB_61) == 61


@pytest.mark.parametrize("expr", [BOMB_61, bomb(4), bomb(8), bomb(12), bomb(5, "0 -"), "count(/*/*[../*[../*[../*[../*[../*]]]]])"])
def test_bomb_is_killed_within_budget(pool: XPathPool, xml: bytes, expr: str) -> None:
    cpu0 = psutil.Process().cpu_times()
    t0 = time.monotonic()
    with pytest.raises(XPathBudgetExceeded, match="exceeded its 1 s budget"):
        pool.evaluate(xml, [expr], seconds=BUDGET, max_bytes=1 << 20, wait=5)
    assert time.monotonic() - t0 < BUDGET + MARGIN
    cpu1 = psutil.Process().cpu_times()
    assert (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system) < 0.5  # the cost was the worker's, not ours


@pytest.mark.parametrize("seed", range(6))
def test_fuzzed_nestings_end_within_budget(pool: XPathPool, xml: bytes, seed: int) -> None:
    expr = fuzzed(seed)
    t0 = time.monotonic()
    try:
        out = pool.evaluate(xml, [expr], seconds=BUDGET, max_bytes=1 << 20, wait=5)
        assert out.kind in ("ok", "refused"), out
    except XPathBudgetExceeded:
        pass
    assert time.monotonic() - t0 < BUDGET + MARGIN, expr
    # and the static guard, the first filter, refuses every one of them outright
    with pytest.raises(XPathRefused):
        check(expr)


@pytest.mark.parametrize("expr", [BOMB_61, bomb(4), bomb(9), bomb(5, "0 mod"), "count(/*/*[../*[../*]])", "count(/*/*[1 * /*])"])
def test_static_guard_refuses_the_issue_forms(expr: str) -> None:
    with pytest.raises(XPathRefused):
        check(expr)


@pytest.mark.parametrize(
    "expr",
    [
        '/NativeDicomModel/DicomAttribute[@keyword="PatientName"]/PersonName[@number=1]/Alphabetic/FamilyName',
        '/NativeDicomModel/DicomAttribute[@keyword="Rows"]/Value[../@vr = "US"]',  # one parent step is fine
        "count(/*/*[2 * count(*) > 1])",  # multiplication with relative operands
        "count(/*/*[0 * */Value])",  # name-test star after the operator
    ],
)
def test_static_guard_keeps_ordinary_expressions(expr: str) -> None:
    assert check(expr) == expr


def test_killed_worker_is_replaced_and_normal_xpath_works(pool: XPathPool, xml: bytes) -> None:
    ds = dcmread(get_testdata_file("CT_small.dcm"), stop_before_pixels=True)
    before = set(pool.pids())
    with pytest.raises(XPathBudgetExceeded):
        pool.evaluate(xml, [bomb(6)], seconds=BUDGET, max_bytes=1 << 20, wait=5)
    dead = before - set(pool.pids())
    out = pool.evaluate(
        xml,
        ['string(/NativeDicomModel/DicomAttribute[@keyword="PatientID"]/Value)', "count(/NativeDicomModel/DicomAttribute)", '/NativeDicomModel/DicomAttribute[@keyword="Rows"]'],
        seconds=BUDGET,
        max_bytes=1 << 20,
        wait=5,
    )
    assert out.kind == "ok"
    (pid_text, _), (count_text, _), (_, (rows_el,)) = out.results
    assert pid_text == ds.PatientID
    assert int(count_text) == len([e for e in [*ds.file_meta, *ds] if e.tag.element != 0])  # no group lengths in the model
    rows = etree.fromstring(rows_el)
    assert rows.get("tag") == "00280010" and rows.find("{*}Value").text == str(ds.Rows)
    for pid in dead:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_result_size_budget(pool: XPathPool, xml: bytes) -> None:
    out = pool.evaluate(xml, ["/NativeDicomModel"], seconds=BUDGET, max_bytes=2000, wait=5)
    assert out.kind == "too_large" and "2000" in out.message
    # the budget is over all the document's expressions together
    small = '/NativeDicomModel/DicomAttribute[@keyword="Modality"]'
    one = pool.evaluate(xml, [small], seconds=BUDGET, max_bytes=1 << 20, wait=5)
    size = sum(len(b) for b in one.results[0][1])
    assert pool.evaluate(xml, [small] * 3, seconds=BUDGET, max_bytes=3 * size, wait=5).kind == "ok"
    assert pool.evaluate(xml, [small] * 4, seconds=BUDGET, max_bytes=3 * size, wait=5).kind == "too_large"


def test_syntax_and_unknown_functions_are_refused_by_the_worker(pool: XPathPool, xml: bytes) -> None:
    for expr in ["/NativeDicomModel[", 're:test(//Value, "x")', "document('file:///etc/passwd')"]:
        assert pool.evaluate(xml, [expr], seconds=BUDGET, max_bytes=1 << 20, wait=5).kind == "refused"


def test_concurrency_is_bounded_and_stop_ends_everything(xml: bytes) -> None:
    p = XPathPool(LimitsSettings(xpath_seconds=30, xpath_workers=1))
    me = psutil.Process()
    errors: list[BaseException] = []

    def long_one() -> None:
        try:
            p.evaluate(xml, [bomb(6)], seconds=30, max_bytes=1 << 20, wait=5)
        except BaseException as exc:  # noqa: BLE001  (collected for the assertion below)
            errors.append(exc)

    t = threading.Thread(target=long_one)
    t.start()
    deadline = time.monotonic() + 20
    while not p.pids() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    (pid,) = p.pids()
    assert pid in [c.pid for c in me.children()]  # a child of this process
    t0 = time.monotonic()
    with pytest.raises(XPathPoolBusy):
        p.evaluate(xml, ["count(/*)"], seconds=1, max_bytes=1000, wait=0.3)
    assert time.monotonic() - t0 < 2
    t0 = time.monotonic()
    p.stop()
    t.join(5)
    assert not t.is_alive() and time.monotonic() - t0 < 5  # the waiting thread is answered at once
    assert len(errors) == 1 and isinstance(errors[0], XPathWorkerFailed)
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    with pytest.raises(XPathWorkerFailed):
        p.evaluate(xml, ["count(/*)"], seconds=1, max_bytes=1000, wait=1)


def test_limits_from_config(tmp_path) -> None:  # type: ignore[no-untyped-def]
    cfg = tmp_path / "x.toml"
    cfg.write_text('[limits]\nxpath_seconds = 0.5\nxpath_workers = 3\nxpath_response_bytes = "2 MiB"\nxpath_per_request = 10\n')
    s = load_settings(cfg, env={})
    assert s.limits == LimitsSettings(xpath_seconds=0.5, xpath_workers=3, xpath_response_bytes=2 * 1024 * 1024, xpath_per_request=10)
    for bad in ["xpath_seconds = 0", "xpath_workers = 0", 'xpath_result_bytes = "lots"', "xpath_bogus = 1"]:
        cfg.write_text(f"[limits]\n{bad}\n")
        with pytest.raises(ConfigError, match=r"\[limits\]"):
            load_settings(cfg, env={})
