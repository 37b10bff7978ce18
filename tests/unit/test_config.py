"""Settings from TOML, XDSI_* environment and command-line flags, and the errors for bad values."""

from __future__ import annotations

from pathlib import Path

import pytest

from xdsi import cli
from xdsi.config import ConfigError, Peer, Settings, load_settings, parse_size

REPO = Path(__file__).resolve().parents[2]

FULL = """
[server]
data_dir = "var"
host = "0.0.0.0"
dicom_port = 4242
http_port = 8042
ae_title = "ARCHIVE1"
log_level = "DEBUG"

[index]
url = "postgresql+psycopg://xdsi@db.example/xdsi"

[storage]
duplicate_policy = "replace"
recall_on_read = false

[[storage.tiers]]
name = "ssd"
path = "hot"
migrate_after_days = 30
high_watermark = "10 GiB"
low_watermark = "8GiB"

[[storage.tiers]]
name = "hdd"
path = "/srv/hdd"
migrate_after_days = 365.5
high_watermark = "2 TB"
low_watermark = 1500000000000

[[storage.tiers]]
name = "nas"
path = "/mnt/nas"

[peers.PACS1]
host = "pacs.example"
port = 104

[peers."VIEWER 2"]
host = "10.0.0.7"
port = 11112

[dimse]
dimse_timeout = 120
acse_timeout = 15.5
network_timeout = 90
max_associations = 8
"""


def write(tmp_path: Path, text: str, name: str = "xdsi.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_full_file(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, FULL), env={})
    assert s.data_dir == tmp_path / "var"  # relative to the config file
    assert (s.host, s.dicom_port, s.http_port, s.ae_title, s.log_level) == ("0.0.0.0", 4242, 8042, "ARCHIVE1", "DEBUG")
    assert s.effective_index_url == "postgresql+psycopg://xdsi@db.example/xdsi"
    st = s.effective_storage
    assert (st.duplicate_policy, st.recall_on_read) == ("replace", False)
    assert [t.name for t in st.tiers] == ["ssd", "hdd", "nas"]
    ssd, hdd, nas = st.tiers
    assert ssd.path == (tmp_path / "var" / "hot").resolve()  # relative tier paths live under data_dir
    assert (ssd.migrate_after_days, ssd.high_watermark, ssd.low_watermark) == (30.0, 10 * 2**30, 8 * 2**30)
    assert (hdd.path, hdd.migrate_after_days, hdd.high_watermark, hdd.low_watermark) == (
        Path("/srv/hdd"), 365.5, 2 * 10**12, 1_500_000_000_000,
    )
    assert (nas.migrate_after_days, nas.high_watermark) == (None, None)
    assert s.peers == {"PACS1": Peer("PACS1", "pacs.example", 104), "VIEWER 2": Peer("VIEWER 2", "10.0.0.7", 11112)}
    assert s.peer(" PACS1 ") == Peer("PACS1", "pacs.example", 104)
    assert (s.dimse_timeout, s.acse_timeout, s.network_timeout, s.max_associations) == (120, 15.5, 90, 8)


def test_defaults_without_a_file(tmp_path: Path) -> None:
    s = load_settings(None, env={})
    assert s == Settings()
    assert [t.name for t in s.effective_storage.tiers] == ["cache"]
    assert s.effective_index_url.startswith("sqlite:///") and s.effective_index_url.endswith("xdsi-data/index.sqlite")


@pytest.mark.parametrize(
    "text,expected",
    [
        ("10 GiB", 10 * 2**30), ("10GiB", 10 * 2**30), ("10 gib", 10 * 2**30), ("500 GB", 500 * 10**9),
        ("1.5 TiB", int(1.5 * 2**40)), ("2 MB", 2 * 10**6), ("3 KiB", 3072), ("12", 12), ("12 B", 12), (4096, 4096),
        ("1 T", 10**12), ("1 Gi", 2**30),
    ],
)
def test_sizes(text: object, expected: int) -> None:
    assert parse_size(text) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["ten GB", "10 XB", "-5 GB", "", "1e3 GB", "5 GBs", -1, True, 1.5])
def test_bad_sizes(bad: object) -> None:
    with pytest.raises(ConfigError):
        parse_size(bad)  # type: ignore[arg-type]


def test_environment_overrides_file(tmp_path: Path) -> None:
    env = {
        "XDSI_AE_TITLE": "FROMENV",
        "XDSI_DICOM_PORT": "5104",
        "XDSI_HTTP_PORT": "9090",
        "XDSI_HOST": "127.0.0.2",
        "XDSI_INDEX_URL": "sqlite:////tmp/other.sqlite",
        "XDSI_DATA_DIR": str(tmp_path / "envdata"),
        "XDSI_LOG_LEVEL": "warning",
        "UNRELATED": "x",
    }
    s = load_settings(write(tmp_path, FULL), env=env)
    assert (s.ae_title, s.dicom_port, s.http_port, s.host) == ("FROMENV", 5104, 9090, "127.0.0.2")
    assert s.index_url == "sqlite:////tmp/other.sqlite"
    assert s.data_dir == tmp_path / "envdata"
    assert s.log_level == "WARNING"
    # relative tier paths follow the data directory that finally applies
    assert s.effective_storage.tiers[0].path == (tmp_path / "envdata" / "hot").resolve()


