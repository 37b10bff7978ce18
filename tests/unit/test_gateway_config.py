"""``[remotes.NAME]`` and ``[gateway]`` (issue 15): parsing, defaults and the errors for bad values."""

from __future__ import annotations

from pathlib import Path

import pytest

from xdsi.config import ConfigError, load_settings

GOOD = """
[remotes.PACS1]
ae_title = "PACS_ONE"
host = "10.0.0.5"
port = 104
services = ["find", "move"]
move_destination = "XDSI"
known_destinations = ["WS1", "WS2"]
connect_timeout = 5
timeout = 30
find_timeout = 8
max_associations = 2

[remotes.PACS2]
host = "10.0.0.6"
port = 11112
services = ["find", "get"]

[gateway]
remotes = ["PACS1", "PACS2"]
mode = "fallback"
cache = true

[partitions.RESEARCH]
[partitions.RESEARCH.gateway]
remotes = ["PACS2"]
"""


def _load(tmp_path: Path, text: str):  # type: ignore[no-untyped-def]
    p = tmp_path / "xdsi.toml"
    p.write_text(text)
    return load_settings(p, env={})


def test_remotes_and_gateway(tmp_path: Path) -> None:
    s = _load(tmp_path, GOOD)
    r1, r2 = s.remotes["PACS1"], s.remotes["PACS2"]
    assert (r1.ae_title, r1.host, r1.port, r1.services, r1.move_destination) == ("PACS_ONE", "10.0.0.5", 104, ("find", "move"), "XDSI")
    assert r1.knows("WS1") and not r1.knows("OTHER")
    assert (r1.connect_timeout, r1.timeout, r1.find_timeout, r1.max_associations) == (5.0, 30.0, 8.0, 2)
    assert r2.ae_title == "PACS2" and r2.move_destination == "" and r2.offers("get") and not r2.offers("move")
    assert (s.gateway.remotes, s.gateway.mode, s.gateway.cache) == (("PACS1", "PACS2"), "fallback", True)
    research = s.for_partition("RESEARCH")
    assert (research.gateway.remotes, research.gateway.mode, research.gateway.cache) == (("PACS2",), "forward", False)


def test_gateway_off_by_default(tmp_path: Path) -> None:
    s = _load(tmp_path, "")
    assert not s.gateway.enabled and s.remotes == {}
    s = _load(tmp_path, GOOD.replace('[partitions.RESEARCH.gateway]\nremotes = ["PACS2"]\n', ""))
    assert not s.for_partition("RESEARCH").gateway.enabled  # a partition's gateway is its own, not the main one's


def test_star_knows_every_destination(tmp_path: Path) -> None:
    s = _load(tmp_path, GOOD.replace('known_destinations = ["WS1", "WS2"]', 'known_destinations = ["*"]'))
    assert s.remotes["PACS1"].knows("ANYONE")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (('remotes = ["PACS1", "PACS2"]', 'remotes = ["PACS1", "NOPE"]'), "NOPE"),
        (('services = ["find", "get"]', 'services = ["store"]'), "services"),
        (('services = ["find", "get"]', "services = []"), "services"),
        (('mode = "fallback"', 'mode = "proxy"'), "mode"),
        (("cache = true", 'cache = "yes"'), "cache"),
        (("max_associations = 2", "max_associations = 0"), "max_associations"),
        (("find_timeout = 8", "find_timeout = -1"), "find_timeout"),
        (('host = "10.0.0.6"\n', ""), "host and port"),
        (('move_destination = "XDSI"', 'move_destination = "STRANGER"'), "move_destination"),
        (('ae_title = "PACS_ONE"', 'ae_title = "A\\\\B"'), "AE title"),
        (('host = "10.0.0.5"', 'host = "10.0.0.5"\ncolour = "red"'), "colour"),
    ],
)
def test_bad_values_are_refused_in_one_line(tmp_path: Path, change: tuple[str, str], message: str) -> None:
    old, new = change
    assert old in GOOD
    with pytest.raises(ConfigError, match=message):
        _load(tmp_path, GOOD.replace(old, new, 1))


def test_mode_without_remotes_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="needs remotes"):
        _load(tmp_path, '[gateway]\nmode = "forward"\n')


def test_tls_remote_needs_ca_bundle(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="ca_certificates"):
        _load(tmp_path, GOOD.replace('port = 104', 'port = 104\ntls = true'))


def test_example_file_documents_the_gateway() -> None:
    text = (Path(__file__).resolve().parents[2] / "xdsi.example.toml").read_text()
    for key in ("[remotes.", "known_destinations", "move_destination", "find_timeout", "max_associations", "[gateway]", 'mode = "', "cache"):
        assert key in text, key
