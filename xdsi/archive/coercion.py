"""Patient identity coerced on retrieve: what a study's objects say after an HL7 patient update (issue 15).

Why: an ADT^A08 (new demographics) or ADT^A40 (merge) changes the index
(:mod:`xdsi.hl7.patients`), but the stored files keep the Patient ID, name,
birth date and sex they were received with (their bytes are what the modality
sent, and their checksums prove it).  A receiving system files an object by the
patient attributes *in the object*: sending the stored bytes after a merge files
the study under the merged-away patient.  So, as dcm4chee-arc does ("on retrieve
of DICOM objects, the potentially updated DICOM attributes from the Patient
record of the DB will be merged with the original DICOM attributes of the stored
DICOM objects"), an object of a study whose identity changed after storage
(``study.identity_updated_at`` set) goes out with the index's values of:

* Patient's Name (0010,0010), Patient ID (0010,0020), Issuer of Patient ID (0010,0021),
  Patient's Birth Date (0010,0030), Patient's Sex (0010,0040);
* Issuer of Patient ID Qualifiers Sequence (0010,0024) is removed when the issuer
  changed: it qualified the old issuer, and the index holds no qualifiers of its own;
* a group length (0010,0000), retired but sometimes present, is removed (it would be wrong).

Other Patient IDs (Sequence) are left as stored: dcm4chee-arc does not add the
merged-away ID there either (the merged patient record only points to the dominant one).
Pixel Data and every element from it on are copied byte for byte from the stored
file (:func:`write_coerced`), never decoded.

Only the objects of a flagged study pay for this: the stored bytes of every other
study still go out unchanged on the fast paths (sendfile, direct PDUs).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import DeflatedExplicitVRLittleEndian, UID

__all__ = ["Identity", "apply", "apply_json", "write_coerced", "PATIENT_NAME", "PATIENT_ID"]

PATIENT_NAME, PATIENT_ID, ISSUER, QUALIFIERS = 0x00100010, 0x00100020, 0x00100021, 0x00100024
BIRTH_DATE, SEX, GROUP_LENGTH = 0x00100030, 0x00100040, 0x00100000
UTF8 = "ISO_IR 192"


@dataclass(frozen=True)
class Identity:
    """The patient attributes the index holds for a study (what a retrieved object must say)."""

    patient_id: str
    issuer: str
    name: str
    birth_date: str
    sex: str

    def values(self) -> list[tuple[int, str, str]]:
        """(tag, VR, value) of every attribute coerced; an empty issuer means "no Issuer of Patient ID"."""
        return [
            (PATIENT_NAME, "PN", self.name),
            (PATIENT_ID, "LO", self.patient_id),
            (ISSUER, "LO", self.issuer),
            (BIRTH_DATE, "DA", self.birth_date),
            (SEX, "CS", self.sex),
        ]


def _needs_utf8(ds: Dataset, identity: Identity) -> bool:
    """True when a new value cannot be written in the object's Specific Character Set."""
    if all(v.isascii() for _t, _vr, v in identity.values()):
        return False
    charset = ds.get("SpecificCharacterSet")
    names = [str(c).strip().upper() for c in (charset if isinstance(charset, (list, tuple)) or charset.__class__.__name__ == "MultiValue" else [charset])] if charset else []
    if names and names[0] == UTF8 and len(names) == 1:
        return False
    if not names or names == ["ISO_IR 6"] or names == [""]:
        return True  # the default repertoire is ASCII (pydicom would write Latin-1 bytes for it)
    from pydicom.charset import convert_encodings

    try:
        codecs = convert_encodings(names or ["ISO_IR 6"])
        for _t, _vr, v in identity.values():
            v.encode(codecs[0])  # a single-byte character set: the first encoding is the one values are written in
        return len(codecs) > 1  # ISO 2022 code extensions: escape sequences are not ours to write; UTF-8 is simpler and exact
    except (LookupError, UnicodeError):
        return True


def apply(ds: Dataset, identity: Identity) -> None:
    """Set the index's patient attributes on ``ds`` (in place); see the module docstring for which and why.

    A value that the object's character set cannot carry switches the object to
    UTF-8 (ISO_IR 192) after decoding every text value with the old set, so no
    other value changes meaning.
    """
    if _needs_utf8(ds, identity):
        ds.decode()  # every text value to Python str with the object's own character set
        ds.SpecificCharacterSet = UTF8
        for tag in [t for t in ds.keys() if t.element == 0 and t.group != 0x0002]:
            del ds[tag]  # (retired) group lengths: re-encoded text changes them
    stored_issuer = str(ds.get("IssuerOfPatientID", "") or "")
    for tag, vr, value in identity.values():
        if tag == ISSUER and not value:
            if ISSUER in ds:
                del ds[ISSUER]
            continue
        if not value and tag not in ds and tag != PATIENT_ID:
            continue  # Type 2 attribute the object did not have and the index has no value for: leave it absent
        ds.add_new(Tag(tag), vr, value)
    if stored_issuer != identity.issuer and QUALIFIERS in ds:
        del ds[QUALIFIERS]
    if GROUP_LENGTH in ds:
        del ds[GROUP_LENGTH]


def apply_json(d: dict[str, Any], identity: Identity) -> None:
    """The same coercion on a DICOM JSON object (PS3.18 F.2), in place: WADO-RS metadata."""
    stored_issuer = ""
    old = d.get(f"{ISSUER:08X}")
    if isinstance(old, dict) and old.get("Value"):
        stored_issuer = str(old["Value"][0])
    ds = Dataset()
    for tag, vr, value in identity.values():
        key = f"{tag:08X}"
        if tag == ISSUER and not value:
            d.pop(key, None)
            continue
        if not value and key not in d and tag != PATIENT_ID:
            continue
        ds.add_new(Tag(tag), vr, value)
        d[key] = ds[tag].to_json_dict(bulk_data_element_handler=None, bulk_data_threshold=1 << 30)
    if stored_issuer != identity.issuer:
        d.pop(f"{QUALIFIERS:08X}", None)
    d.pop(f"{GROUP_LENGTH:08X}", None)


def write_coerced(path: Path, out: BinaryIO, identity: Identity) -> None:
    """The stored Part 10 file at ``path`` in its own transfer syntax, with ``identity`` applied, written to ``out``.

    The header (everything before Pixel Data) is parsed, coerced and written by
    pydicom in the stored encoding; Pixel Data and every element after it are
    copied from the stored file byte for byte (streamed, not held in memory), so
    the pixels cannot change.  A deflated object has no byte offset to cut at:
    it is read whole (one instance), coerced and deflated again by pydicom.
    """
    with open(path, "rb") as fh:
        ds = dcmread(fh, stop_before_pixels=True)
        tail = fh.tell()  # pydicom rewinds to the start of the element it stopped before (or EOF)
        ts = UID(str(ds.file_meta.TransferSyntaxUID))
        if ts == DeflatedExplicitVRLittleEndian:
            ds = dcmread(path)
            apply(ds, identity)
            ds.save_as(out, enforce_file_format=True)
            return
        apply(ds, identity)
        ds.save_as(out, implicit_vr=ts.is_implicit_VR, little_endian=ts.is_little_endian, enforce_file_format=True)
        fh.seek(tail)
        shutil.copyfileobj(fh, out, 1 << 20)
