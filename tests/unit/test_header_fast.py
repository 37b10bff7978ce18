"""The lean header parse (issue 14) decides and answers exactly as the pydicom-only parse.

:func:`xdsi.archive.header.read_header_dataset` leaves the elements whose value
:mod:`xdsi.archive.rawvalues` reads exactly as pydicom would unconverted, and
:func:`xdsi.archive.metadata.dataset_json` builds their JSON from the same
values.  With ``rawvalues.enabled`` patched to False both run the pydicom-only
path they ran before (every element converted by pydicom).  The two must agree
on: accept or refuse (and the refusal's text), the :class:`InstanceHeader`,
and the journal's JSON text byte for byte -- on every pydicom test file, on
generated CT headers with unusual values, on thousands of mutated files, and
element by element against pydicom's own conversion.
"""

from __future__ import annotations

import json
import random
import struct
import warnings
from pathlib import Path
from typing import Any, Iterator

import pydicom.data
import pytest
from pydicom.dataelem import RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag

from xdsi.archive import header as header_mod
from xdsi.archive import rawvalues
from xdsi.archive.metadata import BULK_THRESHOLD, NeedsFile, _bulk_handler, dataset_json
from xdsi.tools.synth import StudySpec, ct_instance
from xdsi.uids import new_uid

_ROOT = Path(pydicom.data.__file__).parent / "test_files"
TEST_FILES = sorted(p for p in _ROOT.rglob("*") if p.is_file())


def _outcome(path: Path) -> tuple[Any, ...]:
    """(header or refusal text, journal JSON or the exception it raised) of one file."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            header, ds = header_mod.read_header_dataset(path)
        except header_mod.InvalidDataset as exc:
            return ("refused", str(exc))
        try:
            text: Any = dataset_json(ds, header.transfer_syntax_uid)
        except NeedsFile as exc:
            text = ("NeedsFile", str(exc))
        except Exception as exc:  # the journal logs it and reads the stored file: the same must happen
            text = (exc.__class__.__name__, str(exc))
    return ("accepted", header, text)


def _both(path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    lean = _outcome(path)
    with monkeypatch.context() as m:
        m.setattr(rawvalues, "enabled", lambda: False)
        reference = _outcome(path)
    return lean, reference


@pytest.fixture(scope="module")
def ct_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    ds = ct_instance(StudySpec(patient_name="MÜLLER^ANNA"), new_uid(), 1, rows=64, columns=64)
    path = tmp_path_factory.mktemp("ct") / "ct.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path.read_bytes()


def test_lean_path_reads_an_ordinary_ct_without_dcmread(ct_bytes: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The lean path is really the one taken for an ordinary CT: dcmread is not called at all."""
    assert rawvalues.enabled()
    path = tmp_path / "ct.dcm"
    path.write_bytes(ct_bytes)

    def no_dcmread(*_a: Any, **_k: Any) -> Any:
        raise AssertionError("dcmread called")

    monkeypatch.setattr(header_mod, "dcmread", no_dcmread)
    header, _ds = header_mod.read_header_dataset(path)
    assert header.patient_name == "MÜLLER^ANNA" and header.rows == 64


