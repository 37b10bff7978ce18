"""Storage tiers: directories that hold the DICOM files, fastest first.

A tier knows how to place bytes durably (temporary name in the tier's own
``.tmp`` folder, fsync, rename, fsync the directory) and how to read, verify
and delete them.  It knows nothing of the index: callers record what a tier
reports (relative path, size, SHA-256).

Paths are built only from validated UIDs (:func:`instance_path`), never from
request text, so nothing a peer sends can name a file outside the tier.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import os
import shutil
import stat
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

from xdsi.config import StorageSettings, TierSettings
from xdsi.process_tag import process_tag
from xdsi.storage.early_sync import Written, synced_inode
from xdsi.uids import validate_uid

CHUNK = 1 << 20
TMP_DIR = ".tmp"
_TEMP_NAMES = itertools.count()  # Tier.new_temp


@dataclass(frozen=True)
class Placed:
    """What a tier reports about bytes it has made durable."""

    rel_path: str
    size: int
    sha256: str
    path: Path | None = None  # where it now is (absolute, below the tier root), when the tier knows it without looking


class StorageError(OSError):
    pass


class ChecksumMismatch(StorageError):
    pass


def instance_path(study_uid: str, series_uid: str, sop_uid: str) -> str:
    """The relative path of an instance: ``study/series/sop.dcm`` from validated UIDs."""
    return "/".join(
        (
            validate_uid(study_uid, "Study Instance UID"),
            validate_uid(series_uid, "Series Instance UID"),
            validate_uid(sop_uid, "SOP Instance UID") + ".dcm",
        )
    )


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _makedirs_durable(path: Path, stop: Path) -> None:
    """Create ``path`` and fsync each new directory's parent so the entry itself survives a crash."""
    missing: list[Path] = []
    p = path
    while not p.exists() and p != stop:
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:
            continue
        _fsync_dir(d.parent)


def read_chunks(path: Path | str, chunk_size: int = CHUNK) -> Iterator[bytes]:
    """A stored file in chunks, so a response never holds a whole file, let alone a study."""
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_size):
            yield chunk


def sha256_file(path: Path) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def _plain_below(root: str, rel_path: str) -> str | None:
    """``root/rel_path`` when every component is a plain name and none below ``root`` is a symlink, else None.

    What ``realpath`` would return for such a path (``root`` being resolved already), without
    its per-component Python work on the root's own components.  A component that does not
    exist ends the walk: nothing below it can be a symlink, and the caller finds the file missing.
    """
    if not rel_path or rel_path.startswith("/") or "\x00" in rel_path:
        return None
    parts = rel_path.split("/")
    if any(part in ("", ".", "..") for part in parts):
        return None
    cur, exists = root, True
    for part in parts:
        cur = f"{cur}/{part}"
        if exists:
            try:
                if stat.S_ISLNK(os.lstat(cur).st_mode):
                    return None
            except FileNotFoundError:
                exists = False
            except OSError:
                return None
    return cur


