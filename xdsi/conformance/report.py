"""Results of a conformance run: the pass/fail table for a terminal and JUnit XML for CI.

JUnit is what CI servers and Gazelle-style dashboards read; each case is a
``testcase`` (classname = group), a FAIL a ``failure`` with every finding, a
SKIP a ``skipped``, warnings and notes in ``system-out``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from lxml import etree

from xdsi.conformance.cases import Case
from xdsi.conformance.runner import FAIL, WARN, Finding

PASS, FAILED, SKIP, ERROR = "PASS", "FAIL", "SKIP", "ERROR"


@dataclass
class CaseResult:
    case: Case
    outcome: str  # PASS, FAIL, SKIP, or ERROR (the tool could not run the case)
    findings: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def warnings(self) -> list[str]:
        return [f.text for f in self.findings if f.level == WARN]

    @property
    def failures(self) -> list[str]:
        return [f.text for f in self.findings if f.level == FAIL]


def failed(results: list[CaseResult]) -> bool:
    """A run fails on any FAIL or ERROR; SKIPs and warnings do not fail it."""
    return any(r.outcome in (FAILED, ERROR) for r in results)


def print_table(results: list[CaseResult], out: TextIO, *, header: str = "") -> None:
    if header:
        print(header, file=out)
    width = max((len(r.case.id) for r in results), default=10)
    print(f"{'case':<{width}}  result  secs  reference / findings", file=out)
    print("-" * (width + 60), file=out)
    for r in results:
        print(f"{r.case.id:<{width}}  {r.outcome:<6}  {r.seconds:4.1f}  {r.case.ref}", file=out)
        for text in r.failures:
            print(f"{'':<{width}}  - {text}", file=out)
        for text in r.warnings:
            print(f"{'':<{width}}  ~ warning: {text}", file=out)
        if r.outcome in (SKIP, ERROR):
            for n in r.notes:
                print(f"{'':<{width}}  ({n})", file=out)
    counts = {k: sum(r.outcome == k for r in results) for k in (PASS, FAILED, SKIP, ERROR)}
    warns = sum(len(r.warnings) for r in results)
    print("-" * (width + 60), file=out)
    print(", ".join(f"{v} {k.lower()}" for k, v in counts.items()) + f", {warns} warning(s)", file=out)


def write_junit(results: list[CaseResult], path: Path, *, name: str = "xdsi conformance", properties: dict[str, str] | None = None) -> None:
    suite = etree.Element(
        "testsuite",
        name=name,
        tests=str(len(results)),
        failures=str(sum(r.outcome == FAILED for r in results)),
        errors=str(sum(r.outcome == ERROR for r in results)),
        skipped=str(sum(r.outcome == SKIP for r in results)),
        time=f"{sum(r.seconds for r in results):.3f}",
    )
    if properties:
        props = etree.SubElement(suite, "properties")
        for k, v in properties.items():
            etree.SubElement(props, "property", name=k, value=v)
    for r in results:
        tc = etree.SubElement(suite, "testcase", classname=r.case.group, name=r.case.id, time=f"{r.seconds:.3f}")
        if r.outcome == FAILED:
            f = etree.SubElement(tc, "failure", message=r.failures[0] if r.failures else "failed", type="nonconformance")
            f.text = "\n".join(r.failures)
        elif r.outcome == ERROR:
            e = etree.SubElement(tc, "error", message=(r.notes or ["error"])[-1])
            e.text = "\n".join(r.notes)
        elif r.outcome == SKIP:
            etree.SubElement(tc, "skipped", message=(r.notes or ["skipped"])[-1])
        out = [f"{r.case.title} [{r.case.ref}]"] + [f"warning: {w}" for w in r.warnings] + r.notes
        etree.SubElement(tc, "system-out").text = "\n".join(out)
    tree = etree.ElementTree(etree.Element("testsuites"))
    tree.getroot().append(suite)
    path.write_bytes(etree.tostring(tree, xml_declaration=True, encoding="UTF-8", pretty_print=True))
