"""A-ASSOCIATE-RQ PDUs decoded once per distinct request, not once per association.

Why: a C-GET requestor proposes a storage context for every SOP class it can receive
(dcmtk's getscu: 121 contexts, 363 transfer syntaxes, 121 SCP/SCU role items in a
17 KB A-ASSOCIATE-RQ).  pynetdicom (3.0) decodes that PDU into items and then into an
``A_ASSOCIATE`` primitive, building and validating a pydicom ``UID`` (regular
expressions) about 2,000 times: measured 21 ms of CPU per association with getscu's
request, about ten times what Orthanc spends on a whole one-instance C-GET, and the
first thing in the way of every retrieve.  The same modality or viewer sends the
same request every time, byte for byte but for the two AE titles.

So each accepted association's DUL decodes an A-ASSOCIATE-RQ through :class:`RequestMemo`:
the request's bytes without the AE titles are the key; the first time, pynetdicom
decodes it and its items and primitive are kept (copies, taken before the
negotiation changes anything, and only if the copies equal the originals);
afterwards the PDU's fixed fields (protocol version, AE titles) are decoded by
pynetdicom from the request's own bytes, its items are a fresh copy of the kept
ones, and ``to_primitive()`` returns a fresh copy of the kept primitive with
those AE titles.  The copy is made by hand (each object's
attributes, lists copied, immutable values - UIDs are ``str`` - shared), as
:mod:`xdsi.dimse.cheap_contexts` does for presentation contexts.  Any other PDU
goes through pynetdicom's decoder untouched, and so does everything after: the
negotiation and the A-ASSOCIATE-AC are pynetdicom's.  Only requests up to
:data:`MAX_PDU_BYTES` are kept, at most :data:`MAX_ENTRIES` of them (least
recently used dropped), so a peer sending ever different requests costs what it
did before and a little memory; a request with a User Identity (a password or
token) is never kept.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Callable

from pynetdicom import evt
from pynetdicom.pdu import A_ASSOCIATE_RQ

A_ASSOCIATE_RQ_TYPE = 0x01
FIXED_BYTES = 74  # PDU header (6), protocol version, reserved, called AE, calling AE, 32 reserved (PS3.8 9.3.2)
AE_TITLES = slice(10, 42)
MAX_ENTRIES = 32
MAX_PDU_BYTES = 64 * 1024
_IMMUTABLE = (str, bytes, int, float, bool, tuple, type(None))  # UID is a str


def _copy(obj: Any) -> Any:
    """A copy of a pynetdicom primitive or item: its attributes copied, lists copied, immutable values shared."""
    new = object.__new__(type(obj))
    new.__dict__.update({k: _copy_value(v) for k, v in obj.__dict__.items()})
    return new


def _copy_value(value: Any) -> Any:
    if isinstance(value, _IMMUTABLE):
        return value
    if isinstance(value, list):
        return [_copy_value(v) for v in value]
    if hasattr(value, "__dict__"):
        return _copy(value)
    raise TypeError(f"cannot copy a {type(value).__name__}")


def same(a: Any, b: Any) -> bool:
    """``a`` and ``b`` hold the same values all the way down, in objects of the same classes."""
    if isinstance(a, _IMMUTABLE) or isinstance(b, _IMMUTABLE):
        return type(a) is type(b) and a == b
    if isinstance(a, list) or isinstance(b, list):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if type(a) is not type(b) or not hasattr(a, "__dict__"):
        return False
    da, db = a.__dict__, b.__dict__
    return da.keys() == db.keys() and all(same(da[k], db[k]) for k in da)


def memo_request(raw: bytes, kept: "Kept") -> A_ASSOCIATE_RQ:
    """pynetdicom's A-ASSOCIATE-RQ PDU for ``raw``: fixed fields decoded by pynetdicom, items and primitive copied.

    A plain ``A_ASSOCIATE_RQ`` (pynetdicom looks PDUs up by their exact class): its fixed fields
    (protocol version, AE titles) decoded by pynetdicom from ``raw`` cut before the items, its
    ``variable_items`` a copy of the kept ones, and ``to_primitive()`` a fresh copy of the kept
    primitive with this request's AE titles.
    """
    head = bytearray(raw[:FIXED_BYTES])
    head[2:6] = (FIXED_BYTES - 6).to_bytes(4, "big")  # the PDU as if it had no items
    pdu = A_ASSOCIATE_RQ()
    pdu.decode(bytes(head))
    pdu.variable_items = _copy_value(kept.items)

    def to_primitive() -> Any:
        primitive = _copy(kept.primitive)
        primitive.calling_ae_title = pdu.calling_ae_title
        primitive.called_ae_title = pdu.called_ae_title
        return primitive

    pdu.to_primitive = to_primitive  # type: ignore[method-assign]
    return pdu


class Kept:
    """What the memo keeps of one request: copies of its decoded items and of its primitive before negotiation."""

    __slots__ = ("items", "primitive")

    def __init__(self, items: list[Any], primitive: Any) -> None:
        self.items = items
        self.primitive = primitive


USER_INFORMATION_ITEM, USER_IDENTITY_SUB_ITEM = 0x50, 0x58


def carries_user_identity(raw: bytes) -> bool:
    """True if the request's User Information item has a User Identity sub-item (PS3.7 D.3.3.7), or cannot be walked.

    Such a request carries a password or a token: it is decoded every time and never kept in memory
    beyond its own association (tokens change anyway, so it would rarely be seen twice).
    """
    pos = FIXED_BYTES
    while pos + 4 <= len(raw):
        item_type, length = raw[pos], int.from_bytes(raw[pos + 2 : pos + 4], "big")
        end = pos + 4 + length
        if end > len(raw):
            return True
        if item_type == USER_INFORMATION_ITEM:
            sub = pos + 4
            while sub + 4 <= end:
                if raw[sub] == USER_IDENTITY_SUB_ITEM:
                    return True
                sub += 4 + int.from_bytes(raw[sub + 2 : sub + 4], "big")
        pos = end
    return pos != len(raw)


class RequestMemo:
    """Primitives of the A-ASSOCIATE-RQs seen, keyed by the request's bytes without the AE titles."""

    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[bytes, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(raw: bytes) -> bytes | None:
        """The memo's key for an A-ASSOCIATE-RQ, or None if it is not to be kept (too large, or carrying credentials)."""
        if len(raw) < FIXED_BYTES or raw[0] != A_ASSOCIATE_RQ_TYPE or len(raw) > MAX_PDU_BYTES:
            return None
        if carries_user_identity(raw):
            return None
        return raw[: AE_TITLES.start] + raw[AE_TITLES.stop :]

    def get(self, key: bytes) -> Any:
        with self._lock:
            template = self._entries.get(key)
            if template is not None:
                self._entries.move_to_end(key)
                self.hits += 1
            return template

    def keep(self, key: bytes, items: list[Any], primitive: Any) -> None:
        """Keep copies of a request's ``items`` and ``primitive`` (just made by pynetdicom, not yet negotiated) if faithful."""
        try:
            template = Kept(_copy_value(items), _copy(primitive))
        except TypeError:
            return
        if not (same(template.items, items) and same(template.primitive, primitive)):
            return
        with self._lock:
            self.misses += 1
            self._entries[key] = template
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def install(self, assoc: Any) -> None:
        """Decode ``assoc``'s A-ASSOCIATE-RQ through the memo (``EVT_CONN_OPEN``, before its DUL reads anything)."""
        dul = getattr(assoc, "dul", None)
        if dul is None or getattr(dul, "_xdsi_request_memo", False):
            return
        dul._xdsi_request_memo = True
        dul._decode_pdu = self._decoder(assoc, dul._decode_pdu)

    def _decoder(self, assoc: Any, original: Callable[[bytearray], tuple[Any, str]]) -> Callable[[bytearray], tuple[Any, str]]:
        def decode_pdu(bytestream: bytearray) -> tuple[Any, str]:
            raw = bytes(bytestream)
            key = self.key(raw)
            if key is None:
                return original(bytestream)
            template = self.get(key)
            if template is None:
                pdu, event = original(bytestream)
                if type(pdu) is A_ASSOCIATE_RQ:
                    pdu.to_primitive = self._keeping(key, pdu)  # type: ignore[method-assign]
                return pdu, event
            # what pynetdicom's _decode_pdu does around the decoding (PS3.8 Evt6: A-ASSOCIATE-RQ PDU received)
            evt.trigger(assoc, evt.EVT_DATA_RECV, {"data": raw})
            pdu = memo_request(raw, template)
            evt.trigger(assoc, evt.EVT_PDU_RECV, {"pdu": pdu})
            return pdu, "Evt6"

        return decode_pdu

    def _keeping(self, key: bytes, pdu: A_ASSOCIATE_RQ) -> Callable[[], Any]:
        to_primitive = pdu.to_primitive

        def keep_first() -> Any:
            primitive = to_primitive()
            self.keep(key, pdu.variable_items, primitive)
            return primitive

        return keep_first


MEMO = RequestMemo()  # one per process: every listener's associations share what was decoded


def on_conn_open(event: Any) -> None:
    """``EVT_CONN_OPEN`` handler of the listeners: accepted associations decode their request through :data:`MEMO`."""
    if event.assoc.is_acceptor:
        MEMO.install(event.assoc)


__all__ = ["MEMO", "RequestMemo", "memo_request", "on_conn_open", "same"]
