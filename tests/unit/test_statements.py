"""The conformance statements stay tied to the code: every test they cite exists, and they name this version.

Each claim in ``conformance/*.md`` cites the test that shows it as
``tests/path.py::test_name`` (or ``tests/path.py::TestClass::test_name``).  A
renamed or deleted test would leave a claim without evidence, so this module
parses every such reference and checks that the file exists and defines that
function or class (with the AST: nothing is imported or run).  Each statement
also carries a date and the version of ``xdsi/__init__.py``, so a release
without an updated statement fails here.
"""

from __future__ import annotations

import ast
import re
from functools import lru_cache
from pathlib import Path

import pytest

import xdsi

ROOT = Path(__file__).resolve().parents[2]
STATEMENTS = sorted((ROOT / "conformance").glob("*.md"))
REFERENCE = re.compile(r"(tests/[\w/]+\.py)((?:::\w+)+)")


@lru_cache(maxsize=None)
def _defined(path: Path) -> dict[str, set[str]]:
    """Top-level function and class names of a test module, each class with its methods."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    out: dict[str, set[str]] = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out[node.name] = set()
        elif isinstance(node, ast.ClassDef):
            out[node.name] = {n.name for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    return out


def _references() -> list[tuple[str, str, str]]:
    refs = []
    for md in STATEMENTS:
        for m in REFERENCE.finditer(md.read_text(encoding="utf-8")):
            refs.append((md.name, m.group(1), m.group(2)))
    return refs


def test_there_are_statements_and_each_cites_tests() -> None:
    names = {p.name for p in STATEMENTS}
    assert {"ihe-integration-statement.md", "dicom-conformance-statement.md"} <= names
    cited = {md for md, _, _ in _references()}
    assert cited == names, f"statements citing no test: {sorted(names - cited)}"


@pytest.mark.parametrize("md,path,names", _references(), ids=lambda v: str(v))
def test_every_cited_test_exists(md: str, path: str, names: str) -> None:
    file = ROOT / path
    assert file.is_file(), f"{md} cites {path}{names}: no such file"
    parts = names.strip(":").split("::")
    defined = _defined(file)
    assert parts[0] in defined, f"{md} cites {path}{names}: {parts[0]} is not defined in {path}"
    if len(parts) == 2:
        assert parts[1] in defined[parts[0]], f"{md} cites {path}{names}: {parts[0]} has no {parts[1]}"
    assert len(parts) <= 2, f"{md}: {path}{names} is not a test reference"


@pytest.mark.parametrize("md", STATEMENTS, ids=lambda p: p.name)
def test_statement_carries_the_version_and_a_date(md: Path) -> None:
    text = md.read_text(encoding="utf-8")
    versions = re.findall(r"Version:\**\s*`?([0-9][\w.+-]*)", text)
    assert versions, f"{md.name} names no version"
    assert set(versions) == {xdsi.__version__}, f"{md.name} says version {versions}, xdsi is {xdsi.__version__}"
    assert re.search(r"Date:\**\s*20\d\d-[01]\d-[0-3]\d\b", text), f"{md.name} carries no date (Date: YYYY-MM-DD)"


def test_a_reference_to_a_missing_test_would_be_caught(tmp_path: Path) -> None:
    """The checker itself can fail: a reference to a name the module does not define is reported."""
    mod = tmp_path / "test_x.py"
    mod.write_text("def test_a():\n    pass\n\nclass TestB:\n    def test_c(self):\n        pass\n", encoding="utf-8")
    defined = _defined(mod)
    assert "test_a" in defined and "test_c" in defined["TestB"]
    assert "test_renamed" not in defined and "test_d" not in defined["TestB"]
    m = REFERENCE.search("see `tests/unit/test_x.py::TestB::test_c`.")
    assert m is not None and m.group(1) == "tests/unit/test_x.py" and m.group(2) == "::TestB::test_c"


def test_implementation_uids_named_in_the_dicom_statement_are_the_installed_ones() -> None:
    """The literal UIDs and version name the statement gives change with pynetdicom/pydicom: an upgrade must update it."""
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID
    from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

    text = (ROOT / "conformance" / "dicom-conformance-statement.md").read_text(encoding="utf-8")
    for value in (PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION, PYDICOM_IMPLEMENTATION_UID):
        assert f"`{value}`" in text, f"dicom-conformance-statement.md does not name the installed {value}"
