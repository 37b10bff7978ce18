"""Fixtures for the DIMSE integration tests: generated studies and a running, loaded ``xdsi serve``."""

from __future__ import annotations

from typing import Iterator

import pytest

from tests.integration.dimse_support import StudySet, dcmtk_available, make_test_data, storescu
from tests.support.server import XdsiProcess


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if dcmtk_available():
        return
    skip = pytest.mark.skip(reason="Debian's dcmtk tools are not installed in /usr/bin")
    for item in items:
        if "dcmtk" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def test_data(tmp_path_factory: pytest.TempPathFactory) -> StudySet:
    return make_test_data(tmp_path_factory.mktemp("dicom"))


def load(server: XdsiProcess, data: StudySet, prefix: list[str] | None = None) -> None:
    """Send the test data with storescu: uncompressed files as they are, the JPEG 2000 one proposing its syntax."""
    storescu(server.host, server.dicom_port, [*data.files_a, *data.files_b], prefix=prefix or [])
    storescu(server.host, server.dicom_port, [data.j2k], "-xv", "-R", prefix=prefix or [])


@pytest.fixture(scope="module")
def loaded_server(tmp_path_factory: pytest.TempPathFactory, test_data: StudySet) -> Iterator[XdsiProcess]:
    """One ``xdsi serve`` holding the test data, shared by read-only tests (find, get)."""
    if not dcmtk_available():
        pytest.skip("Debian's dcmtk tools are not installed in /usr/bin")
    server = XdsiProcess(tmp_path_factory.mktemp("xdsi") / "data").start()
    try:
        load(server, test_data)
        yield server
    finally:
        server.stop()
