"""Removing archived instances: index rows first, then the files.

Used by ``xdsi delete``. A published study whose instances are deleted gets
its manifest replaced or deprecated by the publisher (RAD TF-3 4.68 / FACTS
§3.5), which watches the study's ``updated_at``. Rows are deleted and the study's ``updated_at`` is stamped in one transaction
(the publisher's change clock), empty series and studies are pruned, and the
files are deleted only after the commit, so a crash leaves at worst an
unindexed file, never an index row without its file.
"""

from __future__ import annotations

import logging
from typing import Iterable

from sqlalchemy import select

from xdsi.index.catalog import prune_empty, utcnow
from xdsi.index.db import Index
from xdsi.index.models import FileCopy, Instance, Series, Study
from xdsi.storage.tiers import TierSet

log = logging.getLogger(__name__)


class RemoveService:
    def __init__(self, index: Index, tiers: TierSet) -> None:
        self.index = index
        self.tiers = tiers

    def remove(self, sop_instance_uids: Iterable[str]) -> int:
        uids = list(sop_instance_uids)
        doomed: list[tuple[str, str]] = []
        removed = 0
        with self.index.session() as s:
            for i in range(0, len(uids), 500):
                rows = s.execute(
                    select(Instance, Series.study_fk).join(Series, Instance.series_fk == Series.pk).where(Instance.sop_instance_uid.in_(uids[i : i + 500]))
                ).all()
                for inst, study_pk in rows:
                    doomed += [(c.tier, c.rel_path) for c in s.scalars(select(FileCopy).where(FileCopy.instance_fk == inst.pk))]
                    series_pk = inst.series_fk
                    study = s.get(Study, study_pk)
                    if study is not None:
                        study.updated_at = utcnow()
                    s.delete(inst)
                    s.flush()
                    prune_empty(s, series_pk)
                    s.flush()
                    removed += 1
        for tier, rel in doomed:
            if tier in self.tiers:
                try:
                    self.tiers[tier].delete(rel)
                except OSError as exc:
                    log.warning("could not delete %s on %s: %s", rel, tier, exc)
        return removed
