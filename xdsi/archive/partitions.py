"""The archives of one process: the main AE title and each configured partition.

Each partition is opened as a complete :class:`Archive` from
``Settings.for_partition`` (own index database, own tiers, own metadata
journals), so nothing in the services needs to know partitions exist and a
query in one partition cannot see another's rows.
"""

from __future__ import annotations

from typing import Iterator, Mapping

from xdsi.archive import Archive


class Partitions(Mapping[str, Archive]):
    """AE title -> Archive; the main archive is included under its own AE title."""

    def __init__(self, main: Archive, others: Mapping[str, Archive]) -> None:
        self.main = main
        self._by_aet: dict[str, Archive] = {main.settings.ae_title: main, **dict(others)}

    @classmethod
    def open(cls, main: Archive, *, clean: bool = True) -> "Partitions":
        """``clean``: as :meth:`Archive.open` (False in a worker of ``xdsi serve --workers N``)."""
        s = main.settings
        opened: dict[str, Archive] = {}
        try:
            for name in s.partitions:
                ps = s.for_partition(name)
                opened[ps.ae_title] = Archive.open(ps, clean=clean)
        except BaseException:
            for a in opened.values():
                a.close()
            raise
        return cls(main, opened)

    def __getitem__(self, aet: str) -> Archive:
        return self._by_aet[aet]

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_aet)

    def __len__(self) -> int:
        return len(self._by_aet)

    def extra(self) -> dict[str, Archive]:
        """The partitions other than the main archive."""
        return {k: v for k, v in self._by_aet.items() if v is not self.main}

    def close_extra(self) -> None:
        for a in self.extra().values():
            a.close()
