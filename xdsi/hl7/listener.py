"""The MLLP listener: HL7 v2 from the HIS/RIS in, one ACK per message out.

Framing is python-hl7's asyncio MLLP stream (``hl7.mllp``), on its own event loop
thread; the work of each message (index writes) runs on a small thread pool so a slow
database never stalls the reading of other connections.  Every block gets an answer:

* ``AA`` — applied (or nothing to apply: an update for a patient we do not hold);
* ``AE`` — understood but not applied (a required field empty, an ambiguous patient,
  the index failed): the RIS may send it again after fixing it;
* ``AR`` — rejected: not an HL7 message, no usable MSH, a block larger than
  ``[hl7] max_message_bytes``, or a message type we do not take.

A NAK carries an ERR segment with the HL7 table 0357 code, where, and the reason.  A
malformed block never ends the connection, let alone the listener; only EOF, an idle
connection (``read_timeout``) or ``stop()`` do.  Orders and patient updates are written
in one transaction before the ACK is sent (acknowledged = recorded), with the prefetch jobs
they trigger; the prefetch itself runs after (:mod:`xdsi.hl7.prefetch`).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from hl7.mllp import InvalidBlockError, start_hl7_server

from xdsi.hl7 import messages as m
from xdsi.hl7.messages import Hl7Error, Received

if TYPE_CHECKING:
    from xdsi.archive import Archive
    from xdsi.hl7.prefetch import Prefetcher

log = logging.getLogger(__name__)

__all__ = ["Hl7Listener", "Hl7Handler", "ORDER_TYPES", "PREFETCH_ADT", "UPDATE_TYPES"]

ORDER_TYPES = ("ORM^O01", "OMI^O23")
PREFETCH_ADT = ("ADT^A01", "ADT^A04", "ADT^A05")
UPDATE_TYPES = ("ADT^A08", "ADT^A31", "ADT^A40")
# ORC-1 order controls that end an order (HL7 table 0119): recorded, but they trigger no prefetch
CANCELLING = ("CA", "DC", "OC", "CR", "OD", "DR")


class Hl7Handler:
    """One message in, the ACK bytes out: parse, dispatch, record, acknowledge (no network here)."""

    def __init__(self, archive: "Archive", prefetcher: "Prefetcher | None" = None) -> None:
        self.archive = archive
        self.settings = archive.settings.hl7
        self.prefetcher = prefetcher
        self.handled: dict[str, int] = {}  # ACK code -> messages answered with it (for status and tests)

    def answer(self, r: Received | None, code: str, error: Hl7Error | None = None) -> bytes:
        """The ACK bytes, counted in :attr:`handled`."""
        self.handled[code] = self.handled.get(code, 0) + 1
        return m.ack(r, code, application=self.settings.application, facility=self.settings.facility, error=error)

    def handle(self, block: bytes, peer: str = "") -> bytes:
        """The ACK for one block; ``peer`` (the sender's address) is what the audit records name."""
        try:
            r = m.parse(block, self.settings.charset)
        except Hl7Error as exc:
            log.warning("HL7 block refused (%s): %s", exc.ack_code, exc.text)
            return self.answer(None, exc.ack_code, exc)
        try:
            note = self.dispatch(r, peer)
        except Hl7Error as exc:
            log.warning("HL7 %s %s answered %s: %s", r.message_type, r.control_id, exc.ack_code, exc.text)
            return self.answer(r, exc.ack_code, exc)
        except Exception as exc:  # the index failed: nothing was committed; the sender may retry
            log.exception("HL7 %s %s could not be applied", r.message_type, r.control_id)
            return self.answer(r, "AE", Hl7Error("AE", m.APPLICATION_INTERNAL_ERROR, f"not applied: {type(exc).__name__}: {exc}"))
        log.info("HL7 %s %s: %s", r.message_type, r.control_id, note)
        return self.answer(r, "AA")

    def dispatch(self, r: Received, peer: str = "") -> str:
        kind = r.message_type
        if r.processing_id[:1] not in self.settings.processing_ids:
            raise Hl7Error("AR", m.UNSUPPORTED_PROCESSING_ID, f"MSH-11 processing ID {r.processing_id!r} is not taken here "
                           f"([hl7] processing_ids: {', '.join(self.settings.processing_ids)})", "MSH^1^11")
        if kind in ORDER_TYPES:
            return self._order(r)
        if kind in PREFETCH_ADT:
            return self._admission(r)
        if kind in UPDATE_TYPES:
            return self._patient_update(r, peer)
        code = m.UNSUPPORTED_MESSAGE_TYPE if not kind.startswith(("ORM^", "OMI^", "ADT^")) else m.UNSUPPORTED_EVENT_CODE
        raise Hl7Error("AR", code, f"message type {kind} is not taken here (ORM^O01, OMI^O23, ADT^A01/A04/A05/A08/A31/A40)", "MSH^1^9")

    def _order(self, r: Received) -> str:
        from xdsi.hl7.orders import order_facts, record_order

        facts = order_facts(r)
        with self.archive.index.session() as s:  # the order and its prefetch jobs, one transaction, before the ACK
            record_order(s, facts)
            queued = 0 if facts["order_control"] in CANCELLING else self._prefetch(
                s, r, facts["patient_id"], facts["issuer_of_patient_id"], facts["modality"], facts["accession_number"])
        self._wake(queued)
        return f"order {facts['accession_number']!r} ({facts['order_control'] or '?'}) for patient {facts['patient_id']!r} recorded; {queued} prefetch job(s)"

    def _admission(self, r: Received) -> str:
        pid, issuer = r.get("PID", 3, 1), r.get("PID", 3, 4)
        if not pid:
            raise Hl7Error("AE", m.REQUIRED_FIELD_MISSING, "PID-3 (patient identifier) is empty", "PID^1^3")
        with self.archive.index.session() as s:
            queued = self._prefetch(s, r, pid, issuer)
        self._wake(queued)
        return f"{queued} prefetch job(s) for patient {pid!r}"

    def _patient_update(self, r: Received, peer: str) -> str:
        from xdsi.hl7.audit import patient_record_events
        from xdsi.hl7.patients import merge_patients, republish, update_patient

        with self.archive.index.session() as s:
            done = merge_patients(s, r) if r.message_type == "ADT^A40" else update_patient(s, r)
        for event in patient_record_events(self.archive, r, done, peer):
            self.archive.audit.record(event)
        queued = republish(self.archive, done.studies)
        return done.note + (f"; replacement manifest queued for {len(queued)} studies" if queued else "")

    def _prefetch(self, session: Any, r: Received, patient_id: str, issuer: str, modality: str = "", accession: str = "") -> int:
        from xdsi.hl7.prefetch import record_jobs

        return record_jobs(session, self.settings.prefetch, r.message_type, patient_id, issuer, modality, accession, r.control_id)

    def _wake(self, queued: int) -> None:
        if queued and self.prefetcher is not None:
            self.prefetcher.wake()


class Hl7Listener:
    """The MLLP server on its own event-loop thread; ``start()`` raises OSError when the port cannot be bound."""

    def __init__(self, archive: "Archive", ssl_context: ssl.SSLContext | None = None, *, prefetch: bool = True) -> None:
        from xdsi.hl7.prefetch import Prefetcher

        self.archive = archive
        self.settings = archive.settings.hl7
        self.ssl_context = ssl_context
        self.prefetcher = Prefetcher(archive) if prefetch and self.settings.prefetch else None
        self.handler = Hl7Handler(archive, self.prefetcher)
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="hl7-work")
        self._clients: set[asyncio.Task[Any]] = set()

    def start(self, host: str, port: int) -> None:
        ready = threading.Event()
        failure: list[BaseException] = []
        loop = asyncio.new_event_loop()
        self._loop = loop

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                self._server = loop.run_until_complete(start_hl7_server(
                    self._client, host, port, limit=self.settings.max_message_bytes, ssl=self.ssl_context,
                ))
            except BaseException as exc:  # noqa: BLE001 - handed to start()
                failure.append(exc)
                ready.set()
                loop.close()
                return
            self.port = self._server.sockets[0].getsockname()[1]
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self._thread = threading.Thread(target=run, name="hl7-mllp", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            self._thread.join()
            self._thread = None
            raise failure[0]
        if self.prefetcher is not None:
            self.prefetcher.start()
        log.info("HL7 MLLP listening on %s:%d%s", host, self.port, " (TLS)" if self.ssl_context else "")

    async def _client(self, reader: Any, writer: Any) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._clients.add(task)
        peer = writer.get_extra_info("peername")
        loop = asyncio.get_running_loop()
        try:
            while True:
                try:
                    block = await asyncio.wait_for(reader.readblock(), self.settings.read_timeout)
                except asyncio.IncompleteReadError as exc:
                    if exc.partial.strip():
                        log.warning("HL7 connection from %s closed in the middle of a block (%d bytes unanswered)", peer, len(exc.partial))
                    return
                except InvalidBlockError:
                    reply = self.handler.answer(None, "AR", Hl7Error("AR", m.SEGMENT_SEQUENCE_ERROR, "block does not begin with <VT> (MLLP start block)"))
                except ValueError:  # larger than max_message_bytes: the block was skipped
                    reply = self.handler.answer(None, "AR", Hl7Error(
                        "AR", m.APPLICATION_INTERNAL_ERROR, f"message larger than [hl7] max_message_bytes ({self.settings.max_message_bytes} bytes)"))
                except (asyncio.TimeoutError, ConnectionError, ssl.SSLError):
                    return
                else:
                    reply = await loop.run_in_executor(self._pool, self.handler.handle, block, peer[0] if peer else "")
                writer.writeblock(reply)
                await writer.drain()
        except (ConnectionError, ssl.SSLError, asyncio.CancelledError):
            return
        finally:
            if task is not None:
                self._clients.discard(task)
            writer.close()

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is not None and thread is not None:
            async def close() -> None:
                if self._server is not None:
                    self._server.close()
                clients = list(self._clients)
                for t in clients:
                    t.cancel()
                # a handler already running in the pool finishes its transaction; its ACK may not be sent (the
                # RIS sends the message again, and applying it twice changes nothing)
                await asyncio.wait(clients, timeout=5) if clients else None
                loop.stop()

            asyncio.run_coroutine_threadsafe(close(), loop)
            thread.join(10)
        self._thread = None
        self._pool.shutdown(wait=True)
        if self.prefetcher is not None:
            self.prefetcher.stop()

