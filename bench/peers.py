"""The plumbing every peer benchmark shares: its own network namespace, the shared peer scripts, /proc CPU.

Benchmarks that put xdsi beside Orthanc or dcmtk run on a machine shared with other
people's benchmarks, so each one works in a network namespace of its own (only ``lo``)
and on ports of its own: ``BENCH_NETNS`` and ``BENCH_PORT_BASE`` override the defaults a
benchmark passes to :meth:`Netns.from_env`.  The script re-executes itself inside the
namespace (:meth:`Netns.reexec`); the peers are started by the shared scripts in
``/work/shared/peers`` (``BENCH_PEERS`` names another folder) with the environment
:meth:`Netns.peer_env` builds, so one benchmark never stops another's peers.

Port layout under the base: +1 Orthanc DICOM, +2 Orthanc HTTP, +3 storescp, +4 dcmqrscp.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

PEERS = Path(os.environ.get("BENCH_PEERS", "/work/shared/peers"))
STORESCU = "/usr/bin/storescu"  # dcmtk's, not pynetdicom's app of the same name in the venv
CLK_TCK = os.sysconf("SC_CLK_TCK")
_FLAG = "_XDSI_BENCH_IN_NETNS"


@dataclass(frozen=True)
class Netns:
    """A benchmark's private network namespace and the base of its ports."""

    name: str
    port_base: int

    @classmethod
    def from_env(cls, default_name: str, default_port_base: int) -> "Netns":
        """The benchmark's defaults, unless ``BENCH_NETNS`` / ``BENCH_PORT_BASE`` say otherwise."""
        return cls(os.environ.get("BENCH_NETNS", default_name), int(os.environ.get("BENCH_PORT_BASE", str(default_port_base))))

    def inside(self) -> bool:
        """True in the copy of the script that :meth:`reexec` started."""
        return os.environ.get(_FLAG) == self.name

    def reexec(self, script: str, argv: list[str]) -> int:
        """Create the namespace (only ``lo``), run ``script`` again inside it; delete the namespace after if we created it.

        A namespace that already existed (someone else's, or kept on purpose) is left alone.
        """
        created = not Path(f"/var/run/netns/{self.name}").exists()
        if created:
            subprocess.run(["ip", "netns", "add", self.name], check=True)
        try:
            subprocess.run(["ip", "netns", "exec", self.name, "ip", "link", "set", "lo", "up"], check=True)
            env = {**os.environ, _FLAG: self.name, "TCP_NODELAY": "1"}
            return subprocess.run(["ip", "netns", "exec", self.name, sys.executable, script, *argv], env=env).returncode
        finally:
            if created:
                subprocess.run(["ip", "netns", "del", self.name], check=False)

    def enter(self, script: str, argv: list[str], *tools: str) -> int | None:
        """The start of every benchmark's ``main``: None inside the namespace (go on), else the exit status to return.

        Outside it checks the client ``tools`` (dcmtk's, by path) first, then runs the script again inside.
        """
        if self.inside():
            return None
        for tool in tools:
            if not os.access(tool, os.X_OK):
                print(f"{tool} missing: apt-get install dcmtk", file=sys.stderr)
                return 2
        return self.reexec(script, argv)

    def port(self, offset: int) -> int:
        return self.port_base + offset

    def peer_env(self, work: Path, **extra: str) -> dict[str, str]:
        """Settings for the shared peer scripts: our namespace, our ports, our folders; ``extra`` e.g. ``STORESCP_OPTS``."""
        return {
            **os.environ,
            "BENCH_NETNS": self.name,
            "BENCH_ROOT": str(work / "peers"),
            "ORTHANC_DICOM_PORT": str(self.port_base + 1),
            "ORTHANC_HTTP_PORT": str(self.port_base + 2),
            "STORESCP_PORT": str(self.port_base + 3),
            "DCMQRSCP_PORT": str(self.port_base + 4),
            "TCP_NODELAY": "1",
            **extra,
        }


