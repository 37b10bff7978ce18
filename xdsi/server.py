"""``xdsi serve``: the DICOM and HTTP servers in one process, stopped cleanly by SIGTERM or SIGINT.

Start-up failures the operator must fix (a busy port, a data directory that cannot be
created or written) raise :class:`xdsi.startup.StartupError` naming the setting and flag;
whatever had started by then is stopped first, so the process exits rather than hangs on
pynetdicom's non-daemon threads.
"""

from __future__ import annotations

import faulthandler
import logging
import math
import signal
import socket
import threading
from pathlib import Path
from typing import Any, Callable, Mapping

from xdsi.archive import Archive
from xdsi.config import Settings
from xdsi.dimse.server import DicomServer
from xdsi.startup import StartupError, check_directories, directory_settings, listen_error, path_error
from xdsi.app import make_app
from xdsi.running import describe_listeners
from xdsi.web.httpd import HttpServer

log = logging.getLogger(__name__)


class Servers:
    """Every listener and background job of one ``xdsi serve`` process.

    ``sockets`` (listener key -> bound, listening socket; see :func:`xdsi.supervisor.listeners`) makes
    this one worker of several (``--workers N``): the supervisor bound the ports, so nothing here binds,
    removes another worker's spool files or writes ``serving.json``.  ``primary`` (worker 0, or a single
    process) runs what must run once per node: the audit sender (every worker only records into the
    shared durable spool), the XDS publisher loop, the stale spool sweep, and the Application Activity
    and configuration-change audit messages.
    """

    def __init__(
        self, settings: Settings, *, sockets: Mapping[str, socket.socket] | None = None, primary: bool = True, announce: bool = True
    ) -> None:
        """``announce``: a primary that starts the application (not one restarted by the supervisor) sends the
        Application Start and configuration-change audit messages."""
        self.settings = settings
        self.sockets = sockets
        self.primary = primary
        self.announce = announce
        check_directories(settings)
        try:
            # a worker must not remove temporary files: another worker may be writing them
            self.archive = Archive.open(settings, clean=sockets is None)
        except OSError as exc:  # raced with check_directories, or a path it does not know
            raise _blame_path(settings, exc) from None
        # further AE titles (partitions): own archive each, served on the main DICOM port by called AE
        # title, and on a port of their own where a dicom_port is configured
        from xdsi.archive.partitions import Partitions

        try:
            self.partitions = Partitions.open(self.archive, clean=sockets is None)
        except BaseException as exc:
            self.archive.close()
            if isinstance(exc, OSError):
                raise _blame_path(settings, exc) from None
            raise
        self.dicom = DicomServer(self.archive, self.partitions.extra())
        # (server, plain port or None) per partition with a port of its own; its TLS port (or None) in the parallel list
        own = [(name, p) for name, p in settings.partitions.items() if p.dicom_port is not None or p.dicom_tls_port is not None]
        self.partition_dicom = [
            (DicomServer(self.partitions[settings.for_partition(name).ae_title]), None if p.dicom_port is None else int(p.dicom_port))
            for name, p in own
        ]
        self._partition_port_names = [name for name, _p in own]
        self._partition_tls_ports = [p.dicom_tls_port for _name, p in own]
        if not primary:  # spool files older than every timeout are swept by the primary only (it cannot see ours in use)
            for server in [self.dicom, *(srv for srv, _port in self.partition_dicom)]:
                server.spool.max_age = math.inf
        self.http: Any = None
        self.https: Any = None
        # [tls] proven usable (key matches, not expired) before anything listens; None without a TLS port
        from xdsi.security.tls import check_tls

        try:
            self.tls_context = check_tls(settings)
        except BaseException:
            self.partitions.close_extra()
            self.archive.close()
            raise
        try:  # [http] auth: no anonymous service on the network unless written down; users file / JWKS loaded
            from xdsi.web.auth import check_startup

            check_startup(self.archive)
        except BaseException:
            self.partitions.close_extra()
            self.archive.close()
            raise
        self._stopped = threading.Event()
        self.publisher: Any = None  # XDS-I.b publisher loop (issue 4), when [xds] mode is not "off"
        self.hl7: Any = None  # HL7 v2 MLLP listener (issue 15), when [hl7] port is set
        self.routing: Any = None  # the routing worker (issue 15), started with the publisher
        try:
            self.audit = _audit_trail(settings, self.dicom, self.partitions)
            for server, _port in self.partition_dicom:  # partitions on DICOM ports of their own
                server.audit = self.dicom.audit
        except BaseException as exc:
            self.partitions.close_extra()
            self.archive.close()
            if isinstance(exc, OSError):
                raise _blame_path(settings, exc) from None
            raise
        if sockets is not None:
            self._share_limits()

    def _share_limits(self) -> None:
        """Limits that are promises about the node, counted across the workers (see xdsi.dimse.slots, xdsi.audit.shared_alerts)."""
        from xdsi.dimse.slots import SharedSlots

        node = self.settings.data_dir / ".workers"
        node.mkdir(parents=True, exist_ok=True)
        for server in [self.dicom, *(srv for srv, _port in self.partition_dicom)]:
            g = server.governor
            g.shared = SharedSlots(node / "dimse-slots.lock", server.ae.ae_title, g.limits, g.max_associations)
        if self.audit.enabled:
            from xdsi.audit.shared_alerts import SharedAlertLimiter

            self.audit.alerts = SharedAlertLimiter(node / "alerts.sqlite")

    def _adopted(self, key: str) -> socket.socket | None:
        return None if self.sockets is None else self.sockets[key]

    def start(self) -> None:
        s = self.settings
        if self.primary:  # first: messages spooled while a repository is down go out as soon as it answers
            self.audit.start()
        from xdsi.security import clock

        clock.install(s.data_dir)  # peers' HTTP Date readings for `xdsi status` (Consistent Time)
        # HTTP binds first: it logs nothing, so a busy port of either kind leaves stderr at one line
        if s.http_port:  # 0: no plain HTTP (a TLS-only node)
            self.http = HttpServer(s.host, s.http_port, make_app(self.archive, self.partitions), s.http_limits, sock=self._adopted("http"))
            try:
                self.http.start()
            except OSError as exc:
                raise listen_error("[server] http_port", "--http-port", s.http_port, s.host, exc) from None
        if self.tls_context is not None and s.https_port is not None:
            self.https = HttpServer(
                s.host, s.https_port, make_app(self.archive, self.partitions), s.http_limits, ssl_context=self.tls_context, sock=self._adopted("https")
            )
            if self.audit.enabled:
                self.https.server.on_tls_refused = self._tls_refused
            try:
                self.https.start()
            except OSError as exc:
                raise listen_error("[server] https_port", "--https-port", s.https_port, s.host, exc) from None
        if s.dicom_port:  # 0: no plain DICOM (a TLS-only node)
            try:
                self.dicom.start(s.host, s.dicom_port, self._adopted("dicom"))
            except OSError as exc:
                raise listen_error("[server] dicom_port", "--dicom-port", s.dicom_port, s.host, exc) from None
        if self.tls_context is not None and s.dicom_tls_port is not None:
            if self.audit.enabled:
                self.dicom.ae.on_tls_refused = self._tls_refused
            try:
                self.dicom.start_tls(s.host, s.dicom_tls_port, self.tls_context, self._adopted("dicom_tls"))
            except OSError as exc:
                raise listen_error("[server] dicom_tls_port", "--dicom-tls-port", s.dicom_tls_port, s.host, exc) from None
        for (server, port), name, tls_port in zip(self.partition_dicom, self._partition_port_names, self._partition_tls_ports):
            if port is not None:
                try:
                    server.start(s.host, port, self._adopted(f"partition:{name}:dicom"))
                except OSError as exc:
                    raise listen_error(f"[partitions.{name}] dicom_port", None, port, s.host, exc) from None
            if tls_port is not None and self.tls_context is not None:
                # the partition's own TLS port: same context (certificate, trusted CAs, profile) as the main TLS port
                if self.audit.enabled:
                    server.ae.on_tls_refused = self._tls_refused
                try:
                    server.start_tls(s.host, tls_port, self.tls_context, self._adopted(f"partition:{name}:dicom_tls"))
                except OSError as exc:
                    raise listen_error(f"[partitions.{name}] dicom_tls_port", None, tls_port, s.host, exc) from None
        if self.http is not None:
            log.info("HTTP listening on http://%s:%d/", s.host, self.http.server_port)
        if self.https is not None:
            log.info("HTTPS listening on https://%s:%d/ (TLS profile %s)", s.host, self.https.server_port, s.tls.profile)
        log.info("listeners: %s", describe_listeners(s))
        if self.sockets is None:  # a worker's supervisor writes it, once for all
            _write_running(s)
        if not self.primary:
            return
        if self.announce:
            self._application_activity(started=True)
        if self.audit.enabled and self.announce:  # Security Alert when the settings differ from the previous start's
            from xdsi.audit.configuration import configuration_changed
            from xdsi.audit import messages as m

            configuration_changed(self.audit, s, m.Participant(s.ae_title, False, network_access_point=s.host))
        if s.xds.enabled:
            _warn_identifiers(s, self.archive.settings)
            from xdsi.xds.publisher import PublisherThread

            self.publisher = PublisherThread(self.archive)
            self.publisher.start()
        if s.hl7.port:
            _start_hl7(self)
        from xdsi.routing.service import RoutingService  # [[routes]] forwards (issue 15): once per node

        self.routing = RoutingService(list(self.partitions.values()))
        self.routing.start()

    def stop(self, *, quiet: bool = False) -> None:
        """Stop whatever started; ``quiet`` after a failed start, whose one-line reason should stand alone."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        if not quiet:
            log.info("stopping")
        if self.publisher is not None:
            self.publisher.stop()
        if self.hl7 is not None:
            self.hl7.stop()
        if self.routing is not None:
            self.routing.stop()
        # XPath workers first: a request thread waiting on one is answered at once, not at its deadline
        from xdsi.ids.xpath_pool import stop_pools

        stop_pools()
        if self.http is not None:
            self.http.shutdown()
        if self.https is not None:
            self.https.shutdown()
        if self.audit.enabled:  # what the HTTP adapters handed to their audit worker, recorded before the index closes
            from xdsi.audit.http import drain

            drain(self.audit)
        self.dicom.stop()
        for server, _port in self.partition_dicom:
            server.stop()
        self.partitions.close_extra()
        self.archive.close()
        if self.sockets is None:
            _clear_running(self.settings)
        if not quiet and self.primary:
            self._application_activity(started=False)
        # the primary delivers what waits (its own Application Stop among it); the others only recorded
        self.audit.stop(**({} if self.primary else {"drain_seconds": 0}))

    def close(self) -> None:
        """Release what the constructor opened, for a process that checked the settings but never starts
        (the supervisor): no listener ran, so there is nothing to audit or wait for."""
        self.partitions.close_extra()
        self.archive.close()
        self.audit.stop(drain_seconds=0)

    def _tls_refused(self, interface: str, peer: str, reason: str) -> None:
        """A refused TLS handshake as an ATNA Security Alert (node authentication failure), off the request path."""
        from xdsi.audit import messages as m

        us = m.Participant(self.settings.ae_title, False, network_access_point=self.settings.host)
        them = m.Participant(peer, True, network_access_point=peer)
        self.audit.record(m.security_alert(self.audit.source, us, "node_authentication", peer, f"{interface} TLS handshake refused: {reason}", performer=them))

    def _application_activity(self, started: bool) -> None:
        from xdsi.audit import messages as m

        us = m.Participant(self.settings.ae_title, False, network_access_point=self.settings.host)
        self.audit.record(m.application_activity(self.audit.source, us, started))


def _audit_trail(settings: Settings, dicom: DicomServer, partitions: Any) -> Any:
    """The ATNA audit trail (issue 12), wired into the DIMSE server; a no-op without [audit] repositories."""
    from xdsi.audit.dimse import DimseAudit, patient_of
    from xdsi.audit.trail import AuditTrail

    ssl_context = None
    if settings.tls.ca_certificates is not None or settings.tls.certificate is not None:
        # RFC 5425 to tls:// repositories as ITI-19 wants it: our [tls] certificate, the repository verified
        # against ca_certificates and its host name
        from xdsi.security.tls import client_context

        ssl_context = client_context(settings.tls)
    trail = AuditTrail(settings, ssl_context)
    if trail.enabled:
        dicom.audit = DimseAudit(trail, patient_of)
        for archive in partitions.values():  # the HTTP adapters find it on the archive they serve
            archive.audit = trail
    return trail


def _warn_identifiers(configured: Settings, resolved: Settings) -> None:
    """What an operator publishing to a registry must know about our identifiers and URLs (issue 11)."""
    from xdsi.installation import generated_fields

    generated = generated_fields(configured.xds)
    log.info("XDS-I.b identifiers: repositoryUniqueId %s, sourceId %s, UID root %s%s", resolved.xds.repository_unique_id,
             resolved.xds.source_id, resolved.xds.uid_root, f" ({', '.join(generated)} generated for this installation)" if generated else "")
    if generated and not configured.effective_index_url.startswith("sqlite"):
        log.warning("[xds] %s generated in %s: every xdsi process sharing this index must answer to the same ids; "
                    "configure them in [xds] (see `xdsi status`)", ", ".join(generated), resolved.data_dir)
    if not resolved.public_url and not resolved.xds.retrieve_url:
        log.warning("[server] public_url is not set: published manifests carry no WADO-RS Retrieve URL")


def serve(
    settings: Settings,
    *,
    sockets: Mapping[str, socket.socket] | None = None,
    primary: bool = True,
    announce: bool = True,
    on_ready: Callable[[], None] | None = None,
) -> int:
    """Run until SIGTERM or SIGINT; ``sockets``/``primary``/``on_ready``: as a worker of :mod:`xdsi.supervisor`,
    which prints the start-up line itself once every worker said it is ready."""
    servers = Servers(settings, sockets=sockets, primary=primary, announce=announce)  # raises StartupError before anything listens
    done = threading.Event()

    def _stop(signum: int, _frame: Any) -> None:
        log.info("received %s", signal.Signals(signum).name)
        # armed here, not only around servers.stop() below: a worker once logged this line and then nothing more
        # (CI, test_tls_only_node), so where it hung came before that; re-armed (and cancelled) by the stop itself
        faulthandler.dump_traceback_later(STOP_DUMP_AFTER, exit=False)
        done.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        servers.start()
    except BaseException:
        servers.stop(quiet=True)  # what did start (a DICOM listener's threads) must not keep the process alive
        raise
    if on_ready is None:
        from xdsi.supervisor import freeze_startup_heap

        freeze_startup_heap()  # one process serving alone: its start-up heap out of later full collections too
        print(f"xdsi serving AE {settings.ae_title} on {describe_listeners(settings)} (data in {settings.data_dir})", flush=True)
    else:
        on_ready()
    try:
        # with a timeout: the kernel may hand SIGTERM to any thread, and then an untimed wait in the main
        # thread is never interrupted, so Python never runs the handler (seen: `xdsi serve` ignoring SIGTERM)
        while not done.wait(0.5):
            pass
    finally:
        # a stop that hangs says where: every thread's stack on stderr (the log) after STOP_DUMP_AFTER seconds
        faulthandler.dump_traceback_later(STOP_DUMP_AFTER, exit=False)
        try:
            servers.stop()
        finally:
            faulthandler.cancel_dump_traceback_later()
    return 0


STOP_DUMP_AFTER = 8.0  # seconds; the supervisor's grace before SIGKILL is 40


def _start_hl7(servers: Servers) -> None:
    """The HL7 MLLP listener ([hl7] port), TLS with the [tls] certificate when [hl7] tls is set."""
    from xdsi.hl7.listener import Hl7Listener
    from xdsi.security.tls import server_context

    s = servers.settings
    try:
        ctx = (servers.tls_context or server_context(s.tls)) if s.hl7.tls else None
    except (ValueError, OSError) as exc:
        raise StartupError("[hl7] tls", "true", None, str(exc)) from None
    listener = Hl7Listener(servers.archive, ctx)
    try:
        listener.start(s.host, s.hl7.port)
    except OSError as exc:
        raise listen_error("[hl7] port", None, s.hl7.port, s.host, exc) from None
    servers.hl7 = listener


def _write_running(settings: Settings, workers: int = 1) -> None:
    """Tell ``xdsi status`` which listeners this process serves (a file in data_dir, removed at stop)."""
    from xdsi.running import write_running

    try:
        write_running(settings, workers)
    except OSError as exc:  # the listeners run; only `xdsi status` will not know
        log.warning("cannot record the listeners for `xdsi status` in %s: %s", settings.data_dir, exc)


def _clear_running(settings: Settings) -> None:
    from xdsi.running import clear_running

    clear_running(settings)


def _blame_path(settings: Settings, exc: OSError) -> StartupError:
    """The directory setting an OSError's path lies under (the deepest one), else the data directory."""
    where = Path(exc.filename).resolve() if exc.filename else None
    dirs = directory_settings(settings)
    best = dirs[0]
    if where is not None:
        under = [d for d in dirs if where == d.path.resolve() or d.path.resolve() in where.parents]
        if under:
            best = max(under, key=lambda d: len(d.path.resolve().parts))
    return path_error(best, exc, "use")
