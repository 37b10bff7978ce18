"""``xdsi retrieve`` and ``xdsi status`` as users run them, against a real ``xdsi serve``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.support.ids import NIST_REPOSITORY, IdsServer, ids_server  # noqa: F401  (fixture)


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "xdsi", *args], capture_output=True, text=True, timeout=120)


def test_retrieve_saves_every_instance_byte_exact(ids_server: IdsServer, tmp_path: Path) -> None:
    st = ids_server.studies[0]
    series_uid, items = next(iter(st.series.items()))
    out = tmp_path / "out"
    args = ["retrieve", ids_server.url, "--study", st.uid, "--series", series_uid, "--out", str(out), "--repository-unique-id", NIST_REPOSITORY]
    for sop, _f in items:
        args += ["--instance", sop]
    r = run(*args, "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "Success: saved 2 of 2" in r.stdout
    for sop, f in items:
        assert (out / f"{sop}.dcm").read_bytes() == f.read_bytes()


def test_retrieve_reports_errors(ids_server: IdsServer, tmp_path: Path) -> None:
    st = ids_server.studies[0]
    series_uid, items = next(iter(st.series.items()))
    r = run("retrieve", ids_server.url, "--study", st.uid, "--series", series_uid, "--instance", items[0][0], "--instance", "1.2.3.999",
            "--out", str(tmp_path / "o"), "--repository-unique-id", NIST_REPOSITORY, "--no-progress")
    assert r.returncode == 1
    assert "PartialSuccess: saved 1 of 2" in r.stdout and "XDSDocumentUniqueIdError at 1.2.3.999" in r.stderr
    r = run("retrieve", ids_server.url, "--study", st.uid, "--series", series_uid, "--instance", items[0][0], "--out", str(tmp_path / "o2"),
            "--repository-unique-id", "1.2.3.4", "--no-progress")
    assert r.returncode == 1 and "XDSUnknownRepositoryId" in r.stderr  # an id that is not the server's
    # no id given and none configured or generated here (issue 11: no shared default): refused before sending
    r = run("retrieve", ids_server.url, "--study", st.uid, "--series", series_uid, "--instance", items[0][0], "--out", str(tmp_path / "o3"),
            "--data-dir", str(tmp_path / "nothing"), "--no-progress")
    assert r.returncode == 2 and "--repository-unique-id" in r.stderr and not (tmp_path / "nothing").exists()


def test_status_prints_repository_id(tmp_path: Path) -> None:
    r = run("status", "--data-dir", str(tmp_path / "d"))
    assert r.returncode == 0 and "repository: 2.25." in r.stdout
    cfg = tmp_path / "x.toml"
    cfg.write_text('[xds]\nrepository_unique_id = "1.2.3.4"\n')
    r = run("status", "--data-dir", str(tmp_path / "d"), "--config", str(cfg))
    assert "repository: 1.2.3.4 " in r.stdout
    cfg.write_text('[xds]\nrepository_unique_id = "not an oid"\n')
    r = run("status", "--data-dir", str(tmp_path / "d"), "--config", str(cfg))
    assert r.returncode == 2 and "repository_unique_id" in r.stderr
