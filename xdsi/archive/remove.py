"""Removing archived instances: index rows first, then the files.

Used by ``xdsi delete``. A published study whose instances are deleted gets
its manifest replaced or deprecated by the publisher (RAD TF-3 4.68 / FACTS
§3.5), which watches the study's ``updated_at``. Rows are deleted and the study's ``updated_at`` is stamped in one transaction
(the publisher's change clock), empty series and studies are pruned, and the
files are deleted only after the commit, so a crash leaves at worst an
unindexed file, never an index row without its file.

Every removal is audited here, in the service, so no caller can forget it (issue 12):
per study, DICOM Study Deleted when the study is gone, DICOM Instances Accessed (action D)
when part of it remains (:mod:`xdsi.audit.lifecycle`).  What the audit needs (study, patient,
SOP classes) is collected in the same transaction, and only when auditing is on.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any, Callable, Iterable, Sequence

from sqlalchemy import select

from xdsi.index.catalog import prune_empty, utcnow
from xdsi.index.db import Index
from xdsi.index.models import FileCopy, Instance, Patient, Series, Study
from xdsi.storage.tiers import TierSet

log = logging.getLogger(__name__)


class RemoveService:
    def __init__(self, index: Index, tiers: TierSet) -> None:
        self.index = index
        self.tiers = tiers
        # the archive's audit trail (or None), asked at each removal; wired by Archive.open
        self.audit_trail: Callable[[], Any] = lambda: None

    def remove(self, sop_instance_uids: Iterable[str], actors: Sequence[Any] = ()) -> int:
        """Remove these instances; returns how many were removed.

        ``actors`` are the audit participants who asked (``xdsi.audit.messages.Participant``:
        the person and/or process, e.g. ``xdsi delete`` names the operator and itself);
        by default the audit names this process.
        """
        uids = list(sop_instance_uids)
        trail = self.audit_trail()
        audited = trail is not None and trail.enabled
        from xdsi.audit.lifecycle import RemovedStudy

        studies: dict[int, RemovedStudy] = {}
        doomed: list[tuple[str, str, int]] = []
        removed = 0
        with self.index.session() as s:
            for i in range(0, len(uids), 500):
                rows = s.execute(
                    select(Instance, Series.study_fk).join(Series, Instance.series_fk == Series.pk).where(Instance.sop_instance_uid.in_(uids[i : i + 500]))
                ).all()
                for inst, study_pk in rows:
                    doomed += [(c.tier, c.rel_path, study_pk) for c in s.scalars(select(FileCopy).where(FileCopy.instance_fk == inst.pk))]
                    series_pk = inst.series_fk
                    study = s.get(Study, study_pk)
                    if study is not None:
                        study.updated_at = utcnow()
                        if audited:
                            if study_pk not in studies:
                                patient = s.get(Patient, study.patient_fk) if study.patient_fk is not None else None
                                studies[study_pk] = RemovedStudy(study.study_uid, str(patient.patient_id or "") if patient else "", Counter())
                            studies[study_pk].sop_classes[inst.sop_class_uid] += 1
                    s.delete(inst)
                    s.flush()
                    prune_empty(s, series_pk)
                    s.flush()
                    removed += 1
            for study_pk, gone in studies.items():
                gone.whole_study = s.get(Study, study_pk) is None  # pruned: nothing of it is left
        for tier, rel, study_pk in doomed:
            if tier in self.tiers:
                try:
                    self.tiers[tier].delete(rel)
                except OSError as exc:
                    log.warning("could not delete %s on %s: %s", rel, tier, exc)
                    if study_pk in studies:
                        studies[study_pk].files_left.append(f"{tier}:{rel}")
        if audited:
            from xdsi.audit.lifecycle import removed as audit_removed

            audit_removed(trail, list(studies.values()), actors)
        return removed