@pytest.mark.parametrize("src", TEST_FILES, ids=[str(p.relative_to(_ROOT)) for p in TEST_FILES])
def test_pydicom_test_file_same_outcome(src: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lean, reference = _both(src, monkeypatch)
    assert lean == reference


def test_ct_same_outcome_and_mostly_fast(ct_bytes: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "ct.dcm"
    path.write_bytes(ct_bytes)
    lean, reference = _both(path, monkeypatch)
    assert lean == reference and lean[0] == "accepted"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _header, ds = header_mod.read_header_dataset(path)
    fast = ds.__dict__[header_mod.FAST_VALUES]
    assert len(fast) >= len(ds) - 3, "nearly every element of a plain CT header is decoded without pydicom"


def _mutations(data: bytes, rng: random.Random, n: int) -> Iterator[bytes]:
    """Byte flips, runs of chosen bytes, cut files, inserted and removed bytes over the header part."""
    head = min(len(data), 1200)
    specials = [b"\x00", b"\xff", b" ", b"\\", b"=", b"\x1b", b"\xc3", b"\xe9", b".", b"-", b"e", b"\xff\xff\xff\xff"]
    for _ in range(n):
        b = bytearray(data)
        kind = rng.randrange(6)
        pos = rng.randrange(132, head)
        if kind == 0:
            b[pos] = rng.randrange(256)
        elif kind == 1:
            s = rng.choice(specials)
            b[pos:pos + len(s)] = s
        elif kind == 2:
            del b[rng.randrange(pos, len(b)):]
        elif kind == 3:
            b[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.choice((1, 2, 4))))
        elif kind == 4:
            del b[pos:pos + rng.choice((1, 2, 4))]
        else:
            for _ in range(rng.randrange(2, 6)):
                b[rng.randrange(132, head)] = rng.randrange(256)
        yield bytes(b)


@pytest.mark.parametrize("seed", range(4))
def test_mutated_files_same_outcome(seed: int, ct_bytes: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Accept/refuse, refusal text, header and JSON agree on damaged input (the fuzzer's kind of input)."""
    rng = random.Random(seed)
    sources = [ct_bytes] + [p.read_bytes() for p in rng.sample([p for p in TEST_FILES if p.suffix == ".dcm"], 3)]
    path = tmp_path / "m.dcm"
    refused = accepted = 0
    for src in sources:
        for data in _mutations(src, rng, 150):
            path.write_bytes(data)
            lean, reference = _both(path, monkeypatch)
            assert lean == reference, data[:0]
            refused += lean[0] == "refused"
            accepted += lean[0] == "accepted"
    assert refused and accepted


# -- element by element, against pydicom's own conversion -------------------------------------------------------

_ENCODINGS = [["iso8859"], ["UTF8"], ["latin_1"], ["iso8859", "iso2022_jp"], ["shift_jis"], ["GB18030"]]
_TEXT_SAMPLES = [b"", b" ", b"A", b"ABC ", b"ABC\x00", b" ABC", b"A\\B", b"A\\\\B ", b"\\", b"A^B^^^", b"DOE^JANE",
                 b"A=B", b"=A", b"A\\B=C", b"M\xc3\xbcLLER^ANNA", b"M\xfcLLER", b"\x1b$B", b"A\x1b(BB", b"a\tb ",
                 b"\x00\x00", b"1.2.840.10008.1.2.1\x00", b"1.2\\3.4 ", b"20240101", b"2024.01.01", b"10:15:00",
                 b"  x  ", b"\xff\xfe", b"x" * 300, b"\xe6\x97\xa5\xe6\x9c\xac", b"A\r\nB"]
_NUMBER_SAMPLES = [b"1", b"1 ", b" 1", b"+1", b"-1", b"-0", b"01", b"1.0", b"1.5", b"1e3", b"1E-3", b".5", b"5.", b"-.5",
                   b"1_0", b"nan", b"inf", b"-Infinity", b"1e400", b"", b" ", b"1\\2", b"1\\", b"\\1", b"1 \\ 2 ",
                   b"123456789012", b"1234567890123", b"99999999999999999999", b"0x10", b"1,5", b"\x001", b"1\x00",
                   b"\xb2", b"\xd9\xa3", b"12345678901234567890.5", b"0.1234567890123456", b"1.23456789012345678"]
_BINARY_SAMPLES = [b"", b"\x01", b"\x01\x02", b"\x01\x02\x03", b"\x00" * 4, b"\xff" * 8, b"\x00\x00\xc0\x7f",
                   b"\x00\x00\x80\x7f", bytes(range(256)) * 4, b"\x01\x02" * 400, b"\x01\x02" * 383 + b"\x01\x02"]


def _reference(raw: RawDataElement, vr: str, encodings: list[str]) -> tuple[Any, Any]:
    """pydicom's element value and JSON for ``raw`` (or the exception each raised)."""
    ds = Dataset()
    ds.set_original_encoding(raw.is_implicit_VR, True, encodings)
    ds._dict[raw.tag] = raw
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            elem = ds[raw.tag]
        except Exception as exc:
            return ("raises", type(exc)), None
        try:
            text = json.dumps(elem.to_json_dict(_bulk_handler, BULK_THRESHOLD), ensure_ascii=False)
        except Exception as exc:
            text = ("raises", type(exc))
    return elem, text


def _check_element(raw: RawDataElement, encodings: list[str]) -> bool:
    """decode() is SLOW or gives pydicom's value; returns whether it was fast."""
    vr = rawvalues.element_vr(raw)
    if vr is None:
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = rawvalues.decode(raw, vr, encodings)
    if value is rawvalues.SLOW:
        return False
    elem, text = _reference(raw, vr, encodings)
    assert not isinstance(elem, tuple), f"{raw}: pydicom raises {elem}, fast path decoded {value!r}"
    assert str(elem.VR) == vr
    ref = elem.value
    # the header reads values through str() and int(); the journal through to_json_dict
    if isinstance(value, list):
        assert isinstance(ref, (list, MultiValue)) and [str(x) for x in ref] == [str(x) for x in value], (raw, value)
        assert all(a == b or (a != a and b != b) for a, b in zip(ref, value))  # NaN == NaN here
    else:
        assert not isinstance(ref, (list, MultiValue)), (raw, value)
        assert (ref == value or (ref != ref and value != value)) and str(ref) == str(value), (raw, ref, value)
        if vr in ("IS", "US", "SS", "UL", "SL", "SV", "UV") and value not in (None, ""):
            assert int(ref) == int(value)  # what the header's _i reads
    fast_text = json.dumps(rawvalues.json_element(int(raw.tag), vr, value, "xdsi-bulk:"), ensure_ascii=False)
    assert fast_text == text, (raw, value)
    return True


@pytest.mark.parametrize("implicit", [False, True])
def test_generated_values_against_pydicom(implicit: bool) -> None:
    """Every fast VR, every sample value, several character sets: fast value == pydicom's, or SLOW."""
    from pydicom.datadict import DicomDictionary

    tags: dict[str, int] = {}  # a public tag of each fast VR (implicit VR takes the dictionary's VR)
    for tag, entry in sorted(DicomDictionary.items()):
        if entry[0] in rawvalues.FAST_VRS and tag not in rawvalues._LUT_DESCRIPTORS and tag >> 16 != 2:
            tags.setdefault(entry[0], tag)
    assert set(tags) == rawvalues.FAST_VRS
    fast = slow = 0
    for vr, tag in tags.items():
        if implicit:
            from pydicom.datadict import dictionary_VR

            assert dictionary_VR(tag) == vr, (vr, hex(tag))
        samples = _BINARY_SAMPLES if vr in ("OB", "OW", "OF", "OD", "OL", "OV", "US", "SS", "UL", "SL", "FL", "FD",
                                            "SV", "UV") else _TEXT_SAMPLES + _NUMBER_SAMPLES
        for value in samples:
            for encodings in _ENCODINGS:
                raw = RawDataElement(BaseTag(tag), None if implicit else vr, len(value), value, 0, implicit, True)
                if _check_element(raw, encodings):
                    fast += 1
                else:
                    slow += 1
    assert fast > 500 and slow > 50


def _raw_elements(ds: Dataset) -> Iterator[tuple[RawDataElement, list[str]]]:
    encodings = ds.original_character_set or ds._character_set
    for tag in list(ds.keys()):
        raw = ds.get_item(tag, keep_deferred=True)
        if isinstance(raw, RawDataElement) and raw.value is not None:
            yield raw, encodings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                elem = ds[tag]
            except Exception:
                continue
        if elem.VR == "SQ":
            for item in elem.value:
                yield from _raw_elements(item)


def test_every_element_of_pydicoms_test_files_against_pydicom() -> None:
    from pydicom import dcmread

    fast = 0
    for src in TEST_FILES:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                ds = dcmread(src, force=True, defer_size=header_mod.DEFER)
            except Exception:
                continue
        for raw, encodings in _raw_elements(ds):
            fast += _check_element(raw, list(encodings) if not isinstance(encodings, str) else [encodings])
    assert fast > 3000


def test_number_lengths_pydicom_refuses_stay_refused(tmp_path: Path, ct_bytes: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    """A US value of 3 bytes fails pydicom's conversion: the instance is refused, with pydicom's own words."""
    rows = struct.pack("<HH2sH", 0x0028, 0x0010, b"US", 2)
    i = ct_bytes.index(rows)
    bad = ct_bytes[:i] + struct.pack("<HH2sH", 0x0028, 0x0010, b"US", 3) + b"\x00\x02\x00" + ct_bytes[i + 10 :]
    # keep the element list aligned: Columns follows directly
    path = tmp_path / "odd.dcm"
    path.write_bytes(bad)
    lean, reference = _both(path, monkeypatch)
    assert lean == reference and lean[0] == "refused", lean


# -- the reader: leanread.read gives what dcmread gives ---------------------------------------------------------


def _same_elements(a: Dataset, b: Dataset) -> None:
    assert list(a._dict) == list(b._dict)
    for tag, x in a._dict.items():
        y = b._dict[tag]
        assert type(x) is type(y), tag
        if isinstance(x, RawDataElement) or x.VR != "SQ":
            assert x == y, tag
        else:  # an undefined-length sequence pydicom parsed while reading
            assert x.VR == y.VR and x.file_tell == y.file_tell and x.is_undefined_length == y.is_undefined_length
            assert len(x.value) == len(y.value)
            for i, j in zip(x.value, y.value):
                _same_elements(i, j)
                assert i.original_character_set == j.original_character_set
                assert (i.is_undefined_length_sequence_item, i.seq_item_tell) == (j.is_undefined_length_sequence_item, j.seq_item_tell)


def _lean_vs_dcmread(path: Path) -> bool:
    """Whether leanread took the file; if it did, its data set must be dcmread's."""
    from pydicom import dcmread

    from xdsi.archive import leanread

    size = path.stat().st_size
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with open(path, "rb") as fh:
            lean = leanread.read(fh, size, header_mod.DEFER)
            if lean is None:
                return False
            ds, end, offset = lean
        with open(path, "rb") as fh:
            ref = dcmread(fh, defer_size=header_mod.DEFER, force=True)
            ref_end = fh.tell()
            assert header_mod.dataset_start(fh) == (True, offset)
    assert end == ref_end
    _same_elements(ds, ref)
    _same_elements(ds.file_meta, ref.file_meta)
    assert ds.preamble == ref.preamble and ds.filename == ref.filename and ds.fileobj_type is ref.fileobj_type
    assert ds.original_encoding == ref.original_encoding and ds.original_character_set == ref.original_character_set
    assert ds._character_set == ref._character_set and ds.timestamp == ref.timestamp
    assert ds.file_meta.original_encoding == ref.file_meta.original_encoding
    return True


def test_leanread_is_dcmread_on_pydicoms_test_files() -> None:
    taken = sum(_lean_vs_dcmread(p) for p in TEST_FILES)
    assert taken > 100


def test_leanread_is_dcmread_on_mutated_files(ct_bytes: bytes, tmp_path: Path) -> None:
    rng = random.Random(7)
    sources = [ct_bytes] + [p.read_bytes() for p in rng.sample([p for p in TEST_FILES if p.suffix == ".dcm"], 5)]
    path = tmp_path / "m.dcm"
    taken = 0
    for src in sources:
        for data in _mutations(src, rng, 150):
            path.write_bytes(data)
            taken += _lean_vs_dcmread(path)
    assert taken > 100
