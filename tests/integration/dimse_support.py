"""Helpers for the DIMSE integration tests: test data, dcmtk runners, File Meta stripping, status reads."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

from pydicom import dcmread
from pydicom.uid import JPEG2000Lossless, MRImageStorage

from tests.support.environ import environ_with
from tests.support.server import XdsiProcess, free_port
from xdsi.tools.synth import StudySpec, ct_instance, write_study
from xdsi.uids import new_uid

if TYPE_CHECKING:
    from tests.support.netns import NetNS

DCMTK = Path("/usr/bin")
TOOL_TIMEOUT = 120

NON_ASCII_NAME = "MÜLLER^JÖRG"


def dcmtk_available() -> bool:
    return all((DCMTK / t).is_file() for t in ("echoscu", "storescu", "findscu", "movescu", "getscu", "storescp"))


def tool(name: str) -> str:
    """Debian's dcmtk tool by absolute path: the venv's pynetdicom apps shadow the names."""
    return str(DCMTK / name)


def run(cmd: Sequence[str], *, timeout: float = TOOL_TIMEOUT, check: bool = True, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = environ_with(TCP_NODELAY="1")  # called from worker threads too (test_every_object)
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


@dataclass
class StudySet:
    """Two patients: A (non-ASCII name, 3 CT series + 1 JPEG 2000 lossless series), B (one MR study)."""

    root: Path
    spec_a: StudySpec
    spec_b: StudySpec
    files_a: list[Path] = field(default_factory=list)  # uncompressed, series-ordered
    j2k: Path = Path()
    files_b: list[Path] = field(default_factory=list)

    @property
    def all_files(self) -> list[Path]:
        return [*self.files_a, self.j2k, *self.files_b]

    def by_sop(self) -> dict[str, Path]:
        return {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in self.all_files}

    def series_of(self, spec: StudySpec) -> dict[str, list[str]]:
        """Series UID -> SOP Instance UIDs for one study."""
        out: dict[str, list[str]] = {}
        for p in self.all_files:
            ds = dcmread(p, stop_before_pixels=True)
            if ds.StudyInstanceUID == spec.study_uid:
                out.setdefault(str(ds.SeriesInstanceUID), []).append(str(ds.SOPInstanceUID))
        return out


def make_test_data(root: Path) -> StudySet:
    spec_a = StudySpec(
        patient_id="PAT001", patient_name=NON_ASCII_NAME, study_date="20240115", accession="ACC001", description="CT CHEST"
    )
    spec_b = StudySpec(
        patient_id="PAT002",
        patient_name="DOE^JOHN",
        birth_date="19800202",
        sex="M",
        study_date="20230301",
        study_time="083000",
        accession="ACC002",
        description="MR HEAD",
        modality="MR",
        body_part="HEAD",
    )
    data = StudySet(root=root, spec_a=spec_a, spec_b=spec_b)
    data.files_a = write_study(root / "a", spec_a, series=3, per_series=3)
    ds = ct_instance(spec_a, new_uid(), 1, series_number=4, seed=4242)
    ds.compress(JPEG2000Lossless)  # pylibjpeg-openjpeg encoder
    data.j2k = root / "a-j2k" / f"{ds.SOPInstanceUID}.dcm"
    data.j2k.parent.mkdir(parents=True)
    ds.save_as(data.j2k, enforce_file_format=True)
    data.files_b = write_study(root / "b", spec_b, series=1, per_series=2)
    for p in data.files_b:  # synth writes CT images; make B a second SOP class
        mr = dcmread(p)
        mr.SOPClassUID = mr.file_meta.MediaStorageSOPClassUID = MRImageStorage
        mr.save_as(p, enforce_file_format=True)
    return data


def dataset_bytes(path: Path) -> bytes:
    """Everything after the File Meta group: what a peer sent, independent of the meta its receiver wrote."""
    with open(path, "rb") as fh:
        raw = fh.read()
    if raw[128:132] != b"DICM":
        return raw
    pos = 132
    while pos + 8 <= len(raw):
        group = struct.unpack_from("<H", raw, pos)[0]
        if group != 0x0002:
            break
        vr = raw[pos + 4 : pos + 6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN", b"UC", b"UR", b"OD", b"OL", b"OV", b"SV", b"UV"):
            length = struct.unpack_from("<I", raw, pos + 8)[0]
            pos += 12 + length
        else:
            length = struct.unpack_from("<H", raw, pos + 6)[0]
            pos += 8 + length
    return raw[pos:]


def write_config(path: Path, peers: dict[str, tuple[str, int]]) -> Path:
    lines = []
    for aet, (host, port) in peers.items():
        lines += [f"[peers.{aet}]", f'host = "{host}"', f"port = {port}", ""]
    path.write_text("\n".join(lines))
    return path


def http_status(server: XdsiProcess) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/status", timeout=10) as rsp:
        return json.loads(rsp.read())


def cli_status(data_dir: Path) -> dict[str, str]:
    """``xdsi status`` output as {field: value} for the count lines."""
    out = subprocess.run(
        [sys.executable, "-m", "xdsi", "status", "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    fields: dict[str, str] = {}
    for line in out.splitlines():
        key, sep, value = line.partition(":")
        if sep and not line.startswith(" "):
            fields[key.strip()] = value.strip()
    return fields


def storescu(server_host: str, port: int, files: Sequence[Path], *extra: str, prefix: Sequence[str] = (), aec: str = "XDSI") -> subprocess.CompletedProcess[str]:
    return run([*prefix, tool("storescu"), "-v", "-aec", aec, *extra, server_host, str(port), *map(str, files)])


def leftover_temp_files(data_dir: Path) -> list[Path]:
    """``*.part`` files in any tier's ``.tmp`` and spool files in ``<data_dir>/tmp`` (not the empty ones made ahead)."""
    from tests.support.spool import spool_files

    found = [p for p in data_dir.rglob(".tmp/*") if p.is_file()]
    return found + spool_files(data_dir / "tmp")


__all__ = [
    "NON_ASCII_NAME",
    "StudySet",
    "cli_status",
    "dataset_bytes",
    "dcmtk_available",
    "free_port",
    "http_status",
    "leftover_temp_files",
    "make_test_data",
    "run",
    "storescu",
    "tool",
    "write_config",
]


def wait_for_echo(ns: "NetNS", aet: str, port: int, proc: subprocess.Popen[bytes]) -> None:
    """Wait until a dcmtk SCP started inside ``ns`` answers C-ECHO (it exits or 20 s pass: error)."""
    deadline = time.time() + 20
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"storescp {aet} exited with {proc.returncode}")
        if run(ns.cmd(tool("echoscu"), "-aec", aet, "127.0.0.1", str(port)), check=False, timeout=10).returncode == 0:
            return
        time.sleep(0.2)
    raise RuntimeError(f"storescp {aet} did not start")


def stop_processes(procs: Iterable[subprocess.Popen[bytes]]) -> None:
    """Terminate peer processes a test started, killing any that do not exit within 10 s."""
    for p in procs:
        p.terminate()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
