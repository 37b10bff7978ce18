"""``[[prefetch]] remotes`` settings and the selection over local and remote priors together (no network)."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import pytest

from xdsi.config import ConfigError, PrefetchRule, load_settings
from xdsi.hl7.prefetch import Candidate, PrefetchJob, _choose

REMOTES = """
[remotes.PACS1]
host = "127.0.0.1"
port = 11112

[remotes.FINDONLY]
host = "127.0.0.1"
port = 11113
services = ["find"]
"""


def _load(tmp_path: Path, text: str):  # type: ignore[no-untyped-def]
    p = tmp_path / "x.toml"
    p.write_text(REMOTES + text)
    return load_settings(p, env={})


def test_rule_remotes_parse_default_and_refuse(tmp_path: Path) -> None:
    s = _load(tmp_path, '[[prefetch]]\nname = "a"\nremotes = ["PACS1", "PACS1"]\n[[prefetch]]\nname = "b"\n[[prefetch]]\nname = "c"\nremotes = []\n')
    assert [r.remotes for r in s.hl7.prefetch] == [("PACS1",), None, ()]  # None: the [gateway] remotes when it is on
    with pytest.raises(ConfigError, match="'NOPE' is not configured"):
        _load(tmp_path, '[[prefetch]]\nname = "a"\nremotes = ["NOPE"]\n')
    with pytest.raises(ConfigError, match="must offer find and move or get"):
        _load(tmp_path, '[[prefetch]]\nname = "a"\nremotes = ["FINDONLY"]\n')
    with pytest.raises(ConfigError, match="list of"):
        _load(tmp_path, '[[prefetch]]\nname = "a"\nremotes = "PACS1"\n')


def _c(uid: str, day: str, modalities: set[str] | None, body: set[str] | None = None, remote: object = None, acc: str = "") -> Candidate:
    return Candidate(uid, day, "", acc, modalities, body, 0, remote)


def test_last_n_counts_local_and_remote_together_and_unknown_modalities_are_asked_or_skipped() -> None:
    today = date(2026, 11, 30)
    asked: list[str] = []
    answers = {"r2": {"CT"}, "r3": {"MR"}}  # what a SERIES level C-FIND would say; r5 stays unknown

    def describe(c: Candidate) -> None:
        asked.append(c.study_uid)
        if c.study_uid in answers:
            c.modalities = answers[c.study_uid]

    cands = [
        _c("l1", "20260101", {"CT"}),
        _c("r2", "20250101", None, remote="PACS1"),  # no ModalitiesInStudy: asked, CT
        _c("r3", "20240601", None, remote="PACS1"),  # asked, MR: not a CT prior
        _c("r5", "20240301", None, remote="PACS1"),  # asked, still unknown: not selected
        _c("r4", "20240101", {"CT", "SR"}, remote="PACS1"),
        _c("l6", "20230101", {"CT"}),  # beyond last_studies = 3
        _c("r7", "20260601", {"CT"}, remote="PACS1", acc="NEW"),  # the order's own study
    ]
    job = PrefetchJob(PrefetchRule("r", modalities=("CT",), last_studies=3), "P", "HOSP", accession_number="NEW")
    assert [c.study_uid for c in _choose(cands, job, today, describe)] == ["l1", "r2", "r4"]
    assert asked == ["r2", "r3", "r5"]  # only what the filters needed, and nothing after the third prior
    # years: a remote study without a date is not "within N years"
    job = PrefetchJob(PrefetchRule("y", years=2), "P", "HOSP")
    assert [c.study_uid for c in _choose([_c("a", "", {"CT"}, remote="X"), _c("b", "20250101", {"CT"})], job, today)] == ["b"]


class _Client:
    def __init__(self, name: str, services: tuple[str, ...] = ("find", "move")) -> None:
        from xdsi.config import RemoteSettings

        self.remote = RemoteSettings(name=name, ae_title=name, host="127.0.0.1", port=1, services=services)


def _answer(**kw: str):  # type: ignore[no-untyped-def]
    from pydicom.dataset import Dataset

    ds = Dataset()
    for k, v in kw.items():
        setattr(ds, k, v)
    return ds


def test_remote_answers_for_another_patient_or_issuer_are_never_candidates(monkeypatch: pytest.MonkeyPatch) -> None:
    """A remote that matches loosely, or holds the ID under another assigning authority, brings no study of another patient."""
    import xdsi.gateway.find as find
    from xdsi.hl7.prefetch import remote_candidates

    a, b = _Client("A"), _Client("B")
    asked: list[object] = []

    def fake_find_each(identifier, model, clients):  # type: ignore[no-untyped-def]
        asked.append(identifier)
        return [
            (a, _answer(PatientID="P1", IssuerOfPatientID="HOSP", StudyInstanceUID="1.2.3.1", StudyDate="20250101", ModalitiesInStudy=["CT", "SR"])),
            (a, _answer(PatientID="P10", StudyInstanceUID="1.2.3.2", StudyDate="20250101")),  # loose match: another patient
            (a, _answer(PatientID="P1", IssuerOfPatientID="OTHER", StudyInstanceUID="1.2.3.3")),  # another issuer's P1
            (a, _answer(PatientID="P1", StudyInstanceUID="1.2.3.x")),  # not a UID
            (b, _answer(PatientID="P1", StudyInstanceUID="1.2.3.4")),  # no issuer stated: one PACS, one domain
            (b, _answer(PatientID="P1", StudyInstanceUID="1.2.3.1")),  # also on A, which comes first: taken from A
        ], {"C": "unreachable"}

    monkeypatch.setattr(find, "find_each", fake_find_each)
    problems: list[str] = []
    job = PrefetchJob(PrefetchRule("r", years=5), "P1", "HOSP")
    got = remote_candidates([a, b], job, date(2026, 11, 30), problems, "HOSP")
    assert [(c.study_uid, c.remote.remote.name, c.modalities) for c in got] == [("1.2.3.1", "A", {"CT", "SR"}), ("1.2.3.4", "B", None)]
    assert problems == ["remote C: unreachable", "remote A: answered an invalid Study Instance UID '1.2.3.x'"]
    [q] = asked
    assert (q.QueryRetrieveLevel, q.PatientID, q.StudyDate) == ("STUDY", "P1", "20211130-")
    # no issuer known and answers under two: the ID is two patients, nothing taken
    problems = []
    assert remote_candidates([a, b], PrefetchJob(PrefetchRule("r"), "P1", ""), None, problems) == []
    assert "several issuers" in problems[-1]
    # a Patient ID that would be a wildcard or a list in a C-FIND is never sent
    asked.clear()
    for pid in ("P*", "P?", "P1\\P2", ""):
        assert remote_candidates([a], PrefetchJob(PrefetchRule("r"), pid, ""), None, []) == []
    assert asked == []


def test_rule_remotes_default_to_the_gateways_when_it_is_on(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from xdsi.hl7.prefetch import Prefetcher

    s = _load(tmp_path, '[gateway]\nremotes = ["PACS1"]\n[[prefetch]]\nname = "a"\n[[prefetch]]\nname = "b"\nremotes = []\n')
    p = Prefetcher(SimpleNamespace(settings=s, retrieve=SimpleNamespace()))  # type: ignore[arg-type]
    assert [c.remote.name for c in p.remote_clients(s.hl7.prefetch[0])] == ["PACS1"]
    assert p.remote_clients(s.hl7.prefetch[1]) == []
    off = _load(tmp_path, '[[prefetch]]\nname = "a"\n')
    assert Prefetcher(SimpleNamespace(settings=off, retrieve=SimpleNamespace())).remote_clients(off.hl7.prefetch[0]) == []  # type: ignore[arg-type]
