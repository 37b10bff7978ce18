"""Patient identity coerced on retrieve (xdsi.archive.coercion): what changes, what never does.

The writer is checked over pydicom's own test files in every stored encoding it handles
(Explicit/Implicit VR LE, Explicit VR BE, Deflated, JPEG 2000, RLE, no Pixel Data): the
five patient attributes are the new ones, every other element and the Pixel Data bytes
are what pydicom reads from the original, and pydicom decodes the same pixels.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from xdsi.archive.coercion import Identity, apply, apply_json, write_coerced
from xdsi.archive.metadata import instance_json

IDENT = Identity("NEW-ID", "NEWISS", "ROE^RICHARD", "19550505", "M")
FILES = ["CT_small.dcm", "MR_small_bigendian.dcm", "image_dfl.dcm", "MR_small_jp2klossless.dcm", "rtplan.dcm",
         "MR_small_implicit.dcm", "SC_rgb_rle.dcm", "JPEG2000.dcm"]


def _coerced(path: str | Path, identity: Identity = IDENT) -> tuple[Dataset, bytes]:
    out = io.BytesIO()
    write_coerced(Path(path), out, identity)
    return dcmread(io.BytesIO(out.getvalue())), out.getvalue()


@pytest.mark.parametrize("name", FILES)
def test_only_the_patient_attributes_change(name: str) -> None:
    path = get_testdata_file(name)
    original = dcmread(path)
    ds, _ = _coerced(path)
    assert ds.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
    assert (str(ds.PatientID), str(ds.IssuerOfPatientID), str(ds.PatientName), ds.PatientBirthDate, ds.PatientSex) == (
        "NEW-ID", "NEWISS", "ROE^RICHARD", "19550505", "M")
    for elem in original:
        if elem.tag.group == 0x0010:
            continue
        assert ds[elem.tag].value == elem.value, elem
    assert set(ds.keys()) - set(original.keys()) <= {0x00100021, 0x00100020, 0x00100010, 0x00100030, 0x00100040}
    if "PixelData" in original:
        assert ds.PixelData == original.PixelData
        assert np.array_equal(ds.pixel_array, original.pixel_array)


def test_the_stored_file_is_not_touched(tmp_path: Path) -> None:
    src = tmp_path / "ct.dcm"
    src.write_bytes(Path(get_testdata_file("CT_small.dcm")).read_bytes())
    before = src.read_bytes()
    _coerced(src)
    assert src.read_bytes() == before


def test_a_name_the_character_set_cannot_carry_switches_to_utf8_and_keeps_other_text() -> None:
    path = get_testdata_file("CT_small.dcm")  # ISO_IR 100
    original = dcmread(path)
    ident = Identity("NEW-ID", "", "\u0418\u0432\u0430\u043d\u043e\u0432^\u0418\u0432\u0430\u043d", "", "")
    ds, raw = _coerced(path, ident)
    assert ds.SpecificCharacterSet == "ISO_IR 192"
    assert str(ds.PatientName) == ident.name and ident.name.encode("utf-8") in raw
    for elem in original:
        if elem.tag.group != 0x0010 and elem.tag != 0x00080005:
            assert ds[elem.tag].value == elem.value, elem
    # a Latin-1 name fits ISO_IR 100: the character set stays
    ds2, raw2 = _coerced(path, Identity("X", "", "M\u00fcller^J\u00fcrgen", "", ""))
    assert ds2.SpecificCharacterSet == "ISO_IR 100" and "M\u00fcller^J\u00fcrgen".encode("latin-1") in raw2
    # no Specific Character Set (ASCII): a non-ASCII name makes it UTF-8, never Latin-1 bytes under the default repertoire
    ds3, _ = _coerced(get_testdata_file("MR_small_bigendian.dcm"), Identity("X", "", "M\u00fcller", "", ""))
    assert ds3.SpecificCharacterSet == "ISO_IR 192" and str(ds3.PatientName) == "M\u00fcller"


def test_issuer_qualifiers_follow_the_issuer() -> None:
    ds = Dataset()
    ds.PatientID, ds.IssuerOfPatientID, ds.PatientName = "OLD", "HOSP", "A^B"
    q = Dataset()
    q.UniversalEntityID = "1.2.3"
    ds.IssuerOfPatientIDQualifiersSequence = [q]
    same = Dataset()
    same.update(ds)
    apply(same, Identity("NEW", "HOSP", "A^B", "", ""))
    assert "IssuerOfPatientIDQualifiersSequence" in same and same.PatientID == "NEW"
    assert "PatientSex" not in same  # absent and empty in the index: left absent
    apply(ds, Identity("NEW", "", "A^B", "", ""))
    assert "IssuerOfPatientID" not in ds and "IssuerOfPatientIDQualifiersSequence" not in ds


def test_json_coercion_matches_the_object_coercion() -> None:
    path = get_testdata_file("CT_small.dcm")
    d = json.loads(instance_json(path))
    apply_json(d, IDENT)
    ds, _ = _coerced(path)
    want = json.loads(json.dumps(ds.to_json_dict(bulk_data_threshold=1024, bulk_data_element_handler=lambda e: "x")))
    for tag in ("00100010", "00100020", "00100021", "00100030", "00100040"):
        assert d[tag] == want[tag], tag
    original = json.loads(instance_json(path))
    assert {k: v for k, v in d.items() if not k.startswith("0010")} == {k: v for k, v in original.items() if not k.startswith("0010")}
