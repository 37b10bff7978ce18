"""What both archive benchmarks share: a scratch folder, an index database, a running ``xdsi serve``.

Everything started here is stopped by the context manager, also when the
benchmark fails half-way.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.support.postgres import PostgresServer  # noqa: E402
from tests.support.server import XdsiProcess  # noqa: E402


def add_index_options(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--index-url", metavar="URL", help="index database (default: SQLite in the scratch folder)")
    g.add_argument("--pg", action="store_true", help="start a throwaway PostgreSQL server and index into it")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder (its path is printed)")


class Bench:
    """A scratch folder, an index URL and (on demand) a running xdsi, all cleaned up on exit."""

    def __init__(self, args: argparse.Namespace, name: str) -> None:
        self.args = args
        self.stack = ExitStack()
        self.dir = Path(tempfile.mkdtemp(prefix=f"xdsi-bench-{name}-"))
        self.data_dir = self.dir / "data"
        self.index_url = args.index_url or f"sqlite:///{self.data_dir / 'index.sqlite'}"
        self.backend = "sqlite"
        if args.index_url:
            self.backend = args.index_url.split(":", 1)[0].split("+", 1)[0]
        if args.pg:
            pg = PostgresServer().start()
            self.stack.callback(pg.stop)
            self.index_url = pg.create_database("bench")
            self.backend = "postgresql"

    def serve(self) -> XdsiProcess:
        env = {"XDSI_INDEX_URL": self.index_url, "XDSI_LOG_LEVEL": "WARNING", "TCP_NODELAY": "1"}
        proc = XdsiProcess(self.data_dir, env=env).start(timeout=60)
        self.stack.callback(proc.stop)
        return proc

    def close(self) -> None:
        self.stack.close()
        if self.args.keep:
            print(f"scratch folder kept: {self.dir}")
        else:
            shutil.rmtree(self.dir, ignore_errors=True)


@contextmanager
def bench(args: argparse.Namespace, name: str) -> Iterator[Bench]:
    b = Bench(args, name)
    try:
        yield b
    finally:
        b.close()


def machine() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{platform.node()} {os.cpu_count()} cpu, load {load:.1f}, python {platform.python_version()}"


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile: a value that was actually measured."""
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(round(p / 100 * len(s) + 0.5)) - 1))
    return s[k]


def median(values: list[float]) -> float:
    return statistics.median(values)
