"""The HTTP server for ``xdsi serve``: cheroot, a production threaded WSGI server, in-process.

Why not werkzeug's development server: it is documented as unfit for
production.  Why not a pre-fork server (gunicorn's sync worker): it kills a
worker at its timeout, mid-body, and RAD-69 and WADO-RS responses of whole
studies stream for as long as they need.  cheroot runs a thread per request,
sets TCP_NODELAY, imposes no request-body limit (large STOW-RS and MTOM
requests), and streams iterables with chunked transfer encoding.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable

from cheroot import wsgi

log = logging.getLogger(__name__)

THREADS = 32  # concurrent requests; each long download holds one
IO_TIMEOUT = 300.0  # seconds a client may stall reading or sending before its connection is dropped


class HttpServer:
    def __init__(self, host: str, port: int, app: Callable[..., Any], threads: int = THREADS) -> None:
        self.server = wsgi.Server((host, port), app, numthreads=threads, server_name=host, request_queue_size=64, timeout=IO_TIMEOUT, shutdown_timeout=5)
        self.server.max_request_body_size = 0  # unlimited: STOW-RS bodies and MTOM requests spool to disk
        self.server.max_request_header_size = 64 * 1024
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.server.prepare()  # binds now, so a busy port fails at start, not later in a thread
        self._thread = threading.Thread(target=self.server.serve, name="http", daemon=True)
        self._thread.start()

    @property
    def server_port(self) -> int:
        return int(self.server.bind_addr[1])

    def shutdown(self) -> None:
        self.server.stop()
        if self._thread is not None:
            self._thread.join(timeout=10)
