"""Header streaming: study metadata comes from the per-series journals, not from the DICOM files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from werkzeug.test import Client

from tests.conftest import make_settings
from xdsi.archive import Archive
from xdsi.config import ConfigError, load_settings
from xdsi.tools.synth import StudySpec, write_study
from xdsi.app import make_app


@pytest.fixture
def local(tmp_path: Path):  # type: ignore[no-untyped-def]
    a = Archive.open(make_settings(tmp_path))
    try:
        yield a
    finally:
        a.close()


def _metadata(app_client: Client, study: str) -> list[dict]:
    r = app_client.get(f"/dicomweb/studies/{study}/metadata")
    assert r.status_code == 200, r.get_data(as_text=True)
    return json.loads(r.get_data())


def test_metadata_is_served_without_the_dicom_files(local: Archive, tmp_path: Path) -> None:
    spec = StudySpec()
    for p in write_study(tmp_path / "in", spec, series=2, per_series=5):
        assert local.store.store_file(p).ok
    client = Client(make_app(local, {}))
    before = _metadata(client, spec.study_uid)
    assert len(before) == 10
    # take the stored files away: if metadata opened them, it would now fail or shrink
    hot = local.tiers.hot.root / spec.study_uid
    moved = tmp_path / "moved"
    shutil.move(str(hot), moved)
    assert _metadata(client, spec.study_uid) == before
    shutil.move(str(moved), hot)


def test_missing_or_stale_journal_is_rebuilt_from_the_files(local: Archive, tmp_path: Path) -> None:
    spec = StudySpec()
    for p in write_study(tmp_path / "in", spec, series=1, per_series=4):
        assert local.store.store_file(p).ok
    assert local.metadata is not None
    journals = list(local.metadata.tier.root.rglob("*.jsonl.gz"))
    assert len(journals) == 1
    journals[0].unlink()  # e.g. instances imported before the journal existed
    client = Client(make_app(local, {}))
    first = _metadata(client, spec.study_uid)
    assert len(first) == 4 and journals[0].exists()
    journals[0].write_bytes(b"\x1f\x8b garbage")  # a torn write
    assert _metadata(client, spec.study_uid) == first


def test_store_hook_records_one_line_per_instance(local: Archive, tmp_path: Path) -> None:
    """The hook appends one journal line per stored instance."""
    spec = StudySpec()
    paths = write_study(tmp_path / "in", spec, series=1, per_series=3)
    for p in paths:
        assert local.store.store_file(p).ok
    import gzip

    assert local.metadata is not None
    (journal,) = local.metadata.tier.root.rglob("*.jsonl.gz")
    with gzip.open(journal, "rt") as fh:
        assert len(fh.readlines()) == 3


def test_partition_config_validation(tmp_path: Path) -> None:
    cfg = tmp_path / "x.toml"
    cfg.write_text('[server]\ndata_dir = "d"\n[partitions.a]\nae_title = "XDSI"\n')
    with pytest.raises(ConfigError, match="AE title"):
        load_settings(cfg)
    cfg.write_text('[partitions.a]\nae_title = "studies"\n')
    with pytest.raises(ConfigError, match="DICOMweb"):
        load_settings(cfg)
    cfg.write_text('[server]\ndata_dir = "d"\n[partitions.a]\n[[partitions.a.tiers]]\nname = "t"\npath = "/x/shared"\n[partitions.b]\n[[partitions.b.tiers]]\nname = "t"\npath = "/x/shared"\n')
    with pytest.raises(ConfigError, match="overlaps"):
        load_settings(cfg)
    cfg.write_text('[server]\ndata_dir = "d"\n[partitions.a]\nsurprise = 1\n')
    with pytest.raises(ConfigError, match="unknown key"):
        load_settings(cfg)
    cfg.write_text('[server]\ndata_dir = "d"\n[partitions.a]\nae_title = "AAA"\n')
    s = load_settings(cfg)
    p = s.for_partition("a")
    assert p.ae_title == "AAA" and p.data_dir == (tmp_path / "d" / "partitions" / "a").resolve()
    assert p.effective_index_url != s.effective_index_url and p.partitions == {}


@pytest.mark.parametrize("public_url", ["", "https://imaging.example.org/pacs"])
def test_qido_retrieve_url_is_built_on_public_url(tmp_path: Path, public_url: str) -> None:
    """QIDO-RS RetrieveURL (0008,1190): on [server] public_url when set (behind a proxy), else the request's own host."""
    a = Archive.open(make_settings(tmp_path, public_url=public_url))
    try:
        spec = StudySpec()
        for p in write_study(tmp_path / "in", spec, series=1, per_series=1):
            assert a.store.store_file(p).ok
        r = Client(make_app(a, {})).get("/dicomweb/studies", base_url="http://10.0.0.7:8080/")
        assert r.status_code == 200, r.get_data(as_text=True)
        [study] = json.loads(r.get_data())
        base = public_url or "http://10.0.0.7:8080"
        assert study["00081190"]["Value"] == [f"{base}/dicomweb/studies/{spec.study_uid}"]
    finally:
        a.close()
