"""HTTP errors (xdsi.wire.errors) and the layering rule of xdsi.wire: nothing above it is imported."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import xdsi.wire
from xdsi.wire.errors import HttpError, MalformedBody, RequestTooLarge, header_text, warning_value
from xdsi.wire.mtom import MtomError, MtomTooLarge
from xdsi.wire.multipart import MultipartError, TooManyParts

WIRE = Path(xdsi.wire.__file__).parent
ABOVE = ("xdsi.web", "xdsi.soap", "xdsi.xds", "xdsi.archive", "xdsi.storage", "xdsi.ids", "xdsi.dimse", "xdsi.index", "xdsi.render", "xdsi.server")


def _above(module: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in ABOVE)


def test_error_statuses_and_reason() -> None:
    assert (MalformedBody("x").status, RequestTooLarge("y").status, HttpError(406, "z").status) == (400, 413, 406)
    r = HttpError(404, "no such study \u0661.2\r\nInjected: yes").response()
    assert r.status_code == 404 and r.mimetype == "text/plain"
    assert r.headers["Warning"] == '299 xdsi "no such study U+0661.2  Injected: yes"'
    assert "\n" not in r.headers["Warning"] and r.get_data() == "no such study \u0661.2  Injected: yes\n".encode()


def test_header_text_and_warning_value() -> None:
    assert header_text("a\tb\x7fc\u00e9") == "a b cU+00E9"
    assert warning_value('say "hi" \\ bye') == "299 xdsi \"say 'hi' \\\\ bye\""
    assert len(warning_value("x" * 1000)) < 220


def test_too_large_errors_are_413_and_still_format_errors() -> None:
    for exc in (TooManyParts("n"), MtomTooLarge("m")):
        assert isinstance(exc, RequestTooLarge) and exc.status == 413 and exc.reason in "nm"
    assert isinstance(TooManyParts("n"), MultipartError) and isinstance(MtomTooLarge("m"), MtomError)


def test_wire_imports_nothing_above_it() -> None:
    """Statically (every import statement) and at run time (a fresh interpreter importing every wire module)."""
    for path in WIRE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                assert not _above(name), f"{path.name} imports {name}"
    code = "import sys, xdsi.wire.media, xdsi.wire.multipart, xdsi.wire.mtom, xdsi.wire.xml, xdsi.wire.errors; print(sorted(m for m in sys.modules if m.startswith('xdsi.')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=WIRE.parent.parent).stdout
    loaded = eval(out)  # a list of module names printed by repr
    assert loaded and not [m for m in loaded if _above(m)], loaded
