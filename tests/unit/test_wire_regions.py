"""``xdsi.wire.regions`` bodies through the real HTTP server: file ranges go out by sendfile (plain HTTP), byte-exact.

The server is :class:`xdsi.web.httpd.HttpServer` on 127.0.0.1 with a small WSGI
application; each test checks what a client receives against the file's own
bytes, with and without a Content-Length, and what happens when a file is
shorter than the response announced (the connection is cut: never a short
answer that looks complete).
"""

from __future__ import annotations

import http.client
import os
import socket
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from xdsi.config import HttpLimits
from xdsi.web.httpd import HttpServer
from xdsi.wire.regions import FileChunks, FileRegion, RegionBody, RegionError, item_length


class App:
    """Answers every request with the body ``make()`` builds; records closes and completed regions."""

    def __init__(self) -> None:
        self.make: Callable[[], tuple[RegionBody, bool]] = lambda: (RegionBody([b"x"]), True)
        self.events: list[str] = []

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        body, sized = self.make()
        headers = [("Content-Type", "application/octet-stream")]
        if sized:
            headers.append(("Content-Length", str(body.length)))
        start_response("200 OK", headers)
        return body


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[HttpServer, App]]:
    app = App()
    server = HttpServer("127.0.0.1", 0, app, HttpLimits())
    server.start()
    try:
        yield server, app
    finally:
        server.shutdown()


@pytest.fixture(scope="module")
def blob(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    data = os.urandom(3 * 1024 * 1024 + 17)
    p = tmp_path_factory.mktemp("regions") / "blob.bin"
    p.write_bytes(data)
    return p, data


def _body(app: App, items: list[Any], sized: bool) -> None:
    def make() -> tuple[RegionBody, bool]:
        body = RegionBody(items, length=sum(item_length(i) for i in items), on_close=[lambda: app.events.append("close")])
        return body, sized

    app.make = make
    app.events.clear()


def _get(server: HttpServer) -> tuple[http.client.HTTPResponse, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.server_port, timeout=10)
    conn.request("GET", "/")
    r = conn.getresponse()
    return r, r.read()


@pytest.mark.parametrize("sized", [True, False], ids=["content-length", "chunked"])
def test_file_ranges_and_bytes_arrive_exactly_in_order(served: tuple[HttpServer, App], blob: tuple[Path, bytes], sized: bool) -> None:
    server, app = served
    path, data = blob
    items = [
        b"--head one--\r\n",
        FileRegion(path, 0, len(data), lambda: app.events.append("sent whole")),
        b"\r\n--head two--\r\n",
        FileRegion(path, 1000, 5000, lambda: app.events.append("sent range")),
        FileRegion(path, 7, 0),
        b"--end--",
    ]
    _body(app, items, sized)
    r, got = _get(server)
    assert r.status == 200
    assert (r.getheader("Content-Length") is not None) == sized
    assert (r.getheader("Transfer-Encoding") == "chunked") == (not sized)
    assert got == b"--head one--\r\n" + data + b"\r\n--head two--\r\n" + data[1000:6000] + b"--end--"
    assert app.events == ["sent whole", "sent range", "close"]


def test_a_file_shorter_than_announced_cuts_the_connection(served: tuple[HttpServer, App], tmp_path: Path) -> None:
    server, app = served
    short = tmp_path / "short.bin"
    short.write_bytes(b"a" * 100_000)
    _body(app, [b"head", FileRegion(short, 0, 200_000, lambda: app.events.append("sent"))], True)
    with pytest.raises((http.client.IncompleteRead, ConnectionError, socket.timeout)):
        _get(server)
    assert "sent" not in app.events  # never counted (audited) as sent
    assert "close" in app.events


def test_iterated_body_reads_files_and_closes_once(blob: tuple[Path, bytes]) -> None:
    """The copy path (TLS, other servers): a plain WSGI iterable with the same bytes and callbacks."""
    path, data = blob
    events: list[str] = []
    body = RegionBody([b"a", FileRegion(path, 10, 2_000_000, lambda: events.append("after"))], on_close=[lambda: events.append("close")])
    assert b"".join(body) == b"a" + data[10:2_000_010]
    body.close()
    body.close()
    assert events == ["after", "close"]


def test_short_file_raises_on_the_copy_path(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"12345")
    with pytest.raises(RegionError):
        b"".join(FileRegion(p, 0, 10).chunks())


def test_file_chunks_runs_its_callbacks_once_sent_whole(blob: tuple[Path, bytes]) -> None:
    path, data = blob
    events: list[str] = []
    fc = FileChunks(path, len(data), [lambda: events.append("first")]).then(lambda: events.append("audit"))
    assert b"".join(fc()) == data
    assert events == ["first", "audit"]
    region = fc.region()
    assert (region.path, region.offset, region.length) == (path, 0, len(data))
    region.after()  # type: ignore[misc]
    assert events == ["first", "audit", "first", "audit"]
