"""Storage commitment (PS3.4 J): may a sender delete its copy of an instance?

Only when the index has the instance with the same SOP Class and at least one
indexed copy whose file is on its tier with the recorded size.  The DIMSE
adapter turns the answer into an N-EVENT-REPORT; this module knows no DICOM
status codes.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Iterable

from xdsi.archive.retrieve import InstanceRef, RetrieveService
from xdsi.storage.tiers import StorageError, TierSet
from xdsi.uids import is_valid_uid

BATCH = 500


class CommitFailure(enum.Enum):
    NO_SUCH_INSTANCE = "no such instance"
    CLASS_CONFLICT = "stored with another SOP class"
    NOT_DURABLE = "no stored copy on disk"


@dataclass(frozen=True)
class CommitCheck:
    sop_class_uid: str
    sop_instance_uid: str
    failure: CommitFailure | None

    @property
    def committed(self) -> bool:
        return self.failure is None


class CommitmentService:
    def __init__(self, retrieve: RetrieveService, tiers: TierSet) -> None:
        self.retrieve = retrieve
        self.tiers = tiers

    def check(self, refs: Iterable[tuple[str, str]]) -> list[CommitCheck]:
        """One answer per (SOP Class UID, SOP Instance UID), in the order asked."""
        refs = [(str(c).strip(), str(u).strip()) for c, u in refs]
        valid = sorted({u for c, u in refs if is_valid_uid(c) and is_valid_uid(u)})
        found: dict[str, InstanceRef] = {}
        for i in range(0, len(valid), BATCH):
            for ref in self.retrieve.select(sop_uids=valid[i : i + BATCH]):
                found[ref.sop_instance_uid] = ref
        out = []
        for sop_class, sop_uid in refs:
            ref = found.get(sop_uid) if is_valid_uid(sop_class) else None
            if ref is None:
                failure: CommitFailure | None = CommitFailure.NO_SUCH_INSTANCE
            elif ref.sop_class_uid != sop_class:
                failure = CommitFailure.CLASS_CONFLICT
            elif not any(self._on_disk(tier, rel, size) for tier, rel, size, _sha in ref.copies):
                failure = CommitFailure.NOT_DURABLE
            else:
                failure = None
            out.append(CommitCheck(sop_class, sop_uid, failure))
        return out

    def _on_disk(self, tier: str, rel_path: str, size: int) -> bool:
        if tier not in self.tiers:
            return False
        try:
            return self.tiers[tier].abspath(rel_path).stat().st_size == size
        except (OSError, StorageError):
            return False
