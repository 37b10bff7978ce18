"""Per-series instance metadata (DICOM JSON without bulk data) for WADO-RS ``/metadata``.

A viewer opening a 1,000-instance study asks for the whole study's metadata
first; answering that by parsing 1,000 files per request does not scale.  So
each stored instance's header is converted to DICOM JSON once, at store time,
and appended to a per-series journal ``<study>/<series>.jsonl.gz`` in
``<data_dir>/metadata`` (its own :class:`~xdsi.storage.tiers.Tier`, apart
from the DICOM tiers so tier migration and verification never see it).

Each journal line is ``SOP UID <TAB> SHA-256 of the stored file <TAB> JSON``
and is written as one gzip member with a single ``O_APPEND`` write, so
concurrent stores into one series do not interleave and C-STORE pays only for
one header parse and a small append.  Readers trust a line only if its
checksum matches the index's copy: a replaced instance, an instance imported
before this journal existed, or a line lost in a race is rebuilt from the
stored file (through :meth:`RetrieveService.path`) on first read and the
journal is then compacted.  No schema change is needed.

Bulk data (binary values over 1 KiB, Pixel Data) become ``BulkDataURI``
values holding :data:`BULK_TOKEN` + tag; the web adapter replaces the token
with the instance's URL, which depends on the request's host and partition.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
import zlib
from pathlib import Path
from typing import Any, Iterable, Iterator

from pydicom import dcmread
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset

from xdsi.archive.coercion import Identity, apply_json
from xdsi.archive import rawvalues
from xdsi.archive.header import FAST_VALUES, raw_elements, raw_vr
from xdsi.archive.retrieve import InstanceRef, NotAvailable, RetrieveService
from xdsi.config import Settings, TierSettings
from xdsi.storage.tiers import Tier
from xdsi.uids import validate_uid

log = logging.getLogger(__name__)

BULK_TOKEN = "xdsi-bulk:"  # followed by the 8-hex-digit tag; replaced by the adapter with a real URL
BULK_THRESHOLD = 1024
_ENCAPSULATED_PREFIX = ("1.2.840.10008.1.2.4", "1.2.840.10008.1.2.5")


def _bulk_handler(elem: DataElement) -> str:
    return f"{BULK_TOKEN}{int(elem.tag):08X}"


def instance_json(path: Path | str) -> str:
    """DICOM JSON (PS3.18 F.2) of one stored instance, bulk data replaced by tokens; Pixel Data is not read."""
    ds = dcmread(path, stop_before_pixels=True)
    d = ds.to_json_dict(bulk_data_threshold=BULK_THRESHOLD, bulk_data_element_handler=_bulk_handler)
    if "Rows" in ds and "Columns" in ds:
        ts = str(getattr(ds.file_meta, "TransferSyntaxUID", "")) if hasattr(ds, "file_meta") else ""
        vr = "OB" if ts.startswith(_ENCAPSULATED_PREFIX) or int(ds.get("BitsAllocated", 16) or 16) <= 8 else "OW"
        d["7FE00010"] = {"vr": vr, "BulkDataURI": f"{BULK_TOKEN}7FE00010"}
    return json.dumps(d, separators=(",", ":"), ensure_ascii=False)


_PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})  # where ``stop_before_pixels`` stops reading
# deferred values of these VRs become a BulkDataURI without being read (pydicom would say the same VR);
# an ambiguous VR ("OB or OW") or a UN that pydicom would replace by the dictionary's VR needs the value
_TOKEN_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW"})


class NeedsFile(Exception):
    """The parsed data set has a value left unread that JSON cannot describe without reading it."""


def _has_deferred(ds: Dataset) -> bool:
    for raw in raw_elements(ds):
        if isinstance(raw, RawDataElement) and raw.value is None and raw.length:
            return True
        if isinstance(raw, DataElement) and raw.VR == "SQ" and any(_has_deferred(item) for item in raw.value):
            return True
    return False


def dataset_json(ds: Dataset, transfer_syntax_uid: str) -> str:
    """:func:`instance_json` from a data set already parsed by :func:`read_header_dataset`, without reading the file.

    The same text as :func:`instance_json` gives for the stored file (elements
    in the order pydicom reads them, everything from the first Pixel Data
    element on left out, Pixel Data then described by a token); values the
    header parse left unread are bulk data and become tokens without being
    read.  Raises :class:`NeedsFile` for a data set where that cannot be done
    faithfully (a deferred value of an ambiguous VR, or inside a sequence
    item); the caller then reads the stored file.
    """
    d: dict[str, Any] = {}
    # values the header parse decoded (xdsi.archive.header._check), else decoded here when pydicom's value is
    # known without converting (xdsi.archive.rawvalues); anything else goes through pydicom as always
    fast: dict[int, tuple[Any, str, Any]] = ds.__dict__.get(FAST_VALUES) or {}
    use_fast = rawvalues.enabled()
    elements = ds._dict  # the stored (raw or converted) elements, as ds.get_item(tag, keep_deferred=True) gives them
    for tag in ds.keys():
        if tag in _PIXEL_TAGS:
            break
        raw = elements[tag]
        if isinstance(raw, RawDataElement) and raw.value is None and raw.length:
            vr = raw_vr(raw)
            if vr in _TOKEN_VRS or (vr == "UN" and tag.is_private):
                d[f"{int(tag):08X}"] = {"vr": vr, "BulkDataURI": f"{BULK_TOKEN}{int(tag):08X}"}
                continue
            raise NeedsFile(f"deferred {vr} value {tag}")
        if isinstance(raw, DataElement) and raw.VR == "SQ" and any(_has_deferred(item) for item in raw.value):
            raise NeedsFile(f"deferred value in sequence {tag}")
        d[f"{int(tag):08X}"] = _element_json(ds, tag, raw, fast, use_fast)
    if "Rows" in ds and "Columns" in ds:
        vr = "OB" if transfer_syntax_uid.startswith(_ENCAPSULATED_PREFIX) or _bits_allocated(ds, fast) <= 8 else "OW"
        d["7FE00010"] = {"vr": vr, "BulkDataURI": f"{BULK_TOKEN}7FE00010"}
    return json.dumps(d, separators=(",", ":"), ensure_ascii=False)


_BITS_ALLOCATED = 0x00280100


def _bits_allocated(ds: Dataset, fast: dict[int, tuple[Any, str, Any]]) -> int:
    """``int(ds.get("BitsAllocated", 16) or 16)``, from the value the header parse decoded when it has it."""
    hit = fast.get(_BITS_ALLOCATED)
    if hit is not None and ds._dict.get(_BITS_ALLOCATED) is hit[0] and isinstance(hit[2], int):
        return int(hit[2] or 16)
    return int(ds.get("BitsAllocated", 16) or 16)


def _element_json(ds: Dataset, tag: Any, raw: Any, fast: dict[int, tuple[Any, str, Any]], use_fast: bool) -> dict[str, Any]:
    """``ds[tag].to_json_dict(...)`` as instance_json builds it, from values decoded without pydicom where known.

    A sequence's items are built the same way (``Dataset.to_json_dict``: every
    element of the item in order), so a received header with sequences is not
    converted element by element either.
    """
    if isinstance(raw, RawDataElement):
        hit = fast.get(tag)
        if hit is not None and hit[0] is raw:
            return rawvalues.json_element(tag, hit[1], hit[2], BULK_TOKEN)
        if use_fast and (vr := rawvalues.element_vr(raw)) is not None:
            value = rawvalues.decode(raw, vr, ds.original_character_set or ds._character_set)
            if value is not rawvalues.SLOW:
                return rawvalues.json_element(tag, vr, value, BULK_TOKEN)
    elem = ds[tag]
    if use_fast and elem.VR == "SQ":
        return {"vr": elem.VR, "Value": [_item_json(item) for item in elem.value]}
    return elem.to_json_dict(bulk_data_element_handler=_bulk_handler, bulk_data_threshold=BULK_THRESHOLD)


def _item_json(item: Dataset) -> dict[str, Any]:
    """``item.to_json_dict(...)`` (of a sequence item), through :func:`_element_json`."""
    fast: dict[int, tuple[Any, str, Any]] = item.__dict__.get(FAST_VALUES) or {}
    elements = item._dict
    return {f"{int(tag):08X}": _element_json(item, tag, elements[tag], fast, True) for tag in item.keys()}


def _with_identity(text: str, identity: Identity) -> str:
    """The journal's JSON of an instance with the index's patient attributes (:func:`xdsi.archive.coercion.apply_json`)."""
    d = json.loads(text)
    apply_json(d, identity)
    return json.dumps(d, separators=(",", ":"), ensure_ascii=False)


def _line(sop_uid: str, sha256: str, text: str) -> bytes:
    return f"{sop_uid}\t{sha256}\t{text}\n".encode("utf-8")


class MetadataService:
    def __init__(self, settings: Settings, retrieve: RetrieveService) -> None:
        self.retrieve = retrieve
        self.tier = Tier(TierSettings(name="metadata", path=(settings.data_dir / "metadata").resolve()))
        self.tier.ensure()

    @staticmethod
    def journal_path(study_uid: str, series_uid: str) -> str:
        return f"{validate_uid(study_uid, 'Study Instance UID')}/{validate_uid(series_uid, 'Series Instance UID')}.jsonl.gz"

    # -- store time ---------------------------------------------------------------------------

    def record(
        self, study_uid: str, series_uid: str, sop_uid: str, path: Path, sha256: str, *,
        dataset: Dataset | None = None, transfer_syntax_uid: str = "",
    ) -> None:
        """Append one instance's JSON to its series journal (the store-time hook).

        ``dataset``: the data set the store path parsed (bulk values unread), so
        the JSON is built without parsing the stored file a second time.
        """
        text = None
        if dataset is not None:
            try:
                text = dataset_json(dataset, transfer_syntax_uid)
            except NeedsFile:
                text = None
        if text is None:
            text = instance_json(path)
        self._append(study_uid, series_uid, [_line(sop_uid, sha256, text)])

    def _append(self, study_uid: str, series_uid: str, lines: list[bytes]) -> None:
        member = gzip.compress(b"".join(lines), compresslevel=1, mtime=0)
        p = self.tier.abspath(self.journal_path(study_uid, series_uid))
        try:  # the study's folder is there but for its first instance: made then, not looked for every time
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        except FileNotFoundError:
            p.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, member)  # one write: appends from several stores do not interleave
        finally:
            os.close(fd)

    # -- read time ----------------------------------------------------------------------------

    def _read_journal(self, rel: str) -> tuple[dict[str, tuple[str, str]], int]:
        """{sop: (sha256, json)} (last line wins) and the number of lines read."""
        out: dict[str, tuple[str, str]] = {}
        n = 0
        try:
            with gzip.open(self.tier.abspath(rel), "rt", encoding="utf-8") as fh:
                for raw in fh:
                    sop, sha, text = raw.rstrip("\n").split("\t", 2)
                    out[sop] = (sha, text)
                    n += 1
        except FileNotFoundError:
            pass
        except (OSError, EOFError, ValueError, zlib.error) as exc:  # torn append or damaged file: rebuild
            log.warning("metadata journal %s unreadable (%s); rebuilding", rel, exc)
            return {}, n + 1
        return out, n

    def series_json(self, refs: list[InstanceRef], *, complete: bool = True) -> list[tuple[InstanceRef, str]]:
        """JSON text of each instance in ``refs`` (all of one series), repairing the journal as needed.

        ``complete``: ``refs`` are every instance of the series, so the journal
        may be compacted to exactly them; otherwise repairs are appended.
        """
        if not refs:
            return []
        rel = self.journal_path(refs[0].study_uid, refs[0].series_uid)
        have, lines = self._read_journal(rel)
        out: list[tuple[InstanceRef, str]] = []
        repaired: list[bytes] = []
        for ref in refs:
            sha = ref.copies[0][3] if ref.copies else ""
            cached = have.get(ref.sop_instance_uid)
            if cached is not None and cached[0] == sha:
                out.append((ref, cached[1]))
                continue
            try:
                text = instance_json(self.retrieve.path(ref))
            except (NotAvailable, OSError) as exc:
                log.error("metadata of %s unavailable: %s", ref.sop_instance_uid, exc)
                continue
            except Exception as exc:  # an archived file pydicom cannot parse again: skip it, say so
                log.error("metadata of %s cannot be built: %s", ref.sop_instance_uid, exc)
                continue
            repaired.append(_line(ref.sop_instance_uid, sha, text))
            out.append((ref, text))
        if complete and (repaired or lines > len(refs)):
            self._compact(rel, out)
        elif repaired:
            self._append(refs[0].study_uid, refs[0].series_uid, repaired)
        # the journal keeps what the stored file says; a study whose patient identity HL7 changed after storage
        # is answered with the index's patient attributes, as its retrieved objects are (issue 15)
        return [(ref, _with_identity(text, ref.identity) if ref.identity is not None else text) for ref, text in out]

    def _compact(self, rel: str, items: list[tuple[InstanceRef, str]]) -> None:
        """Rewrite the journal with exactly the current instances (atomic replace through the tier)."""
        buf = io.BytesIO()
        with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=6, mtime=0) as gz:
            for ref, text in items:
                gz.write(_line(ref.sop_instance_uid, ref.copies[0][3] if ref.copies else "", text))
        try:
            self.tier.place_stream(io.BytesIO(buf.getvalue()), rel)
        except OSError as exc:
            log.warning("cannot rewrite metadata journal %s: %s", rel, exc)

    def iter_json(self, refs: Iterable[InstanceRef], *, complete: bool = True) -> Iterator[tuple[InstanceRef, str]]:
        """JSON of many instances in ``refs`` order, one series journal at a time (``complete``: whole series)."""
        batch: list[InstanceRef] = []
        for ref in refs:
            if batch and (ref.series_uid != batch[0].series_uid or ref.study_uid != batch[0].study_uid):
                yield from self.series_json(batch, complete=complete)
                batch = []
            batch.append(ref)
        if batch:
            yield from self.series_json(batch, complete=complete)


__all__ = ["MetadataService", "BULK_TOKEN", "dataset_json", "instance_json"]
