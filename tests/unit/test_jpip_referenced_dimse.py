"""JPIP Referenced in DIMSE negotiation (issue 16 part 3): what is proposed for C-MOVE, the order a C-GET keeps.

pynetdicom's own PresentationContext objects stand in for negotiated contexts;
the wire behaviour is in tests/integration/test_jpip_referenced.py.
"""

from __future__ import annotations

from types import SimpleNamespace

from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless, MRImageStorage
from pynetdicom.presentation import AllStoragePresentationContexts, build_context

from xdsi.dimse.sending import MAX_CONTEXTS, accepted_syntaxes, contexts_for, jpip_before, offer_jpip_for_get, with_jpip_contexts
from xdsi.jpip.urls import JPIP_REFERENCED, JPIP_REFERENCED_DEFLATE, JPIP_SYNTAXES


def _accepted(*pairs: tuple[str, str], as_scu: bool = True) -> SimpleNamespace:
    cxs = []
    for n, (sop_class, ts) in enumerate(pairs):
        cx = build_context(sop_class, [ts])
        cx.context_id = 2 * n + 1
        cx._as_scu = as_scu
        cxs.append(cx)
    return SimpleNamespace(accepted_contexts=cxs)


def test_move_adds_one_jpip_context_per_class_only_when_offered() -> None:
    pairs = {(CTImageStorage, ExplicitVRLittleEndian), (CTImageStorage, JPEG2000Lossless), (MRImageStorage, ImplicitVRLittleEndian)}
    base = contexts_for(pairs)
    assert with_jpip_contexts(base, pairs, offered=False) == base
    got = with_jpip_contexts(base, pairs, offered=True)
    assert got[: len(base)] == base
    added = got[len(base) :]
    assert sorted(str(cx.abstract_syntax) for cx in added) == sorted([CTImageStorage, MRImageStorage])
    assert all([str(t) for t in cx.transfer_syntax] == list(JPIP_SYNTAXES) for cx in added)


def test_move_jpip_contexts_never_push_past_128() -> None:
    classes = [str(cx.abstract_syntax) for cx in AllStoragePresentationContexts]
    pairs = {(c, ExplicitVRLittleEndian) for c in classes}
    base = contexts_for(pairs)
    assert len(with_jpip_contexts(base, pairs, offered=True)) <= MAX_CONTEXTS
    few = {(c, ExplicitVRLittleEndian) for c in classes[:40]}  # 40 classes x 2 native contexts = 80: room for 40 more
    assert len(with_jpip_contexts(contexts_for(few), few, offered=True)) == 120


def test_move_sends_stored_and_native_before_jpip() -> None:
    """A destination that accepted JPIP among others is not asking for it: stored, native, then JPIP."""
    assoc = _accepted((CTImageStorage, JPIP_REFERENCED), (CTImageStorage, ImplicitVRLittleEndian), (CTImageStorage, JPEG2000Lossless))
    got = accepted_syntaxes(assoc, CTImageStorage, JPEG2000Lossless, native_first=True)
    assert got == [JPEG2000Lossless, ImplicitVRLittleEndian, JPIP_REFERENCED]


def test_get_keeps_jpip_ahead_of_the_stored_syntax_when_proposed_first() -> None:
    assoc = _accepted((CTImageStorage, JPIP_REFERENCED_DEFLATE), (CTImageStorage, ExplicitVRLittleEndian))
    assert accepted_syntaxes(assoc, CTImageStorage, ExplicitVRLittleEndian, native_first=False) == [JPIP_REFERENCED_DEFLATE, ExplicitVRLittleEndian]
    later = _accepted((CTImageStorage, ExplicitVRLittleEndian), (CTImageStorage, JPIP_REFERENCED))
    assert accepted_syntaxes(later, CTImageStorage, ExplicitVRLittleEndian, native_first=False) == [ExplicitVRLittleEndian, JPIP_REFERENCED]
    assert not jpip_before([JPIP_REFERENCED, ExplicitVRLittleEndian], ExplicitVRLittleEndian, native_first=True)
    assert jpip_before([JPIP_REFERENCED, ExplicitVRLittleEndian], ExplicitVRLittleEndian, native_first=False)


def _requested(scp: set[str], supported: list[str]) -> SimpleNamespace:
    roles = {uid: SimpleNamespace(scp_role=True, scu_role=False) for uid in scp}
    contexts = [build_context(uid, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]) for uid in supported]
    return SimpleNamespace(requestor=SimpleNamespace(role_selection=roles), acceptor=SimpleNamespace(supported_contexts=contexts))


def test_get_offers_jpip_only_for_classes_the_requestor_receives() -> None:
    assoc = _requested({CTImageStorage}, [CTImageStorage, MRImageStorage])
    offer_jpip_for_get(assoc, offered=True)
    by_class = {str(cx.abstract_syntax): [str(t) for t in cx.transfer_syntax] for cx in assoc.acceptor.supported_contexts}
    assert by_class[CTImageStorage] == [ExplicitVRLittleEndian, ImplicitVRLittleEndian, *JPIP_SYNTAXES]
    assert by_class[MRImageStorage] == [ExplicitVRLittleEndian, ImplicitVRLittleEndian]  # a class a peer stores on: never
    offer_jpip_for_get(assoc, offered=True)  # twice: no duplicates
    assert [str(t) for t in assoc.acceptor.supported_contexts[0].transfer_syntax].count(JPIP_REFERENCED) == 1


def test_get_offers_no_jpip_without_public_url() -> None:
    assoc = _requested({CTImageStorage}, [CTImageStorage])
    offer_jpip_for_get(assoc, offered=False)
    assert not any(str(t) in JPIP_SYNTAXES for cx in assoc.acceptor.supported_contexts for t in cx.transfer_syntax)
