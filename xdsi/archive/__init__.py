"""Archive services: store, query, retrieve and the tier policy, wired to one index and one set of tiers."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from xdsi.archive.commitment import CommitmentService
from xdsi.archive.lifecycle import TierPolicy
from xdsi.archive.metadata import MetadataService
from xdsi.archive.query import QueryService
from xdsi.archive.remove import RemoveService
from xdsi.archive.retrieve import RetrieveService
from xdsi.archive.store import StoreService
from xdsi.config import Settings
from xdsi.index.db import Index, open_index
from xdsi.storage.tiers import TierSet

log = logging.getLogger(__name__)


@dataclass
class Archive:
    """Everything an adapter (DIMSE, SOAP, web) needs, built once per process."""

    settings: Settings
    index: Index
    tiers: TierSet
    store: StoreService
    query: QueryService
    retrieve: RetrieveService
    policy: TierPolicy
    commitment: CommitmentService
    remove: RemoveService
    metadata: MetadataService | None = None  # per-series DICOM JSON for WADO-RS metadata
    audit: Any = None  # the ATNA audit trail (xdsi.audit.AuditTrail), set by xdsi.server when [audit] is configured

    @classmethod
    def open(cls, settings: Settings, *, clean: bool = True) -> "Archive":
        """Open the index (upgrading its schema) and the tiers.

        ``clean`` removes temporary files that a crash left behind: they were
        never acknowledged, so nothing is lost by deleting them.
        """
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        settings.temp_dir.mkdir(parents=True, exist_ok=True)
        from xdsi.installation import resolve

        settings = resolve(settings)  # identifiers not configured: this installation's, from the data dir (issue 11)
        index = open_index(settings.effective_index_url)
        tiers = TierSet(settings.effective_storage)
        tiers.ensure()
        if clean:
            n = tiers.clean_temp()
            for p in settings.temp_dir.iterdir():
                if p.is_file():
                    p.unlink(missing_ok=True)
                    n += 1
            if n:
                log.warning("removed %d temporary file(s) left by an interrupted write", n)
        retrieve = RetrieveService(settings, index, tiers)
        archive = cls(
            settings=settings,
            index=index,
            tiers=tiers,
            store=StoreService(settings, index, tiers),
            query=QueryService(index, settings.ae_title),
            retrieve=retrieve,
            policy=TierPolicy(index, tiers),
            commitment=CommitmentService(retrieve, tiers),
            remove=RemoveService(index, tiers),
        )
        # the services that audit themselves (deletes, tier moves) find the trail the server or CLI set on the archive
        archive.remove.audit_trail = archive.policy.audit_trail = lambda: archive.audit
        archive.metadata = MetadataService(settings, archive.retrieve)
        archive.store.metadata = archive.metadata  # the store path hands it the data set it parsed
        return archive

    def close(self) -> None:
        self.store.committer.close()
        self.index.dispose()
