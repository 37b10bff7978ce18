"""What xdsi proposes to a C-MOVE destination and accepts from a C-GET requestor (pure functions)."""

from __future__ import annotations

from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    MRImageStorage,
)
from pynetdicom.presentation import AllStoragePresentationContexts

from xdsi.dimse.sending import MAX_CONTEXTS, contexts_for, requestor_choice
from xdsi.dimse.server import STORAGE_TRANSFER_SYNTAXES

NATIVE = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]


def _proposed(cxs) -> list[tuple[str, list[str]]]:  # type: ignore[no-untyped-def]
    return [(str(cx.abstract_syntax), [str(t) for t in cx.transfer_syntax]) for cx in cxs]


def test_move_proposes_stored_then_explicit_then_implicit_each_on_its_own() -> None:
    pairs = {(CTImageStorage, ExplicitVRLittleEndian), (CTImageStorage, JPEG2000Lossless), (MRImageStorage, JPEGBaseline8Bit)}
    got = _proposed(contexts_for(pairs))
    assert got == [
        (CTImageStorage, [ExplicitVRLittleEndian]),
        (CTImageStorage, [JPEG2000Lossless]),
        (CTImageStorage, [ImplicitVRLittleEndian]),
        (MRImageStorage, [JPEGBaseline8Bit]),
        (MRImageStorage, [ExplicitVRLittleEndian]),
        (MRImageStorage, [ImplicitVRLittleEndian]),
    ]


def test_move_groups_contexts_to_fit_128() -> None:
    classes = [str(cx.abstract_syntax) for cx in AllStoragePresentationContexts][:60]
    pairs = {(c, ts) for c in classes for ts in (JPEGBaseline8Bit, JPEGLSLossless)}
    got = _proposed(contexts_for(pairs))
    assert len(got) <= MAX_CONTEXTS
    for c in classes:  # every class keeps its stored syntaxes and a native fallback
        mine = [ts for cls, tss in got if cls == c for ts in tss]
        assert {JPEGBaseline8Bit, JPEGLSLossless, *NATIVE} <= set(mine)


def test_move_with_more_than_128_classes_proposes_a_native_context_for_128() -> None:
    classes = [str(cx.abstract_syntax) for cx in AllStoragePresentationContexts]
    assert len(classes) > MAX_CONTEXTS
    got = _proposed(contexts_for({(c, ExplicitVRLittleEndian) for c in classes}))
    assert len(got) == MAX_CONTEXTS
    assert all(tss == NATIVE for _, tss in got)


def test_get_accepts_the_requestors_first_choice() -> None:
    ours = [str(t) for t in STORAGE_TRANSFER_SYNTAXES]
    assert requestor_choice([JPEGBaseline8Bit, ExplicitVRLittleEndian], ours) == JPEGBaseline8Bit
    assert requestor_choice([ImplicitVRLittleEndian, ExplicitVRLittleEndian], ours) == ImplicitVRLittleEndian
    assert requestor_choice([JPEG2000Lossless, ExplicitVRLittleEndian], ours) == JPEG2000Lossless
    assert requestor_choice(["1.2.3.4.5", ExplicitVRLittleEndian], ours) == ExplicitVRLittleEndian


def test_get_accepts_big_endian_or_deflated_first() -> None:
    ours = [str(t) for t in STORAGE_TRANSFER_SYNTAXES]
    # getscu +xb / +xd: we produce both from every decodable instance, so the requestor's first choice wins
    assert requestor_choice([ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian], ours) == ExplicitVRBigEndian
    assert requestor_choice([DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian], ours) == DeflatedExplicitVRLittleEndian
    assert requestor_choice([ExplicitVRBigEndian], ours) == ExplicitVRBigEndian
    # only syntaxes we do not support: pynetdicom's negotiation decides
    assert requestor_choice(["1.2.3.4.5"], ours) is None
