"""The relay's hand-over of instances a remote sends for a pending retrieve (issue 15), in one process and across workers."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import pytest

from xdsi.gateway import relay as r

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"


def _event(path: Path, *, calling: str = "PACS1", originator: str | None = "XDSI", mid: int | None = 7, sop: str = "1.2.3.4") -> Any:
    req = SimpleNamespace(AffectedSOPClassUID=CT, AffectedSOPInstanceUID=sop, MoveOriginatorMessageID=mid,
                          MoveOriginatorApplicationEntityTitle=originator)
    return SimpleNamespace(request=req, assoc=SimpleNamespace(requestor=SimpleNamespace(ae_title=calling), dul=None),
                           dataset_path=path, context=SimpleNamespace(transfer_syntax=EXPLICIT))


@pytest.fixture()
def relay(tmp_path: Path) -> Iterator[r.Relay]:
    r.INBOX_ROOT = tmp_path / "relay"
    rel = r.Relay(tmp_path / "spool", "PACS1", 7)
    rel.originator = "XDSI"
    r.register(rel)
    try:
        yield rel
    finally:
        r.unregister(rel)
        r.INBOX_ROOT = None


def _spooled(tmp_path: Path, name: str = "tmp1.dcm", data: bytes = b"DICM-bytes") -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


def test_same_process_delivery(relay: r.Relay, tmp_path: Path) -> None:
    p = _spooled(tmp_path)
    assert r.hand_over(_event(p, mid=relay.msg_id)) == 0x0000
    kind, arrived = relay.items.get_nowait()
    assert kind == "instance" and arrived.sop_instance_uid == "1.2.3.4" and arrived.transfer_syntax_uid == EXPLICIT
    assert arrived.path.read_bytes() == b"DICM-bytes" and not p.exists()


def test_other_process_delivery_goes_through_the_inbox(relay: r.Relay, tmp_path: Path) -> None:
    with r._lock:  # as in another worker: the relay is not in this process's registry, only its inbox exists
        r._relays.pop((relay.remote_ae, relay.originator, relay.msg_id))
    try:
        p = _spooled(tmp_path)
        assert r.hand_over(_event(p, mid=relay.msg_id, sop="1.2.3.5")) == 0x0000
        assert not p.exists()
        (arrived,) = relay.from_inbox()
        assert (arrived.sop_class_uid, arrived.sop_instance_uid, arrived.transfer_syntax_uid) == (CT, "1.2.3.5", EXPLICIT)
        assert arrived.path.read_bytes() == b"DICM-bytes"
        relay.close()  # cancelled: what still comes is refused, not archived
        assert r.hand_over(_event(_spooled(tmp_path, "tmp2.dcm"), mid=relay.msg_id)) == r.REFUSED_CLOSED
    finally:
        with r._lock:
            r._relays[(relay.remote_ae, relay.originator, relay.msg_id)] = relay


@pytest.mark.parametrize(
    "kw",
    [
        {"originator": None},  # a plain push from the remote: archived, never relayed
        {"originator": "SOMEONE"},  # a C-MOVE another AE asked the remote for, with the same Message ID
        {"mid": None},
        {"calling": "PACS2"},  # another remote
    ],
)
def test_stores_not_ours_are_archived(relay: r.Relay, tmp_path: Path, kw: dict[str, Any]) -> None:
    kw.setdefault("mid", relay.msg_id)
    p = _spooled(tmp_path)
    assert r.hand_over(_event(p, **kw)) is None
    assert p.exists() and relay.items.empty() and not relay.from_inbox()


def test_message_id_in_use_by_another_process_is_not_reused(tmp_path: Path, relay: r.Relay) -> None:
    other = r.Relay(tmp_path / "spool", "PACS1", relay.msg_id)
    other.originator = "XDSI"
    r.register(other)
    try:
        assert other.msg_id != relay.msg_id and other.inbox is not None and other.inbox != relay.inbox
    finally:
        r.unregister(other)
    assert not other.inbox.exists()
