"""C-STORE sub-operations that stream from storage and transcode only when they must.

pynetdicom's C-GET and C-MOVE services accept only a decoded ``Dataset`` from
the handler, which would put each instance (a 1 GB whole-slide image
included) in memory.  We hand them a small placeholder ``Dataset`` that names
the stored file, and wrap the sending association's ``send_c_store`` so that:

* when the peer accepted the stored transfer syntax, the file is sent from
  disk in chunks, byte for byte as it was received;
* otherwise the instance is decoded and sent uncompressed (Explicit or
  Implicit VR Little Endian), which every storage SCP accepts, or, when the
  peer accepted only a compressed syntax, re-encoded losslessly into it.

On a C-GET the requestor proposes the storage contexts and we, the acceptor,
pick one transfer syntax per context.  pynetdicom picks in the acceptor's
order; :func:`prefer_requestor_syntaxes` makes it the requestor's order for
the contexts in which we are to send, because the requestor knows what it
wants to receive (``getscu +xv`` asks for JPEG 2000 and must get the stored
JPEG 2000 bytes, not a decoded copy).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless, RLELossless
from pynetdicom.presentation import build_context

from xdsi.archive import transcode

log = logging.getLogger(__name__)

UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
# lossless encodings we can produce from decoded pixels when a peer accepts nothing else
LOSSLESS_ENCODINGS = (RLELossless, JPEG2000Lossless)
MAX_CONTEXTS = 128


class StoredInstance(Dataset):
    """A placeholder for an archived file: carries identity, not content."""

    def __init__(self, path: Path | None, sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str) -> None:
        super().__init__()
        self.SOPClassUID = sop_class_uid
        self.SOPInstanceUID = sop_instance_uid
        self._xdsi_path = path
        self._xdsi_ts = transfer_syntax_uid


def _accepted(assoc: Any, sop_class: str, ts: str) -> bool:
    for cx in assoc.accepted_contexts:
        if cx.abstract_syntax == sop_class and cx.transfer_syntax and cx.transfer_syntax[0] == ts:
            # as the storage SCU on this association we need the SCU role (or default roles)
            if getattr(cx, "as_scu", True):
                return True
    return False


def can_encode(ts: str) -> bool:
    """A lossless encoding we can produce: a retrieve never degrades an image the peer did not ask to."""
    return ts in LOSSLESS_ENCODINGS and transcode.can_encode(ts)


def can_produce(ts: str) -> bool:
    """A transfer syntax every stored instance can be sent in (decoded, or re-encoded losslessly)."""
    return ts in UNCOMPRESSED or can_encode(ts)


def decoded_for_peer(path: Path, accepted_ts: list[str]) -> Dataset:
    """Transcode an instance for a peer that cannot take its stored transfer syntax.

    Uncompressed when the peer accepted an uncompressed syntax, else a lossless
    encoding it accepted; never a lossy one.
    """
    target = next((t for t in accepted_ts if t in UNCOMPRESSED), None) or next(
        (t for t in accepted_ts if can_encode(t)), None
    )
    if target is None:
        raise ValueError(f"cannot produce any of {accepted_ts} from {path.name}")
    return transcode.converted(path, target)


def prefer_requestor_syntaxes(event: Any) -> None:
    """EVT_REQUESTED: for storage contexts the requestor wants us to send on (SCP role), choose in its order.

    Only syntaxes we can produce from any stored instance move to the front;
    the rest of our list stays behind them as before.
    """
    assoc = event.assoc
    roles = assoc.requestor.role_selection
    want_scp = {uid for uid, item in roles.items() if item.scp_role}
    if not want_scp:
        return
    order: dict[str, list[str]] = {}
    for cx in assoc.requestor.primitive.presentation_context_definition_list or []:
        if cx.abstract_syntax in want_scp and cx.abstract_syntax not in order:
            order[cx.abstract_syntax] = list(cx.transfer_syntax)
    contexts = assoc.acceptor.supported_contexts  # a per-association deep copy
    for cx in contexts:
        wanted = order.get(cx.abstract_syntax)
        if not wanted:
            continue
        ours = list(cx.transfer_syntax)
        first = [ts for ts in wanted if ts in ours and can_produce(ts)]
        cx.transfer_syntax = first + [ts for ts in ours if ts not in first]
    assoc.acceptor.supported_contexts = contexts


def install_streaming_sender(assoc: Any) -> None:
    """Wrap ``assoc.send_c_store`` (once) so :class:`StoredInstance` placeholders are sent from disk."""
    if getattr(assoc, "_xdsi_streaming", False):
        return
    original: Callable[..., Any] = assoc.send_c_store

    def send_c_store(dataset: Any, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(dataset, StoredInstance):
            return original(dataset, *args, **kwargs)
        path, sop_class, ts = dataset._xdsi_path, str(dataset.SOPClassUID), dataset._xdsi_ts
        if path is None:
            raise FileNotFoundError(f"{dataset.SOPInstanceUID} is not available from storage")
        if _accepted(assoc, sop_class, ts):
            return original(path, *args, **kwargs)
        accepted = [
            str(cx.transfer_syntax[0])
            for cx in assoc.accepted_contexts
            if cx.abstract_syntax == sop_class and cx.transfer_syntax and getattr(cx, "as_scu", True)
        ]
        if not any(can_produce(t) for t in accepted):
            raise ValueError(f"peer accepted no usable transfer syntax for {sop_class} (stored as {ts})")
        peer = assoc.acceptor.ae_title if assoc.is_requestor else assoc.requestor.ae_title
        log.info("transcoding %s from %s for %s (accepted %s)", dataset.SOPInstanceUID, ts, peer, ", ".join(accepted))
        return original(decoded_for_peer(path, accepted), *args, **kwargs)

    assoc.send_c_store = send_c_store
    assoc._xdsi_streaming = True


def contexts_for(pairs: set[tuple[str, str]]) -> list[Any]:
    """Presentation contexts to propose to a move destination.

    One context per (SOP class, stored transfer syntax) so every instance can
    go byte for byte as stored, plus an uncompressed fallback for SOP classes
    stored compressed, for peers that cannot decode them.
    """
    cxs = [build_context(sop_class, [ts]) for sop_class, ts in sorted(pairs)]
    needs_fallback = sorted({c for c, ts in pairs if ts not in UNCOMPRESSED})
    cxs += [build_context(sop_class, list(UNCOMPRESSED)) for sop_class in needs_fallback]
    if len(cxs) > MAX_CONTEXTS:
        raise ValueError(f"the selection needs {len(cxs)} presentation contexts, more than {MAX_CONTEXTS}")
    return cxs
