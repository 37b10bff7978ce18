"""A QIDO-RS match value the attribute's VR cannot hold is a 400 naming the attribute, not a 500 (found by tests/fuzz)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest
from werkzeug.test import Client

from tests.conftest import make_settings
from xdsi.app import make_app
from xdsi.archive import Archive


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Client]:
    archive = Archive.open(make_settings(Path(tmp_path_factory.mktemp("qido"))))
    try:
        yield Client(make_app(archive, {}))
    finally:
        archive.close()


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("query", ["SeriesNumber=%3A", "SeriesNumber=1-5", "NumberOfStudyRelatedInstances=abc", "InstanceNumber=1e999999"])
def test_a_value_the_vr_cannot_hold_is_400(client: Client, query: str) -> None:
    path = "/dicomweb/instances" if "Instance" in query or "Series" in query else "/dicomweb/studies"
    r = client.get(f"{path}?{query}")
    assert r.status_code == 400, (query, r.status_code, r.get_data(as_text=True))
    assert query.split("=")[0] in r.get_data(as_text=True)


def test_a_valid_number_still_matches(client: Client) -> None:
    assert client.get("/dicomweb/instances?SeriesNumber=5").status_code == 200
