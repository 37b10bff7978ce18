"""The per-association copy of our presentation contexts equals pynetdicom's deepcopy, and is independent of the original."""

from __future__ import annotations

import copy

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.presentation import AllStoragePresentationContexts, PresentationContext

from xdsi.dimse import cheap_contexts


def _fields(cxs: list[PresentationContext]) -> list[tuple]:  # type: ignore[type-arg]
    return [(c.abstract_syntax, c.transfer_syntax, c.context_id, c.result, c.as_scu, c.as_scp, c.scu_role, c.scp_role) for c in cxs]


def test_cheap_copy_equals_deepcopy_and_is_independent() -> None:
    ae = AE()
    for cx in AllStoragePresentationContexts[:20]:
        ae.add_supported_context(cx.abstract_syntax, [ExplicitVRLittleEndian, ImplicitVRLittleEndian], scu_role=True, scp_role=True)
    reference = copy.deepcopy(ae.supported_contexts)
    assert cheap_contexts.applicable()
    assert cheap_contexts.make_cheap(ae._supported_contexts.values()) == 20
    cheap = copy.deepcopy(ae.supported_contexts)
    assert all(type(c) is cheap_contexts.CheapCopyContext for c in cheap)
    assert _fields(cheap) == _fields(reference)
    cheap[0].transfer_syntax = [ImplicitVRLittleEndian]  # what negotiation does to the association's copy
    cheap[0].context_id = 7
    assert ae.supported_contexts[0].transfer_syntax == [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
    assert ae.supported_contexts[0].context_id is None