def peer(script: str, env: dict[str, str], *args: str) -> None:
    """Run a shared peer script (e.g. ``start_orthanc.sh --fresh``); raises with its output if it fails."""
    r = subprocess.run([str(PEERS / script), *args], env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{script} failed ({r.returncode}):\n{r.stdout}{r.stderr}")


def stop_peer(script: str, env: dict[str, str], *args: str) -> None:
    """Run a shared stop script, ignoring its outcome: used in ``finally`` blocks, where a failure must not hide the first."""
    subprocess.run([str(PEERS / script), *args], env=env, capture_output=True)


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of one process (children excluded), 0 if it is gone; from ``/proc/<pid>/stat``."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rfind(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime


def tree_cpu(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and every living descendant (a supervisor's workers), from ``/proc``."""
    return sum(tree_split(pid))


def tree_split(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of ``pid`` and every living descendant, from ``/proc``."""
    user, system, _ = tree_stat(pid)
    return user, system


def tree_stat(pid: int) -> tuple[float, float, int]:
    """(user, system) CPU seconds and minor page faults of ``pid`` and every living descendant, from ``/proc``.

    Minor faults show memory the kernel hands out afresh (a buffer allocated and freed per instance by
    ``mmap``/``madvise`` is faulted in again page by page), which the CPU figures only show as system time.
    """
    children: dict[int, list[int]] = {}
    stats: dict[int, tuple[float, float, int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            raw = (d / "stat").read_text()
        except OSError:
            continue
        rest = raw[raw.rindex(")") + 2 :].split()
        children.setdefault(int(rest[1]), []).append(int(d.name))
        stats[int(d.name)] = (int(rest[11]) / CLK_TCK, int(rest[12]) / CLK_TCK, int(rest[7]))  # utime, stime, minflt
    user = system = 0.0
    faults = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        u, s, f = stats.get(p, (0.0, 0.0, 0))
        user, system, faults = user + u, system + s, faults + f
        todo.extend(children.get(p, []))
    return user, system, faults


def count_files(folder: Path) -> int:
    """Files below ``folder`` (0 if it does not exist): what a receiving storescp/getscu wrote."""
    return sum(1 for p in folder.rglob("*") if p.is_file()) if folder.exists() else 0


def load_line() -> str:
    la = os.getloadavg()
    return f"load average {la[0]:.2f} {la[1]:.2f} {la[2]:.2f} on {os.cpu_count()} CPUs"


# -- the scratch file system ------------------------------------------------------------------------------
#
# Why this section exists (measured 2026-11-30): this machine's root file system is ext4 *without a journal*
# (``/sys/fs/ext4/vda/journal_task`` is ``<none>``).  There ext4 will not reuse an inode freed in the last
# 60 s (360 s while its inode-table block is dirty), and to find a free one it reads the inode table for every
# such inode in the block group, on each create.  After a round deleted its 500 files, every file created
# in that block group cost 300-860 us of kernel CPU instead of 16-28 us: storescp's CPU per instance swung
# 0.44 -> 1.24 ms between rounds of one run, and xdsi's "CPU growth at four associations" came and went with
# it.  So a benchmark never deletes during its run: what a round filled is set aside (renamed, which frees
# no inode) and deleted with the scratch folder at the end, and a run first waits until creating files in
# its scratch folder is cheap again (:func:`settle_inodes`), so a run does not pay for the one before.


def scratch(prefix: str, env: str = "BENCH_SCRATCH", default: str = "/var/tmp") -> Path:
    """A new scratch folder for one run: under ``$env`` (``BENCH_SCRATCH``), else ``default`` (``/var/tmp``).

    Not ``/tmp``: many systems mount a tmpfs there (Debian 13 does by default), where fsync costs nothing and
    every durable receiver would be measured against one that is not; and on this machine ``/tmp`` is where
    every test and CI clone churns inodes.
    """
    root = Path(os.environ.get(env) or default)
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=root))


def set_aside(path: Path, work: Path) -> None:
    """Move ``path`` (a folder a round filled) into ``work/trash`` instead of deleting it now (see above)."""
    if not path.exists():
        return
    trash = work / "trash"
    trash.mkdir(exist_ok=True)
    path.rename(trash / f"{len(list(trash.iterdir())):04d}-{path.name}")


def create_cost(folder: Path, n: int = 200) -> float:
    """Kernel + user CPU in microseconds to create one empty file in ``folder`` (the files are kept: no frees)."""
    probe = Path(tempfile.mkdtemp(prefix="probe-", dir=folder))
    t = time.thread_time_ns()
    for i in range(n):
        os.close(os.open(probe / f"{i}", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    return (time.thread_time_ns() - t) / n / 1000


def settle_inodes(folder: Path, quiet_us: float = 80.0, patience: float = 400.0) -> str:
    """Wait (at most ``patience`` s) until creating a file in ``folder`` costs under ``quiet_us``; a line saying so.

    Probe folders go to ``folder/trash`` like everything else.
    """
    probes = folder / "trash"
    probes.mkdir(exist_ok=True)
    t0 = time.monotonic()
    first = cost = create_cost(probes)
    while cost > quiet_us and time.monotonic() - t0 < patience:
        time.sleep(10)
        cost = create_cost(probes)
    waited = time.monotonic() - t0
    return (f"file create in the scratch folder {cost:.0f} us" + (f" (was {first:.0f} us; waited {waited:.0f} s for inodes "
            f"freed by an earlier run)" if first > quiet_us else "") + ("" if cost <= quiet_us else " - NOT settled: figures noisy"))


def dirty_mb() -> float:
    """Page-cache data not yet on disk (``Dirty`` + ``Writeback`` of /proc/meminfo), MB."""
    fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
    return sum(int(fields.get(k, "0 kB").split()[0]) for k in ("Dirty", "Writeback")) / 1024


def settle_writeback(quiet_mb: float = 8.0, patience: float = 60.0) -> float:
    """Write back what earlier runs left dirty (``sync``) and wait until under ``quiet_mb`` remains; the MB found.

    Why (measured 2026-12-01): storescp +B acknowledges before its data is on disk, so its run leaves ~250 MB
    for the kernel to write back while the next server is measured (xdsi or Orthanc, which fsync theirs and
    leave 1-4 MB), and that server's fsyncs queue behind the write-back.  So every measured run starts with
    nothing of anyone's left to write, and pays only its own.
    """
    found = dirty_mb()
    os.sync()
    t0 = time.monotonic()
    while dirty_mb() > quiet_mb and time.monotonic() - t0 < patience:
        time.sleep(0.2)
    return found


# -- this machine's memory ---------------------------------------------------------------------------------
#
# Why (measured 2026-12-01): this VM (Firecracker, KVM) reports free memory back to its host (virtio-balloon
# free page reporting; /sys/module/page_reporting: page_reporting_order 9, max_waiting_mib 1024).  Up to about
# 1 GiB of recently freed memory waits unreported; a page taken from memory already reported is faulted in by
# the host when first written.  A loop writing new 512 KiB files (never deleted) cost 0.40 ms of system time
# per file for the first ~1 GB, then 1.5-1.7 ms; after truncating those files, new writes cost 0.27-0.49 ms
# again.  A bench keeps what each round wrote (see above), so every run went from "warm" to "cold" memory
# after ~1 GB: storescp +B swung 1700 -> 550 inst/s, xdsi 400 -> 270, and every ratio depended on which
# server ran before the switch.  So what a round wrote is truncated once it has been checked
# (:func:`release_pages`): its pages go back to the guest's free memory, the next round writes into them, and
# every round runs in the state a long-running server is in (memory recycled by the page cache, not fresh
# from the host).  Truncating frees no inode, so the inode scans of the section above do not come back.


def release_pages(folder: Path | None) -> None:
    """Truncate every file under ``folder`` to nothing: their page-cache pages are freed, their inodes kept."""
    if folder is None or not folder.exists():
        return
    for root, _dirs, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            try:
                if not os.path.islink(path):
                    os.truncate(path, 0)
            except OSError:
                pass


def reported_mb() -> float | None:
    """Memory the guest has reported free to its host so far (MB), or None where the kernel does not say."""
    try:
        return int(Path("/sys/module/page_reporting/parameters/reported_kib").read_text()) / 1024
    except (OSError, ValueError):
        return None


def remove_work(work: Path, keep: bool) -> None:
    """The scratch folder, removed unless ``--keep`` asked to keep it (then its path is printed)."""
    if keep:
        print(f"kept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)


@contextmanager
def py_spy(pid: int, out: Path, subprocesses: bool = False, settle: float = 1.0, wait: float = 60) -> Iterator[None]:
    """py-spy (``--native`` off) records ``pid`` during the ``with`` block: a flame graph if ``out`` ends in .svg, else raw stacks.

    ``PYSPY_GIL=1`` samples only the thread holding the GIL; ``subprocesses`` follows a supervisor's workers.
    ``settle`` gives py-spy time to attach before the measured work starts.
    """
    spy = subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "-r", os.environ.get("PYSPY_RATE", "200"), "-o", str(out), "-p", str(pid), "--threads",
                            *(["--subprocesses"] if subprocesses else []), *(["--gil"] if os.environ.get("PYSPY_GIL") else []),
                            *(["-f", "raw"] if out.suffix != ".svg" else [])], stdout=subprocess.DEVNULL)  # fmt: skip
    try:
        time.sleep(settle)
        yield
    finally:
        spy.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        spy.wait(wait)


def process_tree(pid: int) -> list[int]:
    """pid and its descendants (a supervisor's workers)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*/children"):
            try:
                todo += [int(c) for c in task.read_text().split()]
            except OSError:
                pass
    return out


def _thread_ticks(pids: list[int]) -> dict[int, tuple[int, int]]:
    """tid -> (utime, stime) in clock ticks, for every thread of these processes."""
    ticks = {}
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").glob("*"):
            try:
                fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            ticks[int(task.name)] = (int(fields[11]), int(fields[12]))
    return ticks


@contextmanager
def thread_cpu(pid: int, n: int, top: int = 12, name_after: float = 0.4) -> Iterator[Callable[[float], None]]:
    """CPU per thread of ``pid`` and its children over the ``with`` block, per unit of work (``n`` units).

    Why: which thread is the serial bottleneck, and how busy it is.  Python 3.11 gives its threads no OS
    names, so one ``py-spy dump`` per process, ``name_after`` seconds in, names them (pausing them once); a thread that ends
    inside the block (an association's) is kept, as its ticks are sampled every 50 ms.  The block gets a
    function to call with its wall time afterwards, which prints the table.
    """
    import re
    import threading

    before = _thread_ticks(process_tree(pid))
    seen: dict[int, tuple[int, int]] = {}
    names: dict[int, str] = {}
    done = threading.Event()

    def watch() -> None:
        named = time.monotonic() + name_after
        while not done.is_set():
            seen.update(_thread_ticks(process_tree(pid)))
            if named and time.monotonic() > named:
                named = 0
                for p in process_tree(pid):
                    out = subprocess.run([str(Path(sys.executable).parent / "py-spy"), "dump", "-p", str(p)],
                                         capture_output=True, text=True).stdout
                    for m in re.finditer(r'^Thread (\d+) \((?:idle|active)[^)]*\): "([^"]*)"', out, re.M):
                        names[int(m.group(1))] = f"{p}:{m.group(2)}"
            done.wait(0.05)

    def report(wall: float) -> None:
        hz = os.sysconf("SC_CLK_TCK")
        rows = []
        for tid, (u, s) in seen.items():
            u0, s0 = before.get(tid, (0, 0))
            cpu = (u - u0 + s - s0) / hz
            if cpu > 0:
                rows.append((cpu, (u - u0) / hz, (s - s0) / hz, tid))
        total = sum(row[0] for row in rows)
        print(f"threads: {n} in {wall:.2f} s ({n / wall:.1f}/s; py-spy dump paused the server once); all threads "
              f"{total * 1000 / n:.2f} ms each")
        for cpu, u, s, tid in sorted(rows, reverse=True)[:top]:
            print(f"  {names.get(tid, str(tid))[:48]:48s} {cpu * 1000 / n:5.2f} ms (user {u * 1000 / n:.2f}, "
                  f"system {s * 1000 / n:.2f})  busy {100 * cpu / wall:3.0f}%")

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        yield report
    finally:
        done.set()
        watcher.join()
        seen.update(_thread_ticks(process_tree(pid)))