class Tier:
    def __init__(self, settings: TierSettings) -> None:
        self.settings = settings
        self.name = settings.name
        self.root = Path(settings.path)
        self.tmp = self.root / TMP_DIR

    def ensure(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(exist_ok=True)

    def abspath(self, rel_path: str) -> Path:
        """The file's absolute path, symlinks resolved; :class:`StorageError` if it would lie outside the tier.

        The usual relative path (plain names, no symlink below the root) is checked with one
        ``lstat`` per component under the once-resolved root instead of a full ``realpath``
        (0.1 ms a file, most of a 200-instance retrieve's set-up); any other form (``..``, a
        symlink, an absolute path) takes the full resolution and its containment check, as before.
        """
        root = self._real_root()
        fast = _plain_below(str(root), rel_path)
        if fast is not None:
            return Path(fast)
        p = (root / rel_path).resolve()
        if p == root or not p.is_relative_to(root):
            raise StorageError(f"path {rel_path!r} escapes tier {self.name}")
        return p

    def _real_root(self) -> Path:
        """The tier root, symlinks resolved once: resolving it again for every file was half of a WADO-RS study's set-up."""
        real = self.__dict__.get("_root_real")
        if real is None:
            real = self.__dict__["_root_real"] = self.root.resolve()
        return real

    def exists(self, rel_path: str) -> bool:
        return self.abspath(rel_path).is_file()

    def new_temp(self, made: bool = True) -> Path:
        """A temporary file name on this tier's file system (so the final rename is atomic).

        Unique without a random draw (a system call per stored instance, issue 14): this process's ID and
        random token and a counter.  ``made``: the temporary folder is made if missing; False (for
        :meth:`_into_temp`, which makes it if the rename finds it gone) spares that ``mkdir``.
        """
        if made:
            self.tmp.mkdir(parents=True, exist_ok=True)
        return self.tmp / f"{process_tag()}-{next(_TEMP_NAMES)}.part"

    def _into_temp(self, src: Path, temp: Path) -> None:
        """``src`` renamed to ``temp`` (made by :meth:`new_temp`), the temporary folder made again if it went."""
        try:
            os.replace(src, temp)
        except FileNotFoundError:
            if not os.path.exists(src):
                raise
            self.tmp.mkdir(parents=True, exist_ok=True)
            os.replace(src, temp)

    def _device(self) -> int:
        """The tier root's device, looked up once (as :meth:`_real_root`)."""
        dev = self.__dict__.get("_root_dev")
        if dev is None:
            dev = self.__dict__["_root_dev"] = os.stat(self.root).st_dev
        return int(dev)

    def _commit_temp(self, temp: Path, rel_path: str, exclusive: bool = False) -> str:
        """Give ``temp`` its final name (durably); returns the relative path it got.

        ``exclusive``: never replace a file already at ``rel_path`` (another
        store of the same instance may have placed it and not yet indexed it:
        replacing it, and then deleting "our" copy when that store wins the
        index, would lose the instance it acknowledged).  The file is placed
        beside it under a unique name instead.
        """
        return self._commit_temp_at(temp, rel_path, exclusive)[0]

    def _commit_temp_at(self, temp: Path, rel_path: str, exclusive: bool = False) -> tuple[str, Path]:
        """:meth:`_commit_temp`, and the file's absolute path."""
        final = self.abspath(rel_path)
        _makedirs_durable(final.parent, self.root)
        if exclusive:
            try:
                rel_path, final = _link_exclusive(temp, final, rel_path, self)
            except _NoHardLinks:
                os.replace(temp, final)
        else:
            os.replace(temp, final)
        _fsync_dir(final.parent)
        return rel_path, final

    def place_file(self, src: Path, rel_path: str, *, move: bool = False, exclusive: bool = False,
                   written: Written | None = None) -> Placed:
        """Make the bytes of ``src`` durable at ``rel_path`` (``exclusive``: see :meth:`_commit_temp`).

        With ``move`` and ``src`` on the same file system the file is renamed
        rather than copied: the incoming C-STORE spool becomes the stored file
        without a second write.  ``written``: size and sha256 of the bytes as
        whoever wrote ``src`` hashed them while writing, and the fsync it
        started (the direct C-STORE reader, :mod:`xdsi.storage.early_sync`):
        the file is not read again only to hash it, and is synced again only
        if that fsync failed or covered another file; a file whose size is not
        that size is hashed from disk and synced as before.
        """
        try:
            src_stat = os.stat(src) if move else None
        except FileNotFoundError:
            src_stat = None
        if src_stat is not None and src_stat.st_dev == self._device():
            size, digest = _fsync_and_hash(src, written, src_stat)
            temp = self.new_temp(made=False)
            self._into_temp(src, temp)  # take ownership first: the spool's owner may unlink its name
            try:
                rel_path, final = self._commit_temp_at(temp, rel_path, exclusive)
            except BaseException:
                temp.unlink(missing_ok=True)
                raise
            return Placed(rel_path, size, digest, final)
        with open(src, "rb") as fh:
            return self.place_stream(fh, rel_path, exclusive=exclusive)

    def place_stream(self, stream: BinaryIO | Iterable[bytes], rel_path: str, *, exclusive: bool = False) -> Placed:
        temp = self.new_temp()
        h = hashlib.sha256()
        size = 0
        try:
            with open(temp, "wb") as out:
                chunks = iter(lambda: stream.read(CHUNK), b"") if hasattr(stream, "read") else stream  # type: ignore[union-attr]
                for chunk in chunks:
                    out.write(chunk)
                    h.update(chunk)
                    size += len(chunk)
                out.flush()
                os.fsync(out.fileno())
            rel_path = self._commit_temp(temp, rel_path, exclusive)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        return Placed(rel_path, size, h.hexdigest())

    def copy_from(self, other: "Tier", rel_path: str, expected_sha256: str) -> Placed:
        """Copy a file from another tier and verify it against the index's checksum before it counts."""
        with open(other.abspath(rel_path), "rb") as fh:
            placed = self.place_stream(fh, rel_path)
        if placed.sha256 != expected_sha256:
            self.delete(rel_path)
            raise ChecksumMismatch(
                f"{rel_path}: copy from {other.name} to {self.name} has sha256 {placed.sha256}, index says {expected_sha256}"
            )
        return placed

    def verify(self, rel_path: str, expected_sha256: str) -> bool:
        try:
            return sha256_file(self.abspath(rel_path))[1] == expected_sha256
        except FileNotFoundError:
            return False

    def open(self, rel_path: str) -> BinaryIO:
        return open(self.abspath(rel_path), "rb")

    def delete(self, rel_path: str) -> None:
        p = self.abspath(rel_path)
        p.unlink(missing_ok=True)
        # prune empty series/study folders, never the tier root
        for d in (p.parent, p.parent.parent):
            if d == self.root or self.root not in d.parents:
                break
            try:
                d.rmdir()
            except OSError:
                break

    def clean_temp(self) -> int:
        """Delete leftovers of writes that a crash interrupted; returns how many."""
        n = 0
        if self.tmp.is_dir():
            for p in self.tmp.iterdir():
                if p.is_file():
                    p.unlink(missing_ok=True)
                    n += 1
        return n

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free


class _NoHardLinks(Exception):
    """The tier's file system cannot make hard links: fall back to rename (replacing)."""


def _link_exclusive(temp: Path, final: Path, rel_path: str, tier: "Tier") -> tuple[str, Path]:
    """Name ``temp`` ``final`` unless that name exists, else a unique name beside it; then drop ``temp``'s name.

    ``link`` + ``unlink`` is the portable rename that refuses to replace
    (``renameat2(RENAME_NOREPLACE)`` is not in Python's ``os``).
    """
    try:
        os.link(temp, final)
    except FileExistsError:
        rel_path = f"{rel_path[: -len('.dcm')] if rel_path.endswith('.dcm') else rel_path}.{uuid.uuid4().hex[:8]}.dcm"
        final = tier.abspath(rel_path)
        os.link(temp, final)
    except OSError as exc:
        if exc.errno in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.ENOSYS):
            raise _NoHardLinks() from exc
        raise
    os.unlink(temp)
    return rel_path, final


