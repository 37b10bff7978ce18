"""An association stand-in for tests of our DIMSE senders against pynetdicom's own encoder.

It holds what ``DIMSEServiceProvider.send_msg`` and ``evt.trigger`` touch: the DUL (each P-DATA sent is
kept in ``sent``), the peer's maximum PDU length, and an EVT_DIMSE_SENT handler that keeps what
``describe`` says of each message in ``events``.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Callable

from pynetdicom import evt
from pynetdicom.dimse import DIMSEServiceProvider


class FakeAssoc:
    def __init__(self, max_pdu: int, describe: Callable[[Any], Any]) -> None:
        self.sent: list[Any] = []
        self.events: list[Any] = []
        self.describe = describe
        self.dul = SimpleNamespace(send_pdu=self.sent.append)
        self.is_requestor = False
        self.requestor = SimpleNamespace(maximum_length=max_pdu)
        self.dimse = DIMSEServiceProvider(self)  # type: ignore[arg-type]
        self._abort_nonblocking = self._abort_blocking = lambda: None

    def get_handlers(self, event: Any) -> Any:
        if event is evt.EVT_DIMSE_SENT:
            return [(lambda e: self.events.append(self.describe(e.message)), None)]
        return []