def test_environment_names_the_config_file(tmp_path: Path) -> None:
    cfg = write(tmp_path, FULL)
    assert load_settings(None, env={"XDSI_CONFIG": str(cfg)}).ae_title == "ARCHIVE1"


@pytest.mark.parametrize(
    "var,value,message",
    [
        ("XDSI_DICOM_PORT", "abc", "XDSI_DICOM_PORT"),
        ("XDSI_HTTP_PORT", "99999", "http_port"),
        ("XDSI_AE_TITLE", "WAY_TOO_LONG_AE_TITLE", "AE title"),
        ("XDSI_LOG_LEVEL", "LOUD", "log_level"),
    ],
)
def test_bad_environment(var: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(None, env={var: value})


def _cli_settings(argv: list[str]) -> Settings:
    return cli._settings(cli.build_parser().parse_args(argv))


def test_cli_flags_override_environment_and_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = write(tmp_path, FULL)
    monkeypatch.setenv("XDSI_AE_TITLE", "FROMENV")
    monkeypatch.setenv("XDSI_DICOM_PORT", "5104")
    s = _cli_settings(["serve", "--config", str(cfg), "--ae-title", "FROMCLI", "--http-port", "7000",
                       "--data-dir", str(tmp_path / "clidata")])
    assert (s.ae_title, s.dicom_port, s.http_port) == ("FROMCLI", 5104, 7000)
    assert s.data_dir == tmp_path / "clidata"
    assert s.effective_storage.tiers[0].path == (tmp_path / "clidata" / "hot").resolve()
    assert s.effective_storage.tiers[1].path == Path("/srv/hdd")


def test_cli_reports_configuration_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    for var in [v for v in __import__("os").environ if v.startswith("XDSI_")]:
        monkeypatch.delenv(var)
    assert cli.main(["status", "--data-dir", str(tmp_path / "d"), "--config", str(write(tmp_path, '[server]\nae_title = "A\\\\B"\n'))]) == 2
    err = capsys.readouterr().err
    assert "configuration error" in err and "'A\\\\B'" in err and "AE title" in err
    assert cli.main(["serve", "--config", str(tmp_path / "missing.toml")]) == 2
    assert "not found" in capsys.readouterr().err


@pytest.mark.parametrize(
    "text,message",
    [
        ("[server]\nae_title = 'THIS_IS_TOO_LONG_'\n", r"AE title 'THIS_IS_TOO_LONG_'"),
        ("[server]\nae_title = 'BAD\\\\AE'\n", "AE title"),
        ("[server]\nae_title = ''\n", "AE title"),
        ("[peers.'BAD\\\\PEER']\nhost = 'h'\nport = 104\n", "peer AE title"),
        ("[servre]\nhost = 'x'\n", r"unknown section.*servre"),
        ("[server]\ndicomport = 104\n", r"\[server\].*dicomport"),
        ("[index]\nurl = 'sqlite://'\npool = 5\n", r"\[index\].*pool"),
        ("[storage]\nduplicates = 'keep'\n", r"\[storage\].*duplicates"),
        ("[dimse]\ntimeout = 5\n", r"\[dimse\].*timeout"),
        ("[peers.PACS]\nhost = 'h'\nport = 104\naet = 'X'\n", r"\[peers.PACS\].*aet"),
        ("[peers.PACS]\nhost = 'h'\n", r"\[peers.PACS\].*port"),
        ("[peers.PACS]\nhost = 'h'\nport = 70000\n", r"port"),
        ("[server]\ndicom_port = 'abc'\n", r"dicom_port.*integer"),
        ("[server]\nhttp_port = 65536\n", "http_port"),
        ("[server]\nlog_level = 'CHATTY'\n", "log_level"),
        ("[storage]\nduplicate_policy = 'overwrite'\n", "duplicate_policy"),
        ("[storage]\nrecall_on_read = 'no'\n", r"recall_on_read.*true or false"),
        ("[dimse]\nmax_associations = 0\n", "max_associations"),
        ("[dimse]\ndimse_timeout = 'soon'\n", "dimse_timeout"),
        ("[[storage.tiers]]\nname = 'a'\npath = '/a'\nhigh_watermark = '1 GB'\nlow_watermark = '2 GB'\n"
         "[[storage.tiers]]\nname = 'b'\npath = '/b'\n", "low_watermark is above high_watermark"),
        ("[[storage.tiers]]\nname = 'a'\npath = '/a'\nhigh_watermark = '1 GB'\n[[storage.tiers]]\nname = 'b'\npath = '/b'\n",
         "both high_watermark and low_watermark"),
        ("[[storage.tiers]]\nname = 'a'\npath = '/a'\nhigh_watermark = 'lots'\nlow_watermark = '1 GB'\n"
         "[[storage.tiers]]\nname = 'b'\npath = '/b'\n", r"tier a.*high_watermark.*'lots'"),
        ("[[storage.tiers]]\nname = 'a'\npath = '/a'\nmigrate_after_days = -1\n[[storage.tiers]]\nname = 'b'\npath = '/b'\n",
         "migrate_after_days"),
        ("[[storage.tiers]]\nname = 'a'\npath = '/a'\nmigrate_after_days = 'often'\n[[storage.tiers]]\nname = 'b'\npath = '/b'\n",
         "migrate_after_days"),
        ("[[storage.tiers]]\nname = 'only'\npath = '/a'\nmigrate_after_days = 30\n", r"tier only is the last tier"),
        ("[[storage.tiers]]\nname = 'a'\npath = '/a'\nspeed = 'fast'\n", r"speed"),
        ("[[storage.tiers]]\nname = 'a'\n", r"needs 'path'"),
        ("[[storage.tiers]]\nname = 'a b'\npath = '/a'\n", r"tier name"),
        ("[[storage.tiers]]\nname = 'a'\npath = '/a'\n[[storage.tiers]]\nname = 'a'\npath = '/b'\n", "unique"),
        ("[storage]\ntiers = 'fast'\n", r"storage.tiers"),
        ("[server\n", "xdsi.toml"),
    ],
)
def test_bad_values_give_clear_errors(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(write(tmp_path, text), env={})


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_settings("/nonexistent/xdsi.toml", env={})


def test_example_file_parses_and_covers_the_sections() -> None:
    example = REPO / "xdsi.example.toml"
    s = load_settings(example, env={})
    assert 2 <= len(s.effective_storage.tiers) <= 3
    assert any(t.high_watermark for t in s.effective_storage.tiers)
    assert any(t.migrate_after_days for t in s.effective_storage.tiers)
    assert s.peers
    text = example.read_text()
    for section in ("[server]", "[index]", "[storage]", "[[storage.tiers]]", "[peers.", "[dimse]", "[xds]"):
        assert section in text
    # every line of the example that sets something is explained by a comment somewhere above it
    assert text.count("#") > 20


def test_http_cors_origins(tmp_path: Path) -> None:
    assert load_settings(env={}).cors_origins == ()
    cfg = tmp_path / "x.toml"
    cfg.write_text('[http]\ncors_origins = ["https://viewer.example.org/", "http://localhost:3000"]\n')
    assert load_settings(cfg, env={}).cors_origins == ("https://viewer.example.org", "http://localhost:3000")
    cfg.write_text('[http]\ncors_origins = ["*"]\n')
    assert load_settings(cfg, env={}).cors_origins == ("*",)
    for bad in ('"*"', '["viewer.example.org"]', '["https://viewer.example.org/app"]', "[1]"):
        cfg.write_text(f"[http]\ncors_origins = {bad}\n")
        with pytest.raises(ConfigError):
            load_settings(cfg, env={})
    cfg.write_text('[http]\norigins = ["*"]\n')
    with pytest.raises(ConfigError):
        load_settings(cfg, env={})


def test_http_limits(tmp_path: Path) -> None:
    from xdsi.config import HTTP_LIMIT_KEYS, HttpLimits

    assert load_settings(env={}).http_limits == HttpLimits()
    # the example documents every limit, with the defaults
    example = load_settings(REPO / "xdsi.example.toml", env={})
    assert example.http_limits == HttpLimits()
    text = (REPO / "xdsi.example.toml").read_text()
    assert all(f"\n{k} = " in text for k in HTTP_LIMIT_KEYS)
    cfg = tmp_path / "x.toml"
    cfg.write_text('[http]\nmax_soap_envelope = "2 MiB"\nmax_frames = 7\nheader_timeout = 2.5\n')
    lim = load_settings(cfg, env={}).http_limits
    assert (lim.max_soap_envelope, lim.max_frames, lim.header_timeout) == (2 * 1024 * 1024, 7, 2.5)
    for bad in ("max_frames = 0", "max_stow_bytes = \"lots\"", "header_timeout = 0", "threads = true", "max_framez = 3"):
        cfg.write_text(f"[http]\n{bad}\n")
        with pytest.raises(ConfigError):
            load_settings(cfg, env={})


def test_http_min_body_rate(tmp_path: Path) -> None:
    """``min_body_rate`` is a size per second, 0 turns it off; ``body_rate_window`` is seconds > 0."""
    cfg = tmp_path / "x.toml"
    cfg.write_text('[http]\nmin_body_rate = "2 KiB"\nbody_rate_window = 1.5\n')
    lim = load_settings(cfg, env={}).http_limits
    assert (lim.min_body_rate, lim.body_rate_window) == (2048, 1.5)
    cfg.write_text("[http]\nmin_body_rate = 0\n")
    assert load_settings(cfg, env={}).http_limits.min_body_rate == 0
    for bad in ("min_body_rate = -1", 'min_body_rate = "fast"', "body_rate_window = 0", "body_rate_window = -2"):
        cfg.write_text(f"[http]\n{bad}\n")
        with pytest.raises(ConfigError):
            load_settings(cfg, env={})
