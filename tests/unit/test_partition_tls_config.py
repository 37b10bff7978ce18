"""``[partitions.NAME] dicom_tls_port``: parsed, 0 meaning none, and refused in one line when it cannot work."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.pki import standard_pki
from xdsi.config import ConfigError, load_settings
from xdsi.security.tls import check_tls


@pytest.fixture(scope="module")
def tls_table(tmp_path_factory: pytest.TempPathFactory) -> str:
    pki = standard_pki(tmp_path_factory.mktemp("pki"))
    srv = pki["server"]
    return f'[tls]\ncertificate = "{srv.cert}"\nprivate_key = "{srv.key}"\nca_certificates = "{pki["ca"].pem}"\n'  # type: ignore[attr-defined]


def _load(tmp_path: Path, text: str):  # type: ignore[no-untyped-def]
    cfg = tmp_path / "xdsi.toml"
    cfg.write_text(f'[server]\ndata_dir = "{tmp_path / "data"}"\ndicom_port = 11112\nhttp_port = 8080\n' + text)
    return load_settings(cfg, env={})


def test_parsed_and_zero_means_none(tmp_path: Path, tls_table: str) -> None:
    s = _load(tmp_path, tls_table + '[partitions.a]\ndicom_tls_port = 2763\n[partitions.b]\ndicom_port = 11113\ndicom_tls_port = 0\n')
    assert s.partitions["a"].dicom_tls_port == 2763 and s.partitions["a"].dicom_port is None
    assert s.partitions["b"].dicom_tls_port is None and s.partitions["b"].dicom_port == 11113


def test_a_partition_tls_port_alone_makes_the_tls_material_checked(tmp_path: Path, tls_table: str) -> None:
    s = _load(tmp_path, tls_table + '[partitions.a]\ndicom_tls_port = 2763\n')
    assert s.dicom_tls_port is None and s.https_port is None
    assert check_tls(s) is not None  # the server context the partition's listener uses


def test_listed_as_a_listener_of_the_partition_ae(tmp_path: Path, tls_table: str) -> None:
    s = _load(tmp_path, tls_table + '[partitions.a]\nae_title = "PARTA"\ndicom_port = 11113\ndicom_tls_port = 2763\n')
    mine = [(lst.setting, lst.scheme, lst.port, lst.ae_title) for lst in s.listeners() if lst.setting.startswith("[partitions.a]")]
    assert mine == [("[partitions.a] dicom_port", "dicom", 11113, "PARTA"), ("[partitions.a] dicom_tls_port", "dicom+tls", 2763, "PARTA")]


@pytest.mark.parametrize(
    "text, message",
    [
        ('[partitions.a]\ndicom_tls_port = 2763\n', "[partitions.a] dicom_tls_port needs [tls] certificate and private_key"),
        ("TLS" + '[partitions.a]\ndicom_tls_port = 11112\n', "[partitions.a] dicom_tls_port 11112 is also dicom_port: one port, one listener"),
        ("TLS" + '[partitions.a]\ndicom_port = 2000\ndicom_tls_port = 2000\n', "[partitions.a] dicom_tls_port 2000 is also [partitions.a] dicom_port"),
        ("TLS" + '[partitions.a]\ndicom_tls_port = 2763\n[partitions.b]\ndicom_tls_port = 2763\n', "[partitions.b] dicom_tls_port 2763 is also [partitions.a] dicom_tls_port"),
        ("TLS" + '[partitions.a]\ndicom_tls_port = 70000\n', "[partitions.a] dicom_tls_port 70000 out of range"),
        ("TLS" + '[partitions.a]\ndicom_tls_port = "x"\n', "[partitions.a] dicom_tls_port must be an integer"),
    ],
)
def test_refused_in_one_line(tmp_path: Path, tls_table: str, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, text.replace("TLS", tls_table, 1) if text.startswith("TLS") else text)
    assert message in str(err.value) and "\n" not in str(err.value)
