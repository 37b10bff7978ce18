"""Presentation contexts that pynetdicom copies per association without re-validating every UID.

Why: for every accepted connection pynetdicom's ``RequestHandler._create_association`` deep-copies the
listener's presentation contexts (``deepcopy(server.contexts)``); for our 178 contexts (every storage
SOP class with 13 transfer syntaxes, the query/retrieve models) that rebuilt and re-validated ~2,500
UIDs: 15.7 ms of CPU per association, about a tenth of Orthanc's whole C-GET of a 200-instance study.
A :class:`PresentationContext` holds immutable values (UIDs are ``str``, flags and IDs) and one list
(the transfer syntaxes): copying the attributes and that list is the same copy.
"""

from __future__ import annotations

from typing import Any

from pynetdicom.presentation import PresentationContext

# the attributes pynetdicom 3.0 gives a context; if a later version adds one, contexts keep deepcopy
KNOWN = frozenset(("_context_id", "_abstract_syntax", "_transfer_syntax", "result", "_scu_role", "_scp_role", "_as_scp", "_as_scu"))


class CheapCopyContext(PresentationContext):
    """A :class:`PresentationContext` whose deep copy shares the immutable values and copies the syntax list."""

    def __deepcopy__(self, memo: dict[int, Any]) -> "CheapCopyContext":
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new._transfer_syntax = list(self._transfer_syntax)
        memo[id(self)] = new
        return new


def applicable() -> bool:
    return set(PresentationContext().__dict__) == KNOWN


def make_cheap(contexts: Any) -> int:
    """Turn the AE's supported contexts (``ae._supported_contexts.values()``) into :class:`CheapCopyContext`; how many."""
    if not applicable():
        return 0
    n = 0
    for cx in contexts:
        if type(cx) is PresentationContext and set(cx.__dict__) == KNOWN:
            cx.__class__ = CheapCopyContext
            n += 1
    return n
