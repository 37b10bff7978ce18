"""`xdsi serve` publishing a study received over C-STORE; registry down across an xdsi restart; `xdsi publish` / `status --study`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from tests.support.registry import TestRegistry
from tests.support.server import XdsiProcess, c_store, wait_until
from tests.support.xds import PATIENT_CX, PATIENT_ROWS_TOML, ext_id, find_documents
from xdsi.tools.synth import StudySpec, write_study
from xdsi.standards import constants as C
from xdsi.xds.codes import CodeTable


@pytest.fixture
def registry() -> Iterator[TestRegistry]:
    with TestRegistry(CodeTable.load(), {PATIENT_CX}) as reg:
        yield reg


def config(tmp_path: Path, registry: TestRegistry, **extra: object) -> Path:
    values: dict[str, object] = {
        "mode": "integrated", "registry_url": registry.registry_url, "stability_delay": 1, "poll_interval": 0.3,
        "retry_initial": 0.5, "retry_max": 1, "timeout": 5, **extra,
    }

    def toml(v: object) -> str:
        return ("true" if v else "false") if isinstance(v, bool) else (f'"{v}"' if isinstance(v, str) else str(v))

    p = tmp_path / "xdsi.toml"
    p.write_text("[xds]\n" + "".join(f"{k} = {toml(v)}\n" for k, v in values.items()) + PATIENT_ROWS_TOML)  # PAT001 mapped
    return p




def xdsi(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "xdsi", *args], capture_output=True, text=True, timeout=120)


def test_cstore_then_published_automatically(tmp_path: Path, registry: TestRegistry) -> None:
    spec = StudySpec()
    paths = write_study(tmp_path / "in", spec, series=2, per_series=2)
    proc = XdsiProcess(tmp_path / "data", config=config(tmp_path, registry)).start()
    try:
        c_store(proc, paths)
        docs = wait_until(lambda: find_documents(registry.registry_url, PATIENT_CX))
        assert len(docs) == 1
        kos_uid = ext_id(docs[0], C.DE_UNIQUE_ID)
        # the KOS served over ITI-43 by the running server equals the one it registered (hash and size)
        from xdsi.xds.client import RepositoryClient

        # a consumer takes the repositoryUniqueId from the registered DocumentEntry
        entry = registry.by_unique_id(kos_uid)
        result, got = RepositoryClient(f"http://127.0.0.1:{proc.http_port}/xdsi/DocumentRepository", timeout=10).retrieve(
            entry.repository_unique_id, [kos_uid])
        assert result.success, result.error_text()
        import hashlib

        assert hashlib.sha1(got[kos_uid][1]).hexdigest() == entry.hash and len(got[kos_uid][1]) == entry.size
    finally:
        proc.stop()
    out = xdsi("status", "--data-dir", str(tmp_path / "data"), "--config", str(tmp_path / "xdsi.toml"), "--study", spec.study_uid)
    assert out.returncode == 0, out.stderr
    assert f"registered: manifest {kos_uid}" in out.stdout and "ITI-42" in out.stdout and "Success" in out.stdout


def test_registry_down_survives_xdsi_restart(tmp_path: Path, registry: TestRegistry) -> None:
    spec = StudySpec()
    paths = write_study(tmp_path / "in", spec, series=1, per_series=2)
    cfg = config(tmp_path, registry)
    registry.down = True
    proc = XdsiProcess(tmp_path / "data", config=cfg).start()
    try:
        c_store(proc, paths)
        wait_until(lambda: _queued(tmp_path, cfg))
    finally:
        proc.stop()
    status = xdsi("status", "--data-dir", str(tmp_path / "data"), "--config", str(cfg))
    assert "[pending]" in status.stdout and "503" in status.stdout, status.stdout
    assert registry.find_by_patient(PATIENT_CX) == []  # the registry is still down: asked directly
    registry.down = False
    proc = XdsiProcess(tmp_path / "data", config=cfg).start()
    try:
        docs = wait_until(lambda: find_documents(registry.registry_url, PATIENT_CX))
        assert len(docs) == 1
    finally:
        proc.stop()
    assert registry.count_actions(C.ACTION_ITI42) == 1


def _queued(tmp_path: Path, cfg: Path) -> bool:
    out = xdsi("status", "--data-dir", str(tmp_path / "data"), "--config", str(cfg))
    return "[pending]" in out.stdout and "last answer" in out.stdout


def test_publish_command(tmp_path: Path, registry: TestRegistry) -> None:
    spec = StudySpec()
    data = tmp_path / "data"
    cfg = config(tmp_path, registry, auto_publish=False, stability_delay=3600)
    imp = xdsi("import", "--data-dir", str(data), "--config", str(cfg), "--no-progress", *map(str, write_study(tmp_path / "in", spec)))
    assert imp.returncode == 0, imp.stderr
    registry.known_patients.clear()  # the affinity domain does not know the patient yet
    out = xdsi("publish", "--data-dir", str(data), "--config", str(cfg), spec.study_uid)
    assert out.returncode == 1 and "XDSUnknownPatientId" in out.stdout and "Failure" in out.stdout, out.stdout + out.stderr
    registry.known_patients.add(PATIENT_CX)  # the PIX feed arrived
    out = xdsi("publish", "--data-dir", str(data), "--config", str(cfg), spec.study_uid)
    assert out.returncode == 0 and "Success" in out.stdout, out.stdout + out.stderr
    assert len(find_documents(registry.registry_url, PATIENT_CX)) == 1
    out = xdsi("publish", "--data-dir", str(data), "--config", str(cfg), "1.2.3.999")
    assert out.returncode == 1
    out = xdsi("publish", "--data-dir", str(data), "--config", str(cfg), "../etc")
    assert out.returncode == 2 and "not a valid DICOM UID" in out.stderr
