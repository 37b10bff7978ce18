"""Fuzzing XPath expressions of RetrieveImagingDocumentSetInformation against the in-process service.

Generated expressions nest predicates, ``..`` and absolute rescans, ``*``
as both name test and operator, unions and XPath functions (the shapes of
issue 9's 61-character CPU bomb and wider), sometimes syntactically broken.
Each request runs through :func:`xdsi.ids.information.retrieve_information`
with a small ``[limits]`` budget and must be answered -- documents or
RegistryErrors, never an exception -- within the request budget plus a
margin for killing and replacing a worker; our own process must not pay
the CPU, and the worker pool must still answer a simple expression after.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

import psutil
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydicom import dcmread

from tests.conftest import make_settings
from tests.fuzz.fuzzing import Budget
from xdsi.archive import Archive
from xdsi.config import LimitsSettings
from xdsi.ids import DocumentRequest, ImagingDocumentSource
from xdsi.ids.information import InformationRequest, retrieve_information
from xdsi.ids.xpath_pool import XPathPool
from xdsi.tools.synth import StudySpec, write_study

pytestmark = [pytest.mark.timeout(120), pytest.mark.filterwarnings("ignore:Generating overly large repr")]

REPO = "1.2.3.4.5"
LIMITS = LimitsSettings(xpath_seconds=0.5, xpath_request_seconds=1.5, xpath_workers=2, xpath_max_length=512)
MARGIN = 3.0  # kill + join + respawn of a worker on a loaded 2-core CI machine


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ImagingDocumentSource, DocumentRequest, XPathPool]]:
    tmp = tmp_path_factory.mktemp("fuzzxpath")
    archive = Archive.open(make_settings(tmp))
    pool = XPathPool(LIMITS)
    try:
        files = write_study(tmp / "in", StudySpec(), series=1, per_series=1, rows=8, columns=8)
        assert archive.store.store_file(files[0]).ok
        ds = dcmread(files[0], stop_before_pixels=True)
        yield ImagingDocumentSource(archive.retrieve, REPO), DocumentRequest(ds.StudyInstanceUID, ds.SeriesInstanceUID, REPO, ds.SOPInstanceUID), pool
    finally:
        pool.stop()
        archive.close()


LEAVES = ["/*/*", "//*", "..", ".", "*", "@*", "/NativeDicomModel/DicomAttribute", "text()", "node()", "'a'", "0", "1",
          "DicomAttribute[@tag='00100010']/Value", "/*", "../*", "//*/..", "@tag", "PersonName/Alphabetic/FamilyName"]  # fmt: skip
OPS = ["*", "div", "mod", "and", "or", "=", "!=", "<", ">=", "+", "-", "|"]
FUNCS = ["count", "string", "sum", "not", "boolean", "string-length", "normalize-space", "number", "name", "local-name", "last", "position"]


def expressions() -> st.SearchStrategy[str]:
    def extend(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
        return st.one_of(
            st.builds(lambda a, b: f"{a}[{b}]", inner, inner),
            st.builds(lambda a, b: f"{a}/{b}", inner, inner),
            st.builds(lambda a, b: f"{a}//{b}", inner, inner),
            st.builds(lambda a, op, b: f"{a} {op} {b}", inner, st.sampled_from(OPS), inner),
            st.builds(lambda f, a: f"{f}({a})", st.sampled_from(FUNCS), inner),
            st.builds(lambda a, b: f"concat({a}, {b})", inner, inner),
            st.builds(lambda a: f"substring({a}, 1, 2)", inner),
            st.builds(lambda a: f"({a})", inner),
            st.builds(lambda a, b: f"/*/*[0 * {a}][{b}]", inner, inner),
        )

    broken = st.builds(lambda e, cut: e[:cut], st.recursive(st.sampled_from(LEAVES), extend, max_leaves=6), st.integers(0, 60))
    return st.one_of(st.recursive(st.sampled_from(LEAVES), extend, max_leaves=12), broken, st.text(max_size=30))


@pytest.mark.parametrize("expr", ["\x1b", "count(/*)\x00", "DicomAttribute[@tag='\x07']"])
def test_control_characters_are_refused_not_raised(service: tuple[ImagingDocumentSource, DocumentRequest, XPathPool], expr: str) -> None:
    """Found by the fuzzer: lxml raises ValueError (not XPathSyntaxError) for control characters, which escaped as a crash."""
    ids, doc, pool = service
    result = retrieve_information(ids, [InformationRequest(doc, (expr,))], LIMITS, pool)
    assert not result.documents and [e.error_code for e in result.errors] == ["urn:dicom:wado:0012"], result.errors


def test_fuzzed_xpath_is_answered_within_budget(service: tuple[ImagingDocumentSource, DocumentRequest, XPathPool]) -> None:
    ids, doc, pool = service
    budget = Budget(12)
    me = psutil.Process()
    seen = {"answered": 0, "errors": 0, "slowest": 0.0}

    @given(exprs=st.lists(expressions(), min_size=1, max_size=3))
    def run(exprs: list[str]) -> None:
        if budget.spent():
            return
        cpu0 = me.cpu_times()
        t0 = time.monotonic()
        result = retrieve_information(ids, [InformationRequest(doc, tuple(exprs))], LIMITS, pool)
        took = time.monotonic() - t0
        cpu1 = me.cpu_times()
        seen["slowest"] = max(seen["slowest"], took)
        assert took < LIMITS.xpath_request_seconds + MARGIN, (exprs, took)
        assert (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system) < 1.0, exprs  # the evaluation's CPU is the worker's
        assert bool(result.documents) != bool(result.errors), (exprs, result)  # one document: answered or refused
        seen["answered" if result.documents else "errors"] += 1

    run()
    result = retrieve_information(ids, [InformationRequest(doc, ("DicomAttribute[@keyword='PatientID']/Value",))], LIMITS, pool)
    assert result.documents and not result.errors, result.errors
    print(f"xpath: {budget.examples} examples, {seen}")
