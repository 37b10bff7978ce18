"""Listeners by configuration (issue 12): a port of 0 switches a listener off, never "any free port".

A TLS-only Secure Node turns the plain ports off in the file, the environment or with a flag;
a configuration that leaves nothing listening is refused in one line before anything starts.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from xdsi import cli
from xdsi.config import ConfigError, Listener, Settings, load_settings

TLS = '[tls]\ncertificate = "node.crt"\nprivate_key = "node.key"\n'  # parsing does not open them


def _load(tmp_path: Path, text: str, env: dict[str, str] | None = None, **overrides: object) -> Settings:
    cfg = tmp_path / "xdsi.toml"
    cfg.write_text(text)
    return load_settings(cfg, env=env or {}, overrides=overrides)


def _schemes(s: Settings) -> list[tuple[str, int]]:
    return [(lst.scheme, lst.port) for lst in s.listeners()]


def test_defaults_listen_plain_dicom_and_http(tmp_path: Path) -> None:
    s = load_settings(None, env={})
    assert _schemes(s) == [("http", 8080), ("dicom", 11112)]


def test_tls_only_node_from_the_file(tmp_path: Path) -> None:
    s = _load(tmp_path, "[server]\ndicom_port = 0\nhttp_port = 0\ndicom_tls_port = 2762\nhttps_port = 8443\n" + TLS)
    assert (s.dicom_port, s.http_port) == (0, 0)
    assert _schemes(s) == [("https", 8443), ("dicom+tls", 2762)]
    assert [lst.setting for lst in s.listeners()] == ["https_port", "dicom_tls_port"]


def test_plain_ports_off_from_the_environment(tmp_path: Path) -> None:
    s = _load(tmp_path, "[server]\ndicom_tls_port = 2762\n" + TLS, env={"XDSI_DICOM_PORT": "0", "XDSI_HTTP_PORT": "0"})
    assert _schemes(s) == [("dicom+tls", 2762)]


def test_plain_ports_off_with_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "xdsi.toml"
    cfg.write_text("[server]\nhttps_port = 8443\n" + TLS)
    monkeypatch.delenv("XDSI_CONFIG", raising=False)
    args = cli.build_parser().parse_args(["serve", "--config", str(cfg), "--dicom-port", "0", "--http-port", "0"])
    s = cli._settings(args)
    assert _schemes(s) == [("https", 8443)]


def test_a_tls_port_of_zero_is_off_too(tmp_path: Path) -> None:
    """Without [tls] a TLS port of 0 is no error: it asks for no listener, so it needs no certificate."""
    s = _load(tmp_path, "[server]\nhttps_port = 0\ndicom_tls_port = 0\n")
    assert (s.https_port, s.dicom_tls_port) == (None, None)
    assert _schemes(s) == [("http", 8080), ("dicom", 11112)]


@pytest.mark.parametrize(
    "text,env",
    [
        ("[server]\ndicom_port = 0\nhttp_port = 0\n", {}),
        ("[server]\nhttp_port = 0\n", {"XDSI_DICOM_PORT": "0"}),
        ("[server]\ndicom_port = 0\nhttp_port = 0\nhttps_port = 0\n" + TLS, {}),
    ],
)
def test_no_listener_at_all_is_refused(tmp_path: Path, text: str, env: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match=r"^no listener: \[server\] dicom_port and http_port are 0 \(off\)"):
        _load(tmp_path, text, env)


def test_no_listener_is_one_line_from_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XDSI_CONFIG", raising=False)
    rc = cli.main(["serve", "--data-dir", str(tmp_path / "d"), "--dicom-port", "0", "--http-port", "0"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.splitlines() == [
        "xdsi: configuration error: no listener: [server] dicom_port and http_port are 0 (off) and no dicom_tls_port or "
        "https_port is set; turn at least one on"
    ]
    assert not (tmp_path / "d").exists()  # refused before anything was created


def test_two_listeners_on_one_port_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^https_port 8080 is also http_port"):
        _load(tmp_path, "[server]\nhttps_port = 8080\n" + TLS)


@pytest.mark.parametrize("port", ["-1", "65536"])
def test_out_of_range(tmp_path: Path, port: str) -> None:
    with pytest.raises(ConfigError, match=rf"dicom_port {port} out of range \(0 switches the listener off\)"):
        _load(tmp_path, f"[server]\ndicom_port = {port}\n")


def test_partition_port_zero_is_no_port_of_its_own(tmp_path: Path) -> None:
    s = _load(tmp_path, "[partitions.CT]\ndicom_port = 0\n[partitions.MR]\ndicom_port = 11113\n")
    assert s.partitions["CT"].dicom_port is None
    assert s.listeners()[-1] == Listener("[partitions.MR] dicom_port", "dicom", 11113, "MR")
    assert [lst.label("h") for lst in s.listeners()] == ["http://h:8080/", "dicom://h:11112", "dicom://h:11113 (AE MR)"]


def test_a_partition_port_alone_is_a_listener(tmp_path: Path) -> None:
    s = _load(tmp_path, "[server]\ndicom_port = 0\nhttp_port = 0\n[partitions.MR]\ndicom_port = 11113\n")
    assert _schemes(s) == [("dicom", 11113)]


def test_partition_port_is_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\[partitions.MR\] dicom_port must be an integer"):
        _load(tmp_path, "[partitions.MR]\ndicom_port = 'x'\n")
    with pytest.raises(ConfigError, match=r"\[partitions.MR\] dicom_port 70000 out of range"):
        _load(tmp_path, "[partitions.MR]\ndicom_port = 70000\n")
