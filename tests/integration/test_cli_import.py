"""``xdsi import``: files and folders in, a report of what was skipped and why."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

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
