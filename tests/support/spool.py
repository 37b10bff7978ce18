"""The spool files of a folder that hold (or are about to hold) a transfer, for leftover checks.

Not the empty files a running server keeps made ahead for its next C-STOREs (``xdsi.dimse.spool_ahead.waiting``:
empty, and named as only that module names them): they hold no data and are there by design while it runs, and
``xdsi status`` does not count them either.
"""

from __future__ import annotations

from pathlib import Path

from xdsi.dimse import spool_ahead


def spool_files(folder: Path, pattern: str = "*", recursive: bool = False) -> list[Path]:
    """Files under ``folder`` matching ``pattern`` (``recursive``: in subfolders too), sorted, but the ones made ahead."""
    if not folder.is_dir():
        return []
    found = []
    for p in sorted(folder.rglob(pattern) if recursive else folder.glob(pattern)):
        try:
            if p.is_file() and not spool_ahead.waiting(p.name, p.stat().st_size):
                found.append(p)
        except FileNotFoundError:  # removed while we looked
            pass
    return found
