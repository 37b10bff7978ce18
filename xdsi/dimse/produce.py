"""Getting an instance in a transfer syntax a DIMSE peer accepted: ``archive.retrieve.produce``.

The DIMSE adapter never holds a Path: it asks the retrieval service for
"instance X for a peer that accepts these transfer syntaxes, in this order"
and gets a :class:`Produced` (chosen syntax, size, and the one file pynetdicom's
chunked C-STORE sender streams from).  Everything that can fail (recall from a
cold tier, decoding, re-encoding) fails inside :func:`produce`, before a
C-STORE request is sent, so a failure is a clean failed sub-operation.

# INTEGRATOR (issue 8): STAND-IN until branch ``retr`` lands
``RetrieveService.produce(ref, accepted)`` is written on branch ``retr``.
:func:`produce` calls it when the service has it; otherwise it falls back to
:func:`_stand_in_produce` below, which has the same signature and semantics
(the contract in /work/wt/CONTRACT.md), built on ``transcode.choose`` and
``transcode.write_converted`` (or, before branch ``conv`` lands,
``transcode.converted`` + ``save_as``).  After merging ``retr``, delete
``_stand_in_produce``, ``_StandInProduced``, ``_facts_kwargs`` and
``_write_converted`` and make :func:`produce` a plain call.
"""

from __future__ import annotations

import io
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Protocol, Sequence

from pydicom import dcmread

from xdsi.archive import transcode
from xdsi.archive import retrieve as retrieve_module

log = logging.getLogger(__name__)

CHUNK = 256 * 1024

# retr's CannotProvide when it exists; the same meaning (LookupError) until then
CannotProvide: type[LookupError] = getattr(retrieve_module, "CannotProvide", None) or type(
    "CannotProvide", (LookupError,), {"__doc__": "No accepted transfer syntax can be produced for this instance."}
)


class Produced(Protocol):
    """What ``archive.retrieve.produce`` returns (CONTRACT.md)."""

    transfer_syntax: str
    size: int
    unchanged: bool

    def file_path(self) -> Path: ...
    def chunks(self, chunk_size: int = ...) -> Iterator[bytes]: ...
    def close(self) -> None: ...
    def __enter__(self) -> "Produced": ...
    def __exit__(self, *exc: object) -> None: ...


def produce(retrieve: Any, ref: Any, accepted: Sequence[str]) -> Produced:
    """``retrieve.produce(ref, accepted)``; the stand-in while the service has none (see module docstring)."""
    real = getattr(retrieve, "produce", None)
    if real is not None:
        return real(ref, accepted)  # type: ignore[no-any-return]
    return _stand_in_produce(retrieve, ref, accepted)


# ---- STAND-IN (delete after merging retr) -------------------------------------------------------


@dataclass
class _StandInProduced:
    transfer_syntax: str
    size: int
    unchanged: bool
    _path: Path
    _spool: bool = False
    _closed: bool = field(default=False, repr=False)

    def file_path(self) -> Path:
        return self._path

    def chunks(self, chunk_size: int = CHUNK) -> Iterator[bytes]:
        try:
            with open(self._path, "rb") as fh:
                while b := fh.read(chunk_size):
                    yield b
        finally:
            self.close()

    def close(self) -> None:
        if self._spool and not self._closed:
            self._closed = True
            try:
                os.unlink(self._path)
            except FileNotFoundError:
                pass

    def __enter__(self) -> "_StandInProduced":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _facts_kwargs(path: Path) -> dict[str, Any]:
    """The pixel facts ``choose`` needs to consider compressed targets, from the header only."""
    facts = getattr(transcode, "facts", None)
    if facts is not None:  # conv's API: choose(stored, accepted, facts)
        return {"facts": facts(path)}
    ds = dcmread(path, stop_before_pixels=False, defer_size=1024, specific_tags=["PixelData", "SamplesPerPixel", "BitsAllocated"])
    return {
        "has_pixel_data": "PixelData" in ds,
        "samples_per_pixel": int(ds.get("SamplesPerPixel", 1) or 1),
        "bits_allocated": int(ds.get("BitsAllocated", 16) or 16),
    }


def _write_converted(path: Path, target: str, out: BinaryIO) -> None:
    """The instance re-encoded in ``target`` as a Part 10 file; TranscodeError for anything undecodable."""
    write = getattr(transcode, "write_converted", None)
    if write is not None:  # conv's API
        write(path, target, out)
        return
    ds = transcode.converted(path, target)
    try:
        ds.save_as(out, enforce_file_format=True)
    except Exception as exc:  # pydicom refuses e.g. big endian -> little endian here (fixed on branch conv)
        raise transcode.TranscodeError(f"cannot write as {target}: {exc.__class__.__name__}: {exc}") from exc


def choose_for(path: Path, stored_ts: str, accepted: Sequence[str]) -> Any:
    """``transcode.choose``, reading the header only when the cheap answer (unchanged / native) is none."""
    choice = transcode.choose(stored_ts, list(accepted))
    if choice is None:
        choice = transcode.choose(stored_ts, list(accepted), **_facts_kwargs(path))
    return choice


def convert_to_file(path: Path, target: str, spool_dir: Path) -> Path:
    """Spool the converted instance fully (so every failure happens before anything is announced)."""
    spool_dir.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix="dimse-", suffix=".dcm", dir=spool_dir)
    try:
        with os.fdopen(fd, "wb") as out:
            _write_converted(path, target, out)
    except BaseException:
        os.unlink(name)
        raise
    return Path(name)


def _stand_in_produce(retrieve: Any, ref: Any, accepted: Sequence[str]) -> _StandInProduced:
    """STAND-IN for ``RetrieveService.produce`` (branch retr): same signature and semantics."""
    path = retrieve.path(ref)  # NotAvailable / OSError: no tier can deliver it
    stored = ref.transfer_syntax_uid
    choice = choose_for(path, stored, accepted)
    if choice is None:
        raise CannotProvide(f"{ref.sop_instance_uid}: stored as {stored}, none of {', '.join(accepted)} can be produced")
    if choice.unchanged:
        return _StandInProduced(choice.transfer_syntax, path.stat().st_size, True, path)
    spooled = convert_to_file(path, choice.transfer_syntax, Path(retrieve.settings.temp_dir))
    return _StandInProduced(choice.transfer_syntax, spooled.stat().st_size, False, spooled, _spool=True)


def converted_dataset(path: Path, stored_ts: str, accepted: Sequence[str]):  # type: ignore[no-untyped-def]
    """What a DIMSE peer accepting ``accepted`` would receive, as a Dataset (for the identity unit test)."""
    choice = choose_for(path, stored_ts, accepted)
    if choice is None:
        raise CannotProvide(f"none of {', '.join(accepted)} can be produced from {stored_ts}")
    if choice.unchanged:
        return dcmread(path)
    buf = io.BytesIO()
    _write_converted(path, choice.transfer_syntax, buf)
    buf.seek(0)
    return dcmread(buf)
