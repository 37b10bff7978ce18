"""``xdsi import``: files and folders in, a report of what was skipped and why."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.cli_support import without_dac_override
from xdsi.tools.synth import StudySpec, write_study


def xdsi(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "xdsi", *args], capture_output=True, text=True, timeout=120)


def test_import_reports_skips_and_status_counts(tmp_path: Path) -> None:
    src = tmp_path / "in"
    files = write_study(src / "study", StudySpec(), series=2, per_series=2)
    (src / "notes.txt").write_text("not DICOM")
    data = files[0].read_bytes()
    (src / "truncated.dcm").write_bytes(data[:-200])
    single = tmp_path / "again.dcm"
    shutil.copy(files[0], single)  # the same SOP Instance UID a second time

    out = xdsi("import", "--data-dir", str(tmp_path / "data"), "--no-progress", str(src), str(single))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "imported 4 of 7 file(s): 4 new, 0 replaced, 1 duplicate, 2 not DICOM or invalid, 0 failed" in lines, out.stdout
    skipped = [line for line in lines if line.startswith("skipped ")]
    assert len(skipped) == 3
    assert any("notes.txt" in s for s in skipped) and any(s.startswith(f"skipped {src / 'truncated.dcm'}: ") and "truncated" in s.split(": ", 1)[1] for s in skipped)
    assert any("again.dcm: duplicate SOP Instance UID" in s for s in skipped)

    st = xdsi("status", "--data-dir", str(tmp_path / "data"))
    assert st.returncode == 0, st.stderr
    for expected in ("patients:   1", "studies:    1", "series:     2", "instances:  4"):
        assert expected in st.stdout.splitlines(), st.stdout


def test_import_of_a_missing_path_fails(tmp_path: Path) -> None:
    out = xdsi("import", "--data-dir", str(tmp_path / "data"), "--no-progress", str(tmp_path / "nope"))
    assert out.returncode == 1
    assert "no such file or folder" in out.stderr


def test_delete_instance_series_and_study(tmp_path: Path) -> None:
    from pydicom import dcmread

    spec = StudySpec()
    files = write_study(tmp_path / "in", spec, series=2, per_series=2)
    data = str(tmp_path / "data")
    assert xdsi("import", "--data-dir", data, "--no-progress", str(tmp_path / "in")).returncode == 0
    first = dcmread(files[0])

    dry = xdsi("delete", "--data-dir", data, "--study", spec.study_uid, "--series", first.SeriesInstanceUID, "--instance", first.SOPInstanceUID)
    assert dry.returncode == 0 and dry.stdout.startswith("would delete 1 instance(s)"), dry.stdout + dry.stderr
    assert "instances:  4" in xdsi("status", "--data-dir", data).stdout.splitlines()

    one = xdsi("delete", "--data-dir", data, "--study", spec.study_uid, "--series", first.SeriesInstanceUID, "--instance", first.SOPInstanceUID, "--yes")
    assert one.returncode == 0 and one.stdout.startswith("deleted 1 instance(s)"), one.stdout + one.stderr
    assert not list((tmp_path / "data").rglob(f"{first.SOPInstanceUID}*.dcm"))
    st = xdsi("status", "--data-dir", data).stdout.splitlines()
    assert "instances:  3" in st and "series:     2" in st

    rest = xdsi("delete", "--data-dir", data, "--study", spec.study_uid, "--yes")
    assert rest.returncode == 0 and rest.stdout.startswith("deleted 3 instance(s)")
    st = xdsi("status", "--data-dir", data).stdout.splitlines()
    assert "studies:    0" in st and "instances:  0" in st
    assert not list((tmp_path / "data").rglob("*.dcm"))

    assert xdsi("delete", "--data-dir", data, "--study", spec.study_uid, "--yes").returncode == 1  # nothing left
    assert xdsi("delete", "--data-dir", data, "--study", "../etc", "--yes").returncode == 2  # not a UID


# -- a messy tree: what a copied CD or a home folder holds besides instances (issue 8, item 7) --------

TESTDATA = Path(__import__("pydicom").data.get_testdata_file("CT_small.dcm")).parent  # files nobody here wrote


def _skips(stdout: str) -> dict[str, str]:
    """``skipped PATH: reason`` lines by path."""
    out = {}
    for line in stdout.splitlines():
        if line.startswith("skipped "):
            path, reason = line[len("skipped ") :].split(": ", 1)
            out[path] = reason
    return out


@pytest.fixture(scope="module")
def messy(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, subprocess.CompletedProcess[str]]:
    root = tmp_path_factory.mktemp("messy")
    tree = root / "tree"
    write_study(tree / "study", StudySpec(), series=1, per_series=2)
    shutil.copy(TESTDATA / "README.txt", tree / "README.txt")  # pydicom force-reads this as "elements to byte 1818838568"
    shutil.copy(TESTDATA / "crayons.icc", tree / "crayons.icc")
    shutil.copy(TESTDATA / "dicomdirtests" / "DICOMDIR", tree / "DICOMDIR")
    shutil.copy(TESTDATA / "MR_truncated.dcm", tree / "MR_truncated.dcm")
    bare = tree / "bare"
    bare.mkdir()  # datasets without preamble and DICM (one instance, two encodings: same SOP Instance UID)
    shutil.copy(TESTDATA / "ExplVR_BigEndNoMeta.dcm", bare / "a_big_endian.dcm")
    shutil.copy(TESTDATA / "ExplVR_LitEndNoMeta.dcm", bare / "b_little_endian.dcm")
    (tree / "dangling.dcm").symlink_to(root / "gone.dcm")
    (tree / "study" / "up").symlink_to("..")  # a folder loop
    (tree / "loop_a").symlink_to("loop_b")  # a symlink loop
    (tree / "loop_b").symlink_to("loop_a")
    (tree / "again").symlink_to("study")  # a second way into a folder: read once
    os.mkfifo(tree / "fifo")  # opening it would block forever
    out = xdsi("import", "--data-dir", str(root / "data"), "--no-progress", str(tree))
    return tree, root / "data", out


def test_import_goes_on_past_unreadable_paths_with_honest_reasons(messy: tuple[Path, Path, subprocess.CompletedProcess[str]]) -> None:
    tree, _data, out = messy
    assert out.returncode == 0, out.stdout + out.stderr  # nothing that could be an instance was left unread
    assert "Traceback" not in out.stderr, out.stderr
    skips = _skips(out.stdout)
    expected = {
        "README.txt": "not DICOM (no DICM prefix)",
        "crayons.icc": "not DICOM (no DICM prefix)",
        "DICOMDIR": "DICOMDIR: a media directory, not an instance",
        "MR_truncated.dcm": "truncated dataset: elements extend to byte 9692, file has 9630",
        "dangling.dcm": f"dangling symlink (to {tree.parent / 'gone.dcm'})",
        "study/up": f"directory loop: leads back to {tree}",
        "loop_a": "symlink loop (too many levels of symbolic links)",
        "loop_b": "symlink loop (too many levels of symbolic links)",
        "fifo": "not a regular file (a FIFO)",
        "bare/b_little_endian.dcm": "duplicate SOP Instance UID 1.2.333.4444.5.6.7.8: already archived; first copy kept",
        "again": f"same folder as {tree / 'study'}, already read",  # real folders are read before links to them
    }
    assert skips == {str(tree / rel): reason for rel, reason in expected.items()}, out.stdout
    # regular files: 2 instances + README, icc, DICOMDIR, truncated + 2 bare datasets; 6 other paths skipped by the walk
    assert (
        "imported 3 of 8 file(s): 3 new, 0 replaced, 1 duplicate, 4 not DICOM or invalid, 0 failed; 6 other path(s) skipped"
        in out.stdout.splitlines()
    ), out.stdout


def test_a_bare_big_endian_dataset_is_stored_as_big_endian(messy: tuple[Path, Path, subprocess.CompletedProcess[str]]) -> None:
    """A dataset without File Meta Information gets one naming the encoding pydicom found, byte order included."""
    from pydicom import dcmread

    tree, data, _out = messy
    stored = list((data / "storage").rglob("1.2.333.4444.5.6.7.8.dcm"))
    assert len(stored) == 1
    ours = dcmread(stored[0])
    original = dcmread(tree / "bare" / "a_big_endian.dcm", force=True)
    assert ours.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.2"
    assert ours.SOPInstanceUID == original.SOPInstanceUID and ours == original  # every element, as pydicom reads it
    assert stored[0].read_bytes().endswith(TESTDATA.joinpath("ExplVR_BigEndNoMeta.dcm").read_bytes())  # bytes kept


def test_import_reports_permission_denied_and_exits_1(tmp_path: Path) -> None:
    """Unreadable file and folder: reported, the rest imported, exit 1 (they may hold instances)."""
    tree = tmp_path / "tree"
    files = write_study(tree / "ok", StudySpec(), series=1, per_series=2)
    locked_file = tree / "locked.dcm"
    shutil.copy(files[0], locked_file)
    locked_dir = tree / "locked_dir"
    write_study(locked_dir, StudySpec(), series=1, per_series=1)
    locked_file.chmod(0)
    locked_dir.chmod(0)
    preexec = None
    if os.geteuid() == 0:
        probe = subprocess.run([sys.executable, "-c", f"open({str(locked_file)!r}, 'rb')"], capture_output=True, preexec_fn=without_dac_override)
        if probe.returncode == 0:
            pytest.skip("root without CAP_DAC_OVERRIDE still reads a mode-000 file here: cannot test permission denied")
        preexec = without_dac_override
    try:
        out = subprocess.run(
            [sys.executable, "-m", "xdsi", "import", "--data-dir", str(tmp_path / "data"), "--no-progress", str(tree)],
            capture_output=True, text=True, timeout=120, preexec_fn=preexec,
        )
    finally:
        locked_file.chmod(0o644)
        locked_dir.chmod(0o755)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    assert _skips(out.stdout) == {str(locked_dir): "permission denied (folder)", str(locked_file): "permission denied"}, out.stdout
    assert (
        "imported 2 of 3 file(s): 2 new, 0 replaced, 0 duplicate, 0 not DICOM or invalid, 0 failed, 1 unreadable; 1 other path(s) skipped"
        in out.stdout.splitlines()
    ), out.stdout


def test_import_with_a_data_dir_that_cannot_be_created_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("in the way")
    out = xdsi("import", "--data-dir", str(tmp_path / "file" / "data"), "--no-progress", str(tmp_path))
    assert out.returncode == 2
    assert out.stderr.splitlines() == [
        f"xdsi: [server] data_dir {tmp_path / 'file' / 'data'} (--data-dir): cannot create {tmp_path / 'file' / 'data'}: {tmp_path / 'file'} is a file, not a directory"
    ], out.stderr
