"""``xdsi serve``: the DICOM and HTTP servers in one process, stopped cleanly by SIGTERM or SIGINT."""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

from xdsi.archive import Archive
from xdsi.config import Settings
from xdsi.dimse.server import DicomServer
from xdsi.web.app import make_app
from xdsi.web.httpd import HttpServer

log = logging.getLogger(__name__)


class Servers:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.archive = Archive.open(settings)
        # further AE titles (partitions): own archive each, served on the main DICOM port by called AE
        # title, and on a port of their own where a dicom_port is configured
        from xdsi.archive.partitions import Partitions

        self.partitions = Partitions.open(self.archive)
        self.dicom = DicomServer(self.archive, self.partitions.extra())
        self.partition_dicom = [
            (DicomServer(self.partitions[settings.for_partition(name).ae_title]), int(p.dicom_port))
            for name, p in settings.partitions.items()
            if p.dicom_port is not None
        ]
        self.http: Any = None
        self._stopped = threading.Event()
        self.publisher: Any = None  # XDS-I.b publisher loop (issue 4), when [xds] mode is not "off"

    def start(self) -> None:
        s = self.settings
        self.dicom.start(s.host, s.dicom_port)
        for server, port in self.partition_dicom:
            server.start(s.host, port)
        self.http = HttpServer(s.host, s.http_port, make_app(self.archive, self.partitions))
        self.http.start()
        log.info("HTTP listening on http://%s:%d/", s.host, self.http.server_port)
        if s.xds.enabled:
            from xdsi.xds.publisher import PublisherThread

            self.publisher = PublisherThread(self.archive)
            self.publisher.start()

    def stop(self) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        log.info("stopping")
        if self.publisher is not None:
            self.publisher.stop()
        if self.http is not None:
            self.http.shutdown()
        self.dicom.stop()
        for server, _port in self.partition_dicom:
            server.stop()
        self.partitions.close_extra()
        self.archive.close()


def serve(settings: Settings) -> int:
    servers = Servers(settings)
    done = threading.Event()

    def _stop(signum: int, _frame: Any) -> None:
        log.info("received %s", signal.Signals(signum).name)
        done.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    servers.start()
    print(
        f"xdsi serving AE {settings.ae_title} on dicom://{settings.host}:{servers.dicom.port} "
        f"and http://{settings.host}:{servers.http.server_port}/ (data in {settings.data_dir})",
        flush=True,
    )
    try:
        done.wait()
    finally:
        servers.stop()
    return 0
