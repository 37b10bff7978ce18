"""Where an archive holds each study: read from the index, for tests of recall, prefetch and fetch."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from xdsi.index.models import FileCopy, Instance, Series, Study


def study_tiers(archive: Any) -> dict[str, set[str]]:
    """Study UID -> the tiers holding a copy of any of its instances."""
    with archive.index.read_session() as s:
        rows = s.execute(
            select(Study.study_uid, FileCopy.tier).join(Series, Series.study_fk == Study.pk)
            .join(Instance, Instance.series_fk == Series.pk).join(FileCopy, FileCopy.instance_fk == Instance.pk)
        ).all()
    out: dict[str, set[str]] = {}
    for uid, tier in rows:
        out.setdefault(uid, set()).add(tier)
    return out
