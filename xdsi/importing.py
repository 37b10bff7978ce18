"""What ``xdsi import`` finds under the paths it is given, and an honest reason for what it cannot take.

A tree copied from a CD, a PACS export or a user's home folder holds more than instances:
DICOMDIRs, README files, dangling symlinks, folders we may not read, symlinks that lead back
to a parent.  None of these may stop the import or send it round in circles, and the reason
printed for each must be the true one: pydicom force-reading a text file reports "elements
extend to byte 1818838568", which sends people looking for a truncated download.

The decisions, in order:

* The walk follows symlinked folders (a tree of links is a common way to gather studies) but
  never enters a folder twice: a link back to a folder on the current path is a *directory
  loop*, a second way into a folder already read is reported once and skipped.  The archive's
  own data directory is never imported into itself.
* Only regular files are opened (a FIFO would block the import forever).
* A file with the Part 10 ``DICM`` prefix is parsed in full by the store path.  A file whose
  File Meta Information names the Media Storage Directory SOP Class is a DICOMDIR, an index of
  a medium rather than an instance.
* A file without the prefix may still be DICOM: a bare dataset, as some modalities and
  pydicom's own test files write it.  pydicom reads those only with ``force=True``; we try the
  same when the file starts the way a dataset does (an element of a low, even group such as
  0008 in either byte order) and store it if it parses into a valid instance.  Anything else
  is "not DICOM (no DICM prefix)" without parsing: force-reading arbitrary bytes (a video, a
  zero-filled image) can take long and yields only a misleading reason.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from pydicom.filereader import read_file_meta_info

__all__ = ["Found", "walk", "examine", "rejection", "DICOMDIR_SOP_CLASS"]

DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"  # Media Storage Directory Storage (PS3.4 Annex F)
PREAMBLE = 128
_DATASET_FIRST_GROUPS = frozenset(range(0x0002, 0x0030 + 1, 2))  # meta, directory, identifying, patient ... image


@dataclass(frozen=True)
class Found:
    """A path met during the walk: a regular file to read (``problem`` empty) or a reason to skip it.

    ``unreadable``: the path may well hold an instance that could not be read (permission
    denied, an I/O error), so the import as a whole did not do all it was asked.
    """

    path: Path
    problem: str = ""
    unreadable: bool = False


def _strerror(exc: OSError) -> str:
    text = exc.strerror or str(exc)
    return text[:1].lower() + text[1:]


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _stat(path: Path) -> os.stat_result | Found:
    """The target's stat, or why there is nothing to read at ``path``."""
    try:
        lst = os.lstat(path)
    except FileNotFoundError:
        return Found(path, "no such file or folder")
    except PermissionError:
        return Found(path, "permission denied", unreadable=True)
    except OSError as exc:
        return Found(path, f"cannot read: {_strerror(exc)}", unreadable=True)
    if not stat.S_ISLNK(lst.st_mode):
        return lst
    try:
        return os.stat(path)
    except FileNotFoundError:
        try:
            target = os.readlink(path)
        except OSError:
            target = "?"
        return Found(path, f"dangling symlink (to {target})")
    except PermissionError:
        return Found(path, "permission denied", unreadable=True)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return Found(path, "symlink loop (too many levels of symbolic links)")
        return Found(path, f"cannot read: {_strerror(exc)}", unreadable=True)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def walk(paths: Iterable[Path], skip_dirs: Iterable[Path] = ()) -> Iterator[Found]:
    """Every path under ``paths``, depth first in name order (symlinks after real entries), each folder read once.

    ``skip_dirs``: folders never to enter (the archive's own data directory).
    """
    skip = {i for i in map(_identity, skip_dirs) if i is not None}
    seen: dict[tuple[int, int], Path] = {}
    for top in paths:
        # stack of (path, identities of the folders above it on this path)
        stack: list[tuple[Path, tuple[tuple[int, int], ...]]] = [(Path(top), ())]
        while stack:
            path, above = stack.pop()
            st = _stat(path)
            if isinstance(st, Found):
                yield st
                continue
            if stat.S_ISREG(st.st_mode):
                yield Found(path)
                continue
            if not stat.S_ISDIR(st.st_mode):
                yield Found(path, f"not a regular file ({_kind(st.st_mode)})")
                continue
            ident = (st.st_dev, st.st_ino)
            if ident in above:
                yield Found(path, f"directory loop: leads back to {seen.get(ident, 'a folder above it')}")
                continue
            if ident in skip:
                yield Found(path, "the archive's own data directory")
                continue
            if ident in seen:
                yield Found(path, f"same folder as {seen[ident]}, already read")
                continue
            seen[ident] = path
            try:
                names = sorted(os.listdir(path))
            except PermissionError:
                yield Found(path, "permission denied (folder)", unreadable=True)
                continue
            except OSError as exc:
                yield Found(path, f"cannot read folder: {_strerror(exc)}", unreadable=True)
                continue
            # real entries before symlinks: a folder is read under its own name, an alias to it is the one skipped
            ordered = [n for n in names if not os.path.islink(path / n)] + [n for n in names if os.path.islink(path / n)]
            stack.extend((path / name, above + (ident,)) for name in reversed(ordered))


@dataclass(frozen=True)
class Examined:
    """The first bytes of a file, and a reason to skip it before the store path parses it, if any."""

    head: bytes = b""
    skip: str = ""
    unreadable: bool = False

    @property
    def part10(self) -> bool:
        return self.head[PREAMBLE : PREAMBLE + 4] == b"DICM"


def looks_like_dataset(head: bytes) -> bool:
    """Does the file start the way a bare (preamble-less) dataset does: a low, even group, either byte order?"""
    if len(head) < 8:
        return False
    return any(int.from_bytes(head[0:2], order) in _DATASET_FIRST_GROUPS for order in ("little", "big"))  # type: ignore[arg-type]


def examine(path: Path) -> Examined:
    """Open the file and decide what can be decided without parsing the dataset."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(PREAMBLE + 4)
    except PermissionError:
        return Examined(skip="permission denied", unreadable=True)
    except OSError as exc:
        return Examined(skip=f"cannot read: {_strerror(exc)}", unreadable=True)
    ex = Examined(head=head)
    if ex.part10:
        try:
            meta = read_file_meta_info(path)
        except Exception:  # a malformed meta group: the store path gives the precise reason
            return ex
        if str(meta.get("MediaStorageSOPClassUID", "")) == DICOMDIR_SOP_CLASS:
            return Examined(head=head, skip="DICOMDIR: a media directory, not an instance")
        return ex
    if not looks_like_dataset(head):
        return Examined(head=head, skip="not DICOM (no DICM prefix)")
    return ex


_MISSING_UID = re.compile(r"^(.+ UID) None is not a valid DICOM UID$")


def rejection(ex: Examined, reason: str) -> str:
    """The reason to print for a file the store path refused."""
    m = _MISSING_UID.match(reason)
    if m:
        reason = f"no {m.group(1)}: not an instance that can be archived"
    if ex.part10:
        return reason
    return f"no DICM prefix, read as a bare dataset: {reason}"
