"""Shared fixtures: index databases on SQLite and a real PostgreSQL, archives, running servers."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from tests.support.postgres import PostgresServer
from tests.support.server import XdsiProcess
from xdsi.archive import Archive
from xdsi.config import Settings, StorageSettings, TierSettings

os.environ.setdefault("TCP_NODELAY", "1")  # for every dcmtk tool the tests start


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    server = PostgresServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def index_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty index database on each backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'index.sqlite'}"
    pg: PostgresServer = request.getfixturevalue("postgres")
    return pg.create_database(f"t_{uuid.uuid4().hex[:12]}")


def make_settings(tmp_path: Path, index_url: str | None = None, tiers: int = 1, **kw: object) -> Settings:
    tier_settings = tuple(
        TierSettings(name=name, path=tmp_path / "storage" / name)
        for name in ["cache", "warm", "cold"][:tiers]
    )
    storage = StorageSettings(tiers=tier_settings, **{k: kw.pop(k) for k in list(kw) if k in ("duplicate_policy", "recall_on_read")})  # type: ignore[arg-type]
    return Settings(data_dir=tmp_path / "data", index_url=index_url, storage=storage, **kw)  # type: ignore[arg-type]


@pytest.fixture
def archive(tmp_path: Path, index_url: str) -> Iterator[Archive]:
    a = Archive.open(make_settings(tmp_path, index_url))
    try:
        yield a
    finally:
        a.close()


@pytest.fixture
def xdsi_server(tmp_path: Path) -> Iterator[XdsiProcess]:
    """``xdsi serve`` on its embedded defaults (SQLite, one tier) in a temporary data dir, free ports."""
    proc = XdsiProcess(tmp_path / "xdsi-data").start()
    try:
        yield proc
    finally:
        proc.stop()


#: Test modules of the SOAP/XDS web services and the wire layer under them (by path); scripts/test runs the
#: ones marked ``soap`` again under Python 3.13, where spyne 2.14.0 needs xdsi.soap.spyne_compat and legacy-cgi.
SOAP_MODULE_MARKS = ("conformance/", "soap", "mtom", "test_wire_", "xds_", "xpath")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        rel = Path(str(item.fspath)).resolve().relative_to(Path(__file__).resolve().parent).as_posix()
        if any(mark in rel for mark in SOAP_MODULE_MARKS):
            item.add_marker(pytest.mark.soap)


@pytest.fixture(autouse=True)
def _restore_process_wide_dicom_settings():  # type: ignore[no-untyped-def]
    """An in-process DicomServer sets pynetdicom's process-wide chunking flags (received data sets go to
    spool files) and ``tempfile.tempdir``: put them back after every test, or a later pynetdicom SCU in
    the same process gets empty ``event.request.DataSet``s (found when test_dimse_policy ran before
    test_dimse_pynetdicom) and later temporary files land in a deleted test folder."""
    import tempfile

    from pynetdicom import _config

    saved = (_config.STORE_RECV_CHUNKED_DATASET, _config.STORE_SEND_CHUNKED_DATASET)
    tempdir = tempfile.tempdir  # DicomServer.start points it at the data disk (spool files), a test's tmp_path here
    yield
    _config.STORE_RECV_CHUNKED_DATASET, _config.STORE_SEND_CHUNKED_DATASET = saved
    tempfile.tempdir = tempdir


@pytest.fixture(autouse=True, scope="session")
def _pynetdicom_clients_pause_their_reactor():  # type: ignore[no-untyped-def]
    """Every pynetdicom association a test opens as a client gets xdsi.dimse.reactor_pause, as xdsi's own do.

    pynetdicom's requestor can lose a response to its own reactor thread when it sends right after a
    send and the peer answers at once (the race is described in xdsi/dimse/reactor_pause.py): the test then
    waits out the DIMSE timeout for an answer xdsi did send (CI: a C-ECHO after a C-STORE,
    test_receive_direct).  That is the test client's failure, not the server's; dcmtk's tools have no
    such race, and xdsi's own requestor associations carry the same remedy.
    """
    from pynetdicom.ae import ApplicationEntity

    from xdsi.dimse import reactor_pause

    original = ApplicationEntity.associate

    def associate(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        assoc = original(self, *args, **kwargs)
        reactor_pause.install(assoc)
        return assoc

    ApplicationEntity.associate = associate  # type: ignore[method-assign]
    yield
    ApplicationEntity.associate = original  # type: ignore[method-assign]