def _fsync_and_hash(path: Path, written: Written | None = None, st: os.stat_result | None = None) -> tuple[int, str]:
    """The file's size and sha256, once its bytes are on disk.

    ``written`` (with ``st``, the file's ``stat``): what the receiver hashed and the fsync it started; when that
    covered this very file (size and inode), nothing is opened or read (an open, ``fstat`` and close per stored
    instance fewer, issue 14).
    """
    if written is not None and st is not None and st.st_size == written.size \
            and synced_inode(written) == (st.st_dev, st.st_ino):
        return written.size, written.sha256
    h = hashlib.sha256()
    size = 0
    with open(path, "rb+") as fh:
        if written is not None:
            st = os.fstat(fh.fileno())
            if st.st_size == written.size:
                if synced_inode(written) != (st.st_dev, st.st_ino):
                    os.fsync(fh.fileno())
                return written.size, written.sha256
        while chunk := fh.read(CHUNK):
            h.update(chunk)
            size += len(chunk)
        os.fsync(fh.fileno())
    return size, h.hexdigest()


class TierSet:
    """The ordered tiers of one archive; index 0 is the hot cache."""

    def __init__(self, settings: StorageSettings) -> None:
        self.settings = settings
        self.tiers = [Tier(t) for t in settings.tiers]
        self._by_name = {t.name: t for t in self.tiers}

    @property
    def hot(self) -> Tier:
        return self.tiers[0]

    def __getitem__(self, name: str) -> Tier:
        return self._by_name[name]

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.tiers)

    def rank(self, name: str) -> int:
        return self.tiers.index(self._by_name[name])

    def next_after(self, name: str) -> Tier | None:
        i = self.rank(name)
        return self.tiers[i + 1] if i + 1 < len(self.tiers) else None

    def ensure(self) -> None:
        for t in self.tiers:
            t.ensure()

    def clean_temp(self) -> int:
        return sum(t.clean_temp() for t in self.tiers)
