"""An IUA Authorization Server's JWKS endpoint on loopback, for the bearer-token tests: the keys it
publishes can be changed by the test (key rotation) and it counts how often it was asked."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["JwksServer"]


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        srv: Any = self.server
        srv.hits += 1
        body = json.dumps({"keys": srv.keys}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


class JwksServer(ThreadingHTTPServer):
    """``keys``: the JWKs served (any path); ``hits``: requests so far.  Started at once; ``stop()`` when done."""

    def __init__(self, keys: list[dict[str, Any]] | None = None) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.keys: list[dict[str, Any]] = list(keys or [])
        self.hits = 0
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def url(self, path: str = "/jwks") -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
