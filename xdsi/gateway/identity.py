"""What a remote delivers for a relay or a fetch must be what was asked for (issue 15, patient safety).

A remote PACS answering our C-MOVE or C-GET may send an instance of another study (a misconfigured
routing rule on its side, a Message ID it reused, a bug): relayed to the requester's viewer or cached
under the study we asked for, it would show one patient's images in another patient's examination.
So each arriving instance's own data set (not the C-STORE command, which the remote also writes) is
read before the relay takes it and compared with the retrieve identifier: Study Instance UID always
when the request named one, Series / SOP Instance UIDs at those levels, Patient ID (and its issuer)
when the request carried them, and the data set's SOP Class / Instance UIDs against the command's
Affected ones (what the relay sends on and counts).  A mismatch is refused with C-STORE status
``0xA900`` (PS3.4 Table B.2-1 "Error: Data Set does not match SOP Class" range; the remote counts a
failed sub-operation, and so do we: it is never relayed, cached, or counted as completed) and logged.
A file that cannot be read is refused the same way: fail closed.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from pydicom import dcmread
from pydicom.dataset import Dataset

from xdsi.gateway import headscan

if TYPE_CHECKING:
    from xdsi.gateway.receive import InstanceBytes

log = logging.getLogger(__name__)

REFUSED_MISMATCH = 0xA900  # C-STORE failure: the data set is not what the retrieve asked for
KEYWORDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "PatientID", "IssuerOfPatientID")
_WILDCARD = set("*?")


def _values(identifier: Dataset, keyword: str) -> tuple[str, ...]:
    """The identifier's values for a key (a UID list allowed), or () when the key is absent, empty or a wildcard."""
    value = identifier.get(keyword)
    if value is None or value == "":
        return ()
    items = [str(v) for v in value] if not isinstance(value, str) else str(value).split("\\")
    out = tuple(v.strip() for v in items if v.strip())
    if any(_WILDCARD & set(v) for v in out):  # a wildcard is not a restriction we can hold the remote to
        return ()
    return out


@dataclass(frozen=True)
class Expected:
    """The identity every delivered instance must carry; an empty tuple means "not restricted"."""

    study_uids: tuple[str, ...] = ()
    series_uids: tuple[str, ...] = ()
    sop_uids: tuple[str, ...] = ()
    patient_ids: tuple[str, ...] = ()
    issuers: tuple[str, ...] = ()

    @classmethod
    def of(cls, identifier: Dataset) -> "Expected":
        """From a C-MOVE/C-GET identifier: the study always when given, lower levels only at their level."""
        level = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
        return cls(
            study_uids=_values(identifier, "StudyInstanceUID"),
            series_uids=_values(identifier, "SeriesInstanceUID") if level in ("SERIES", "IMAGE") else (),
            sop_uids=_values(identifier, "SOPInstanceUID") if level == "IMAGE" else (),
            patient_ids=_values(identifier, "PatientID"),
            issuers=_values(identifier, "IssuerOfPatientID"),
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "Expected":
        data = json.loads(text)
        return cls(**{k: tuple(str(v) for v in data.get(k, ())) for k in cls.__dataclass_fields__})

    def mismatch(self, ds: Any, sop_class: str, sop_uid: str) -> str | None:
        """Why ``ds`` (a Dataset or a keyword -> value mapping; delivered with C-STORE Affected ``sop_class`` / ``sop_uid``) is not what was asked, or None."""
        got = {k: str(ds.get(k, "") or "").strip() for k in KEYWORDS}
        if got["SOPInstanceUID"] != sop_uid.strip():
            return f"data set SOP Instance UID {got['SOPInstanceUID']!r} is not the C-STORE's {sop_uid!r}"
        if got["SOPClassUID"] != sop_class.strip():
            return f"data set SOP Class UID {got['SOPClassUID']!r} is not the C-STORE's {sop_class!r}"
        for key, allowed in (("StudyInstanceUID", self.study_uids), ("SeriesInstanceUID", self.series_uids),
                             ("SOPInstanceUID", self.sop_uids)):
            if allowed and got[key] not in allowed:
                return f"{key} {got[key]!r} was not asked for"
        if self.patient_ids and got["PatientID"] not in self.patient_ids:
            return "Patient ID differs from the request's"  # the value itself is PHI: not logged
        if self.issuers and got["IssuerOfPatientID"] and got["IssuerOfPatientID"] not in self.issuers:
            return "Issuer of Patient ID differs from the request's"
        return None


def read_identity(path: Path | BinaryIO) -> Dataset:
    """The identifying elements of a delivered file (no pixel data read); raises when pydicom cannot read it."""
    return dcmread(path, stop_before_pixels=True, specific_tags=list(KEYWORDS), force=True)


def check(expected: Expected, path: Path, sop_class: str, sop_uid: str, head: bytes | None = None,
          content: InstanceBytes | None = None) -> tuple[str | None, Any]:
    """(a reason to refuse or None, the identifying elements read): the delivered file compared with the request.

    The elements are read by :mod:`xdsi.gateway.headscan` when the file is plainly encoded (a mapping of
    keyword to value, as pydicom would give them), else by pydicom (a Dataset); either answers ``get``.
    ``head``: the file's first ``headscan.HEAD_BYTES`` (all of it when shorter), kept as it was written
    (xdsi.dimse.receive_direct.HEAD), scanned instead of reading them from the file again.  ``content``: the
    whole file's bytes when it is only in memory (xdsi.gateway.receive.MemorySpool; there is no file at ``path``).
    """
    if head is None and content is not None:
        head = bytes(content[: headscan.HEAD_BYTES])
    ds: Any = headscan.scan(head) if head is not None else headscan.scan_file(path)
    if ds is None:
        try:
            ds = read_identity(path if content is None else io.BytesIO(bytes(content)))
        except Exception as exc:  # unreadable: we cannot tell whose it is, so it is not relayed
            return f"data set cannot be read ({exc.__class__.__name__})", None
    return expected.mismatch(ds, sop_class, sop_uid), ds


def check_file(expected: Expected, path: Path, sop_class: str, sop_uid: str) -> str | None:
    """Read the delivered file's identifying elements and compare; a reason to refuse, or None."""
    return check(expected, path, sop_class, sop_uid)[0]


def refuse(remote: Any, msg_id: int, sop_uid: str, reason: str) -> int:
    """Log a refused delivery (a patient-safety event, so at WARNING) and give the C-STORE status."""
    log.warning("relay %s/%d: refused %s from the remote: %s", remote, msg_id, sop_uid, reason)
    return REFUSED_MISMATCH
