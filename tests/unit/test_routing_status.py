"""The routing queue in ``GET /status`` and ``xdsi status``, main archive and partitions (issue 15)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import pytest
from werkzeug.test import Client

from tests.support.server import dead_port
from xdsi.archive import Archive
from xdsi.config import load_settings
from xdsi.routing.queue import RouteQueue
from xdsi.routing.service import RoutingService
from xdsi.tools.synth import StudySpec, write_study
from xdsi.web.status import status_app


@pytest.fixture()
def hub(tmp_path: Path) -> Iterator[dict[str, Any]]:
    with dead_port() as down:  # refuses every connection: every forward fails and stays queued
        cfg = tmp_path / "xdsi.toml"
        cfg.write_text(f"""
    [server]
    data_dir = "{tmp_path / 'data'}"
    ae_title = "HUBMAIN"

    [peers.WSDOWN]
    host = "127.0.0.1"
    port = {down}

    [[routes]]
    name = "all"
    destinations = ["WSDOWN"]

    [routing]
    retry_initial = 600

    [partitions.PART1]
    """)
        settings = load_settings(cfg, env={})
        main = Archive.open(settings)
        part = Archive.open(settings.for_partition("PART1"))
        try:
            for archive, n, pid in ((main, 2, "M1"), (part, 3, "P1")):
                for f in write_study(tmp_path / f"in-{pid}", StudySpec(patient_id=pid), per_series=n):
                    assert archive.store.store_file(f, source_ae="CT1").ok
                q = RouteQueue(archive, archive.settings.routes, archive.settings.routing)
                RoutingService.__new__(RoutingService).step(q)
            yield {"cfg": cfg, "settings": settings, "main": main, "part": part}
        finally:
            part.close()
            main.close()


def test_status_json_has_the_routing_queue_of_main_and_partitions(hub: dict[str, Any]) -> None:
    main, part = hub["main"], hub["part"]
    rsp = Client(status_app(main, {"HUBMAIN": main, "PART1": part})).get("/")
    assert rsp.status_code == 200
    body = json.loads(rsp.get_data())
    r = body["routing"]
    assert (r["queued"], r["failing"], r["given_up"]) == (2, 2, 0), r
    assert r["destinations"]["WSDOWN"]["queued"] == 2 and "could not be reached" in r["destinations"]["WSDOWN"]["last_error"]
    p = body["partitions"]["PART1"]["routing"]
    assert (p["queued"], p["failing"]) == (3, 3) and p["destinations"]["WSDOWN"]["sent"] == 0, p
    assert "HUBMAIN" not in body["partitions"]


def test_xdsi_status_prints_partition_queues(hub: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    from xdsi.routing.cli import print_status

    print_status(hub["settings"])
    out = capsys.readouterr().out
    assert "routing:    2 forward(s) queued, 2 failing, 0 given up" in out, out
    assert "routing [PART1]: 3 forward(s) queued, 3 failing, 0 given up" in out, out
    assert out.count("WSDOWN: ") == 2 and "WSDOWN: 3 queued (3 failing), 0 sent, 0 given up" in out, out
    assert out.count("could not be reached") == 2, out
