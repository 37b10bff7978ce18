"""``xdsi serve`` start-up failures: one line naming the setting and its flag, exit status 2, no traceback.

A busy port or a data directory that cannot be created is the operator's to fix; the
message must say which setting, as configuration mistakes already do.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from tests.integration.cli_support import without_dac_override
from tests.support.server import free_port


def _ports() -> tuple[str, ...]:
    """Free ports for both plain listeners: 0 would switch them off, and a node with no listener is refused first."""
    return ("--dicom-port", str(free_port()), "--http-port", str(free_port()))


def serve(*args: str, preexec=None) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    # a start that wrongly succeeds would serve forever: the timeout turns that into a failure
    return subprocess.run([sys.executable, "-m", "xdsi", "serve", *args], capture_output=True, text=True, timeout=60, preexec_fn=preexec)


@pytest.fixture()
def busy_port() -> Iterator[int]:
    """A port on 127.0.0.1 that something else is listening on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.mark.parametrize("setting,flag", [("dicom_port", "--dicom-port"), ("http_port", "--http-port")])
def test_busy_port_is_one_line_naming_the_setting(tmp_path: Path, busy_port: int, setting: str, flag: str) -> None:
    ports = {"--dicom-port": str(free_port()), "--http-port": str(free_port()), flag: str(busy_port)}
    out = serve("--data-dir", str(tmp_path / "data"), "--host", "127.0.0.1", *(x for kv in ports.items() for x in kv))
    assert out.returncode == 2, out.stdout + out.stderr
    assert "Traceback" not in out.stderr
    assert out.stderr.splitlines() == [f"xdsi: [server] {setting} {busy_port} ({flag}): address already in use"], out.stderr
    assert "serving" not in out.stdout


def test_data_dir_under_a_regular_file_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("in the way")
    data = tmp_path / "file" / "data"
    out = serve("--data-dir", str(data), *_ports())
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stderr.splitlines() == [
        f"xdsi: [server] data_dir {data} (--data-dir): cannot create {data}: {tmp_path / 'file'} is a file, not a directory"
    ], out.stderr


def test_a_data_dir_that_is_a_file_is_one_line(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.write_text("not a folder")
    out = serve("--data-dir", str(data), *_ports())
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stderr.splitlines() == [f"xdsi: [server] data_dir {data} (--data-dir): cannot create {data}: {data} is a file, not a directory"], out.stderr


def test_an_uncreatable_tier_names_its_setting(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("in the way")
    cfg = tmp_path / "xdsi.toml"
    cfg.write_text(f'[server]\ndata_dir = "{tmp_path / "data"}"\n\n[[storage.tiers]]\nname = "hot"\npath = "{tmp_path / "file" / "hot"}"\n')
    out = serve("--config", str(cfg), *_ports())
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stderr.splitlines() == [
        f"xdsi: [[storage.tiers]] hot path {tmp_path / 'file' / 'hot'}: cannot create {tmp_path / 'file' / 'hot'}: {tmp_path / 'file'} is a file, not a directory"
    ], out.stderr


def test_a_read_only_data_dir_is_one_line(tmp_path: Path) -> None:
    """The directory exists but cannot be written: found by writing, before anything listens."""
    data = tmp_path / "data"
    data.mkdir()
    data.chmod(0o555)
    preexec = None
    if os.geteuid() == 0:  # root writes anywhere; the server runs as root without the DAC override capabilities
        probe = subprocess.run([sys.executable, "-c", f"open({str(data / 'x')!r}, 'wb')"], capture_output=True, preexec_fn=without_dac_override)
        if probe.returncode == 0:
            pytest.skip("root without CAP_DAC_OVERRIDE still writes into a mode-555 folder here")
        preexec = without_dac_override
    try:
        out = serve("--data-dir", str(data), *_ports(), preexec=preexec)
    finally:
        data.chmod(0o755)
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stderr.splitlines() == [f"xdsi: [server] data_dir {data} (--data-dir): cannot write in {data}: permission denied"], out.stderr
