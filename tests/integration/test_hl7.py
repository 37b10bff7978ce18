"""The HIS/RIS interface (issue 15 item 4) through python-hl7's own MLLP client against our listener.

* malformed input gets a NAK (AR/AE with an ERR segment naming the problem) and the listener goes on;
* an ORM is recorded in the order store (routing reads patient location and ordering physician from it)
  and, through a ``[[prefetch]]`` rule, recalls exactly the rule's priors from the cold tier;
* ADT^A08 updates demographics; ADT^A40 moves the prior patient's studies under the surviving ID and
  queues a replacement manifest (RPLC) that the strict test registry accepts once it has merged too.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from dataclasses import replace
from datetime import date
from pathlib import Path
from typing import Iterator

import hl7
import pytest
from hl7.client import MLLPClient
from sqlalchemy import select

from tests.conftest import make_settings
from tests.support.registry import TestRegistry
from tests.support.tiers import study_tiers
from tests.support.server import free_port
from tests.support.xds import AFFINITY, HOSP_OID, PATIENT_CX, find_documents
from xdsi.archive import Archive
from xdsi.config import ConfigError, Hl7Settings, PatientIdMapping, PrefetchRule, XdsSettings, hl7_from
from xdsi.hl7.listener import Hl7Listener
from xdsi.hl7.orders import order_attributes
from xdsi.index.models import Patient, Study
from xdsi.index.xds_models import DONE, PENDING
from xdsi.standards import constants as C
from xdsi.tools.synth import StudySpec, write_study
from xdsi.xds.codes import CodeTable
from xdsi.xds.publisher import Publisher

SB, EB = b"\x0b", b"\x1c\r"


def msh(kind: str, control: str, version: str = "2.5") -> str:
    return f"MSH|^~\\&|RIS|HOSP|XDSI|RAD|20261130101500||{kind}|{control}|P|{version}"


def orm(control: str, pid: str, accession: str, *, modality: str = "CT", location: str = "WARD3^301^B^HOSP",
        physician: str = "1234^HOUSE^GREGORY^^^DR") -> str:
    return "\r".join([
        msh("ORM^O01", control, "2.3.1"),
        f"PID|||{pid}^^^HOSP||DOE^JANE||19700101|F",
        f"PV1||I|{location}|||||5678^WILSON^JAMES",
        f"ORC|NW|PL{accession}|FL{accession}||SC||^^^20261201090000||20261130|||{physician}",
        f"OBR|1|PL{accession}|FL{accession}|CTCHEST^CT Chest^LOCAL||||||||||||||{accession}||||||{modality}",
    ]) + "\r"


def ack_fields(reply: bytes) -> dict[str, str]:
    """MSA-1, MSA-2, ERR-3.1 and ERR-8 of an ACK as python-hl7 parses it."""
    assert reply.startswith(SB) and reply.endswith(EB), reply
    msg = hl7.parse(reply[1:-2].decode())
    out = {"msh9": str(msg.segment("MSH")[9]), "code": str(msg.segment("MSA")[1]), "control": str(msg.segment("MSA")[2])}
    try:
        err = msg.segment("ERR")
    except KeyError:
        return out
    out.update(err_code=str(err[3][0][0]), err_text=msg.unescape(str(err[8])))
    return out


@pytest.fixture
def listener_factory(tmp_path: Path) -> Iterator:  # type: ignore[type-arg]
    started: list[tuple[Hl7Listener, Archive]] = []

    def start(settings) -> tuple[Hl7Listener, Archive]:  # type: ignore[no-untyped-def]
        archive = Archive.open(settings)
        listener = Hl7Listener(archive)
        listener.start("127.0.0.1", free_port())
        started.append((listener, archive))
        return listener, archive

    yield start
    for listener, archive in started:
        listener.stop()
        archive.close()


def test_malformed_input_is_nak_and_the_listener_goes_on(tmp_path: Path, listener_factory) -> None:  # type: ignore[no-untyped-def]
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'index.sqlite'}")
    settings = replace(settings, hl7=Hl7Settings(port=1, max_message_bytes=4096))
    listener, archive = listener_factory(settings)
    with MLLPClient("127.0.0.1", listener.port) as client:
        a = ack_fields(client.send_message("this is not HL7"))
        assert (a["code"], a["err_code"]) == ("AR", "100") and "MSH" in a["err_text"]
        a = ack_fields(client.send_message(msh("ORU^R01", "C2") + "\rPID|||1^^^HOSP\r"))
        assert (a["code"], a["control"], a["err_code"]) == ("AR", "C2", "200") and a["msh9"] == "ACK^R01^ACK"
        a = ack_fields(client.send_message(msh("ADT^A99", "C3") + "\rPID|||1^^^HOSP\r"))
        assert (a["code"], a["err_code"]) == ("AR", "201")
        # a training message must not change the production index
        a = ack_fields(client.send_message(orm("CT", "PAT001", "ACCT").replace("|P|2.3.1", "|T|2.3.1", 1)))
        assert (a["code"], a["err_code"]) == ("AR", "202")
        a = ack_fields(client.send_message(msh("", "C4") + "\r"))
        assert (a["code"], a["err_code"]) == ("AR", "101") and "MSH-9" in a["err_text"]
        # understood but not applicable: AE with the field that is missing
        a = ack_fields(client.send_message(orm("C5", "", "ACC5")))
        assert (a["code"], a["control"], a["err_code"]) == ("AE", "C5", "101") and "PID-3" in a["err_text"]
        # a block without the MLLP start byte, then one larger than max_message_bytes: both answered, the connection kept
        a = ack_fields(client.send(b"garbage without a start block" + EB))
        assert a["code"] == "AR" and "<VT>" in a["err_text"]
        client.socket.sendall(SB + b"MSH|^~\\&|" + b"X" * 8000 + EB)
        a = ack_fields(client.socket.recv(65536))
        assert a["code"] == "AR" and "max_message_bytes" in a["err_text"]
        # and the same connection still works
        a = ack_fields(client.send_message(orm("C6", "PAT001", "ACC6")))
        assert (a["code"], a["control"]) == ("AA", "C6")
    # a client that vanishes mid-block does not take the listener with it; a new connection is served
    with socket.create_connection(("127.0.0.1", listener.port)) as raw:
        raw.sendall(SB + b"MSH|^~\\&|half a mess")
    with MLLPClient("127.0.0.1", listener.port) as client:
        assert ack_fields(client.send_message(orm("C7", "PAT001", "ACC7")))["code"] == "AA"
    assert listener.handler.handled == {"AR": 7, "AE": 1, "AA": 2}
    with archive.index.read_session() as s:
        assert order_attributes(s, "ACCT", "PAT001") == {}


def test_orm_records_the_order_for_routing(tmp_path: Path, index_url: str, listener_factory) -> None:  # type: ignore[no-untyped-def]
    listener, archive = listener_factory(replace(make_settings(tmp_path, index_url), hl7=Hl7Settings(port=1)))
    with MLLPClient("127.0.0.1", listener.port) as client:
        assert ack_fields(client.send_message(orm("O1", "PAT001", "ACC100")))["code"] == "AA"
        # the RIS changes the order (same patient and accession): updated, not duplicated
        assert ack_fields(client.send_message(orm("O2", "PAT001", "ACC100", location="ICU^1^A^HOSP")))["code"] == "AA"
        # an OMI^O23 (RAD-4, v2.5.1): accession from IPC-1, modality from IPC-5
        omi = "\r".join([
            msh("OMI^O23", "O3", "2.5.1"), "PID|||PAT002^^^HOSP||ROE^RICHARD", "PV1||O|OUTPAT^1",
            "ORC|NW|PL200|FL200||SC||||20261130|||77^CHASE^ROBERT", "TQ1|||||||20261202080000",
            "OBR|1|PL200|FL200|MRHEAD^MR Head^LOCAL", "IPC|ACC200|RP200|1.2.3.4.5|SPS200|MR",
        ]) + "\r"
        assert ack_fields(client.send_message(omi))["code"] == "AA"
    with archive.index.read_session() as s:
        got = order_attributes(s, "ACC100", "PAT001")
        assert got["patient_location"] == "ICU^1^A^HOSP"
        assert got["ordering_physician"] == "1234^HOUSE^GREGORY^^^DR"
        assert got["referring_physician"] == "5678^WILSON^JAMES"
        assert (got["procedure_code"], got["modality"], got["order_control"]) == ("CTCHEST", "CT", "NW")
        omi_got = order_attributes(s, "ACC200", "PAT002")
        assert (omi_got["modality"], omi_got["ordering_physician"], omi_got["scheduled_at"]) == ("MR", "77^CHASE^ROBERT", "20261202080000")
        assert order_attributes(s, "ACC100", "PAT002") == {}  # another patient's accession: no order
        assert order_attributes(s, "", "PAT001") == {}
        from xdsi.hl7.models import Hl7Order

        assert len(s.scalars(select(Hl7Order)).all()) == 2



def test_orm_recalls_exactly_the_rules_priors_from_the_cold_tier(tmp_path: Path, listener_factory) -> None:  # type: ignore[no-untyped-def]
    rules = (
        PrefetchRule("ct-priors", triggers=("ORM^O01",), modalities=("CT",), years=6, last_studies=3),
        # triggered only by an admission: the ORM must not run it
        PrefetchRule("admission-head", triggers=("ADT^A04",), body_parts=("HEAD",)),
    )
    settings = replace(make_settings(tmp_path, f"sqlite:///{tmp_path / 'index.sqlite'}", tiers=3), hl7=Hl7Settings(port=1, prefetch=rules))
    listener, archive = listener_factory(settings)
    year = date.today().year
    specs = {
        "ct-1y": StudySpec(study_date=f"{year - 1}0301", accession="P1"),
        "ct-2y": StudySpec(study_date=f"{year - 2}0301", accession="P2"),
        "mr-3y": StudySpec(study_date=f"{year - 3}0301", accession="P3", modality="MR", body_part="HEAD"),
        "ct-4y": StudySpec(study_date=f"{year - 4}0301", accession="P4"),
        "ct-5y": StudySpec(study_date=f"{year - 5}0301", accession="P7"),  # beyond last_studies = 3
        "ct-8y": StudySpec(study_date=f"{year - 8}0301", accession="P5"),  # beyond years = 6
        "other": StudySpec(patient_id="PAT999", study_date=f"{year - 1}0601", accession="P6"),  # another patient
    }
    originals: dict[str, dict[str, bytes]] = {}
    for name, spec in specs.items():
        paths = write_study(tmp_path / name, spec, series=1, per_series=2, rows=16, columns=16)
        originals[spec.study_uid] = {}
        for p in paths:
            assert archive.store.store_file(p).ok
            from pydicom import dcmread

            originals[spec.study_uid][str(dcmread(p, stop_before_pixels=True).SOPInstanceUID)] = p.read_bytes()
    with archive.index.read_session() as s:
        pks = dict(s.execute(select(Study.study_uid, Study.pk)).all())
    for spec in specs.values():
        assert not archive.policy.move_study(pks[spec.study_uid], "cache", "cold").errors
    assert all(t == {"cold"} for t in study_tiers(archive).values())

    with MLLPClient("127.0.0.1", listener.port) as client:
        assert ack_fields(client.send_message(orm("PF1", "PAT001", "NEWACC")))["code"] == "AA"
    assert listener.prefetcher is not None and listener.prefetcher.wait_idle(60)
    [result] = listener.prefetcher.results
    from xdsi.hl7.models import JOB_DONE, Hl7PrefetchJob

    with archive.index.read_session() as s:
        [job] = s.scalars(select(Hl7PrefetchJob)).all()  # one rule triggered (the ADT^A04 one is not)
        assert (job.rule, job.state, job.studies, job.recalled, job.message_control_id) == ("ct-priors", JOB_DONE, 3, 6, "PF1")
    wanted = [specs["ct-1y"].study_uid, specs["ct-2y"].study_uid, specs["ct-4y"].study_uid]
    assert (result.rule, result.studies, result.recalled, result.errors) == ("ct-priors", wanted, 6, [])
    tiers = study_tiers(archive)
    for name, spec in specs.items():
        assert tiers[spec.study_uid] == ({"cache", "cold"} if spec.study_uid in wanted else {"cold"}), name
    # the cache copies are the bytes received
    for uid in wanted:
        for ref in archive.retrieve.select(study_uids=[uid]):
            assert ref.copies[0][0] == "cache"
            path = archive.tiers["cache"].abspath(ref.copies[0][1])
            assert path.read_bytes() == originals[uid][ref.sop_instance_uid]

    # each selection criterion on its own (index only): years, count, body part, the order's modality, its own study
    from xdsi.hl7.prefetch import PrefetchJob, select_priors

    def picked(rule: PrefetchRule, **job: str) -> list[str]:
        uids = select_priors(archive, PrefetchJob(rule, "PAT001", "HOSP", **job))
        return [next(n for n, sp in specs.items() if sp.study_uid == u) for u in uids]

    assert picked(PrefetchRule("y", modalities=("CT",), years=6)) == ["ct-1y", "ct-2y", "ct-4y", "ct-5y"]
    assert picked(PrefetchRule("n", last_studies=2)) == ["ct-1y", "ct-2y"]
    assert picked(PrefetchRule("b", body_parts=("HEAD",))) == ["mr-3y"]
    assert picked(PrefetchRule("m", same_modality=True), modality="MR") == ["mr-3y"]
    assert picked(PrefetchRule("m", same_modality=True)) == []  # no modality in the order: nothing, not everything
    assert picked(PrefetchRule("a", last_studies=1), accession_number="P1") == ["ct-2y"]  # the ordered study is no prior
    assert select_priors(archive, PrefetchJob(PrefetchRule("o"), "PAT001", "OTHER")) == []  # another issuer's PAT001


def test_prefetch_settings_parse_and_refuse() -> None:
    h = hl7_from({"port": 2575, "application": "PACS"}, [{"name": "r", "triggers": ["ORM^O01"], "modalities": ["ct"], "last_studies": 3}], {})
    assert h.port == 2575 and h.prefetch[0].modalities == ("CT",) and h.prefetch[0].last_studies == 3
    with pytest.raises(ConfigError, match="ORU"):
        hl7_from({}, [{"triggers": ["ORU^R01"]}], {})
    with pytest.raises(ConfigError, match="push_to"):
        hl7_from({}, [{"push_to": "WS1"}], {})
    with pytest.raises(ConfigError, match="unknown key"):
        hl7_from({"prot": 1}, [], {})
    with pytest.raises(ConfigError, match="does nothing"):
        hl7_from({}, [{"recall": False}], {})


def _adt(kind: str, control: str, pid: str, name: str, extra: str = "") -> str:
    return "\r".join([msh(kind, control), "EVN||20261130101500", f"PID|||{pid}^^^HOSP||{name}||19700101|F", "PV1||O"]
                     + ([extra] if extra else [])) + "\r"


def test_a08_and_a40_update_the_index_and_replace_the_manifest(tmp_path: Path, index_url: str, listener_factory) -> None:  # type: ignore[no-untyped-def]
    tmp_cx = f"TMP9^^^&{AFFINITY}&ISO"
    with TestRegistry(CodeTable.load(), {PATIENT_CX, tmp_cx}) as registry:
        mapping = (PatientIdMapping("PAT001", "HOSP", "PAT001", AFFINITY), PatientIdMapping("TMP9", "HOSP", "TMP9", AFFINITY))
        x = XdsSettings(mode="integrated", registry_url=registry.registry_url, stability_delay=0, retry_initial=0.2, retry_max=1.0,
                        timeout=10, patient_ids=mapping, issuer_oids={"HOSP": HOSP_OID})
        # [audit] to a repository that is never reached: the records wait in the real spool, where they are read back
        from xdsi.audit.trail import AuditTrail
        from xdsi.config import AuditSettings

        audit = AuditSettings(repositories=("udp://127.0.0.1:9",))
        listener, archive = listener_factory(replace(make_settings(tmp_path, index_url, xds=x), hl7=Hl7Settings(port=1), audit=audit))
        archive.audit = AuditTrail(archive.settings)
        # a study filed under a temporary ID at the modality, published under it; another already under PAT001
        temp = StudySpec(patient_id="TMP9", patient_name="UNKNOWN^TRAUMA")
        kept = StudySpec(patient_id="PAT001", patient_name="DOE^JANE", accession="ACC2")
        for name, spec in (("temp", temp), ("kept", kept)):
            for p in write_study(tmp_path / name, spec, series=1, per_series=2, rows=16, columns=16):
                assert archive.store.store_file(p).ok
        pub = Publisher(archive)
        assert sorted(o.state for o in pub.run_once()) == [DONE, DONE]
        [old_entry] = registry.find_by_patient(tmp_cx)

        with MLLPClient("127.0.0.1", listener.port) as client:
            # A08: new demographics for PAT001 (the study's copy of the name follows; the manifest is replaced too)
            a = ack_fields(client.send_message(_adt("ADT^A08", "U1", "PAT001", "DOE^JANE^MARIE")))
            assert a["code"] == "AA", a
            # an order placed for TMP9 before the merge
            assert ack_fields(client.send_message(orm("O9", "TMP9", "ACC77")))["code"] == "AA"
            # A40: TMP9 is PAT001
            a = ack_fields(client.send_message(_adt("ADT^A40", "M1", "PAT001", "DOE^JANE^MARIE", "MRG|TMP9^^^HOSP")))
            assert a["code"] == "AA", a
            # the same merge again (a resend after a lost ACK): nothing left to merge, still AA
            assert ack_fields(client.send_message(_adt("ADT^A40", "M2", "PAT001", "DOE^JANE^MARIE", "MRG|TMP9^^^HOSP")))["code"] == "AA"
            # a merge that names no prior patient is an error, not a silent success
            a = ack_fields(client.send_message(_adt("ADT^A40", "M3", "PAT001", "DOE^JANE")))
            assert (a["code"], a["err_code"]) == ("AE", "101")

        # ATNA: Patient Record (110110) per changed record: U for A08; D for the merged TMP9 and U for PAT001 for the A40;
        # nothing for the repeated merge that found nothing; every record valid against PS3.15's schema
        from tests.support.audit_schema import check_audit_message, event, event_types

        frames = [body for _seq, body in archive.audit.spool.pending("udp://127.0.0.1:9")]
        records = [check_audit_message(f[f.index(b"<?xml") if b"<?xml" in f else f.index(b"<AuditMessage"):]) for f in frames]
        patient_records = [(event(r), r.find("ParticipantObjectIdentification").get("ParticipantObjectID")) for r in records
                           if event(r)[0] == "110110"]
        assert patient_records == [(("110110", "U", "0"), "PAT001^^^HOSP"), (("110110", "D", "0"), "TMP9^^^HOSP"),
                                   (("110110", "U", "0"), "PAT001^^^HOSP")], patient_records
        assert all(("RAD-12", "IHE Transactions") in event_types(r) for r in records if event(r)[0] == "110110")
        archive.audit.spool.close()

        with archive.index.read_session() as s:
            # the order follows the patient: routing finds it by the ID the images will now carry
            assert order_attributes(s, "ACC77", "PAT001")["patient_location"] == "WARD3^301^B^HOSP"
            assert order_attributes(s, "ACC77", "TMP9") == {}
            assert s.scalars(select(Patient).where(Patient.patient_id == "TMP9")).all() == []
            rows = s.execute(select(Study.study_uid, Patient.patient_id, Study.patient_name).join(Patient, Study.patient_fk == Patient.pk)).all()
        assert sorted(rows) == sorted([(temp.study_uid, "PAT001", "DOE^JANE^MARIE"), (kept.study_uid, "PAT001", "DOE^JANE^MARIE")])
        # C-FIND answers the new identity
        from pydicom.dataset import Dataset

        q = Dataset()
        q.QueryRetrieveLevel, q.PatientID, q.StudyInstanceUID, q.PatientName = "STUDY", "PAT001", "", ""
        answers = list(archive.query.find(q))
        assert {(str(a.StudyInstanceUID), str(a.PatientName)) for a in answers} == {
            (temp.study_uid, "DOE^JANE^MARIE"), (kept.study_uid, "DOE^JANE^MARIE")}
        q.PatientID = "TMP9"
        assert list(archive.query.find(q)) == []

        # both studies have a replacement queued; the registry has not merged TMP9 yet: the RPLC of the merged
        # study is refused (XDSPatientIdDoesNotMatch) and stays in the outbox
        outcomes = {o.study_uid: o for o in pub.run_once()}
        assert outcomes[kept.study_uid].state == DONE
        assert outcomes[temp.study_uid].state == PENDING and "XDSPatientIdDoesNotMatch" in outcomes[temp.study_uid].errors
        assert registry.by_unique_id(old_entry.unique_id).status == C.STATUS_APPROVED  # nothing replaced yet
        # the affinity domain merges TMP9 into PAT001 (its own patient identity feed); the retry is accepted
        assert registry.merge_patients(tmp_cx, PATIENT_CX) == 1
        from xdsi.xds.outbox import utcnow
        from datetime import timedelta

        [retried] = pub.run_once(now=utcnow() + timedelta(seconds=5))
        assert (retried.study_uid, retried.state) == (temp.study_uid, DONE), retried
        assert registry.by_unique_id(old_entry.unique_id).status == C.STATUS_DEPRECATED
        subs = pub.outbox.for_study(temp.study_uid)
        assert subs[-1].replaces_entry_uuid == old_entry.entry_uuid
        approved = find_documents(registry.registry_url, PATIENT_CX)
        assert len(approved) == 2 and registry.find_by_patient(tmp_cx) == []
        # the replacement manifest names the surviving patient
        from pydicom import dcmread

        [ref] = archive.retrieve.select(sop_uids=[subs[-1].kos_sop_uid])
        kos = dcmread(archive.retrieve.path(ref))
        assert (str(kos.PatientID), str(kos.PatientName)) == ("PAT001", "DOE^JANE^MARIE")


def test_mllp_send_cli(tmp_path: Path, listener_factory) -> None:  # type: ignore[no-untyped-def]
    """python-hl7's own ``mllp_send`` command, as a RIS integrator would test with it."""
    listener, archive = listener_factory(replace(make_settings(tmp_path, f"sqlite:///{tmp_path / 'i.sqlite'}"), hl7=Hl7Settings(port=1)))
    f = tmp_path / "orm.hl7"
    f.write_bytes(orm("CLI1", "PAT001", "ACC9").replace("\r", "\n").encode())  # one segment a line, as people keep them
    exe = Path(sys.executable).parent / "mllp_send"
    out = subprocess.run([str(exe), "-p", str(listener.port), "--loose", "-f", str(f), "127.0.0.1"], capture_output=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert b"MSA|AA|CLI1" in out.stdout
    with archive.index.read_session() as s:
        assert order_attributes(s, "ACC9", "PAT001")["patient_location"] == "WARD3^301^B^HOSP"


def test_xdsi_serve_runs_the_listener_from_the_config(tmp_path: Path) -> None:
    """``[hl7] port`` in the TOML file: ``xdsi serve`` answers on it, stops it on SIGTERM, and names the setting of a busy port."""
    from tests.support.server import XdsiProcess
    from xdsi.config import load_settings

    assert load_settings(Path(__file__).parents[2] / "xdsi.example.toml", env={}).hl7.prefetch  # the example parses
    port = free_port()
    cfg = tmp_path / "xdsi.toml"
    cfg.write_text(f'[hl7]\nport = {port}\napplication = "PACS"\n\n[[prefetch]]\nname = "all"\n')
    proc = XdsiProcess(tmp_path / "data", config=cfg).start()
    try:
        with MLLPClient("127.0.0.1", port) as client:
            reply = client.send_message(orm("S1", "PAT001", "ACC1"))
        assert ack_fields(reply)["code"] == "AA" and b"MSH|^~\\&|PACS|" in reply
    finally:
        assert proc.stop() == 0, proc.output()
    with socket.socket() as busy:
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # our own client's TIME_WAIT must not fail the bind
        busy.bind(("127.0.0.1", port))
        busy.listen()
        with pytest.raises(RuntimeError) as info:
            XdsiProcess(tmp_path / "data", config=cfg).start()
        assert f"[hl7] port {port}" in str(info.value)


def test_tls_listener_needs_a_trusted_client_certificate(tmp_path: Path, listener_factory) -> None:  # type: ignore[no-untyped-def]
    """``[hl7] tls``: the [tls] server context (mutual by default); a client without a certificate is refused, the next is served."""
    import ssl

    from tests.support.pki import standard_pki
    from xdsi.config import TlsSettings
    from xdsi.security.tls import server_context

    pki = standard_pki(tmp_path / "pki")
    ca = pki["ca"]
    tls = TlsSettings(certificate=pki["server"].cert, private_key=pki["server"].key, ca_certificates=ca.pem)  # type: ignore[attr-defined]
    archive = Archive.open(replace(make_settings(tmp_path, f"sqlite:///{tmp_path / 'i.sqlite'}"), tls=tls, hl7=Hl7Settings(port=1, tls=True)))
    listener = Hl7Listener(archive, server_context(tls))
    listener.start("127.0.0.1", free_port())
    try:
        def client(with_cert: bool, accession: str) -> bytes:
            ctx = ssl.create_default_context(cafile=str(ca.pem))  # type: ignore[attr-defined]
            if with_cert:
                ctx.load_cert_chain(str(pki["client"].cert), str(pki["client"].key))  # type: ignore[attr-defined]
            with socket.create_connection(("127.0.0.1", listener.port), timeout=10) as raw, ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
                s.sendall(SB + orm("T1", "PAT001", accession).encode() + EB)
                data = b""
                while not data.endswith(EB):
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                return data

        try:  # TLS 1.3: the client may finish its side of the handshake before the server's alert arrives
            refused = client(False, "ACCX")
        except (ssl.SSLError, ConnectionError):
            refused = b""
        assert refused == b""
        assert ack_fields(client(True, "ACCT"))["code"] == "AA"
        with archive.index.read_session() as s:
            assert order_attributes(s, "ACCX", "PAT001") == {} and order_attributes(s, "ACCT", "PAT001")
    finally:
        listener.stop()
        archive.close()


def test_prefetch_jobs_are_recorded_before_the_ack_and_survive_a_restart(tmp_path: Path) -> None:
    """The ACK means the job is in the index: a worker started later (after a restart) runs it; a dead worker's claim is taken over."""
    from datetime import timedelta

    from xdsi.hl7.listener import Hl7Handler
    from xdsi.hl7.models import JOB_DONE, JOB_FAILED, JOB_PENDING, JOB_RUNNING, Hl7PrefetchJob
    from xdsi.hl7.prefetch import Prefetcher
    from xdsi.index.catalog import utcnow

    rules = (PrefetchRule("any", triggers=("ORM^O01",)),)
    archive = Archive.open(replace(make_settings(tmp_path, f"sqlite:///{tmp_path / 'i.sqlite'}", tiers=2), hl7=Hl7Settings(port=1, prefetch=rules)))
    try:
        spec = StudySpec(study_date="20250101")
        for p in write_study(tmp_path / "prior", spec, series=1, per_series=2, rows=16, columns=16):
            assert archive.store.store_file(p).ok
        with archive.index.read_session() as s:
            study_pk = s.scalars(select(Study.pk)).one()
        assert not archive.policy.move_study(study_pk, "cache", "warm").errors
        # the listener's handler with no worker running (the process dies right after the ACK)
        reply = Hl7Handler(archive, None).handle(orm("R1", "PAT001", "NEW1").encode())
        assert b"MSA|AA|R1" in reply
        with archive.index.read_session() as s:
            assert [j.state for j in s.scalars(select(Hl7PrefetchJob))] == [JOB_PENDING]
        # the RIS cancels the order: recorded (routing sees CA), no prefetch job
        assert b"MSA|AA|R2" in Hl7Handler(archive, None).handle(orm("R2", "PAT001", "NEW1").replace("ORC|NW|", "ORC|CA|").encode())
        with archive.index.read_session() as s:
            assert len(s.scalars(select(Hl7PrefetchJob)).all()) == 1
            assert order_attributes(s, "NEW1", "PAT001")["order_control"] == "CA"
        # the next process's worker finds it
        [result] = Prefetcher(archive).run_once()
        assert (result.studies, result.recalled, result.errors) == ([spec.study_uid], 2, [])
        assert study_tiers(archive)[spec.study_uid] == {"cache", "warm"}
        # claims: a running job whose worker died an hour ago is taken over, a fresh one is not; a rule removed meanwhile fails
        now = utcnow()
        with archive.index.session() as s:
            for rule, started in (("any", now - timedelta(hours=2)), ("any", now - timedelta(minutes=1)), ("gone", None)):
                s.add(Hl7PrefetchJob(rule=rule, patient_id="PAT001", state=JOB_RUNNING if started else JOB_PENDING, started_at=started,
                                     created_at=now, studies=0, recalled=0, pushed=0, error=""))
        results = Prefetcher(archive).run_once()
        assert [(r.rule, r.recalled, r.errors) for r in results] == [
            ("any", 0, []), ("gone", 0, ["prefetch rule 'gone' is no longer configured"])]  # already recalled: nothing copied
        with archive.index.read_session() as s:
            states = [j.state for j in s.scalars(select(Hl7PrefetchJob).order_by(Hl7PrefetchJob.pk))]
        assert states == [JOB_DONE, JOB_DONE, JOB_RUNNING, JOB_FAILED]
        # `xdsi status` shows the rules, the jobs per state and why the failed one failed
        from xdsi.hl7.status import status_lines

        lines = status_lines(archive.settings)
        assert lines[1] == "prefetch:   rules any; jobs: 2 done, 1 failed, 1 running", lines
        assert "prefetch rule 'gone' is no longer configured" in lines[2]
    finally:
        archive.close()


def test_prefetch_pushes_the_priors_to_the_rules_workstation(tmp_path: Path) -> None:
    """``push_to``: the priors go by C-STORE to a [peers.AE] (a pynetdicom storage SCP on loopback), pixels as stored."""
    import numpy as np
    from pydicom import dcmread
    from pynetdicom import AE, AllStoragePresentationContexts, evt

    from xdsi.config import Peer
    from xdsi.hl7.prefetch import PrefetchJob, Prefetcher

    received: dict[str, object] = {}

    def on_store(event):  # type: ignore[no-untyped-def]
        ds = event.dataset
        ds.file_meta = event.file_meta
        received[str(ds.SOPInstanceUID)] = ds
        return 0x0000

    scp = AE(ae_title="WS1")
    scp.supported_contexts = AllStoragePresentationContexts
    port = free_port()
    server = scp.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    rule = PrefetchRule("push", modalities=("CT",), recall=False, push_to="WS1")
    settings = replace(make_settings(tmp_path, f"sqlite:///{tmp_path / 'i.sqlite'}"), peers={"WS1": Peer("WS1", "127.0.0.1", port)},
                       hl7=Hl7Settings(port=1, prefetch=(rule,)))
    archive = Archive.open(settings)
    try:
        ct, mr = StudySpec(), StudySpec(modality="MR", accession="ACC9")
        paths = {}
        for name, spec in (("ct", ct), ("mr", mr)):
            for p in write_study(tmp_path / name, spec, series=1, per_series=3, rows=16, columns=16):
                assert archive.store.store_file(p).ok
                paths[str(dcmread(p, stop_before_pixels=True).SOPInstanceUID)] = p
        result = Prefetcher(archive).run_job(PrefetchJob(rule, "PAT001", "HOSP"))
        assert (result.studies, result.pushed, result.recalled, result.errors) == ([ct.study_uid], 3, 0, [])
        assert len(received) == 3
        for uid, ds in received.items():
            original = dcmread(paths[uid])
            assert str(original.StudyInstanceUID) == ct.study_uid
            assert np.array_equal(ds.pixel_array, original.pixel_array)  # type: ignore[attr-defined]
    finally:
        archive.close()
        server.shutdown()


def test_a08_character_sets_nulls_and_ambiguous_patients(tmp_path: Path) -> None:
    """MSH-18 decides how a name's bytes are read (never replaced by U+FFFD); ``""`` clears a value, an empty field keeps it;
    a Patient ID held under two issuers is not updated from a message that names no issuer."""
    from xdsi.hl7.listener import Hl7Handler

    archive = Archive.open(replace(make_settings(tmp_path, f"sqlite:///{tmp_path / 'i.sqlite'}"), hl7=Hl7Settings(port=1)))
    try:
        for name, spec in (("a", StudySpec(patient_id="P7", issuer="HOSP")), ("b", StudySpec(patient_id="P8", issuer="HOSP")),
                           ("c", StudySpec(patient_id="P8", issuer="CLINIC", accession="ACC3"))):
            for p in write_study(tmp_path / name, spec, series=1, per_series=1, rows=8, columns=8):
                assert archive.store.store_file(p).ok
        handler = Hl7Handler(archive)

        def study_of(pid: str) -> tuple[str, str, str]:
            with archive.index.read_session() as s:
                return tuple(s.execute(select(Study.patient_name, Study.patient_birth_date, Study.patient_sex)
                                 .join(Patient, Study.patient_fk == Patient.pk).where(Patient.patient_id == pid)).one())

        latin = (msh("ADT^A08", "L1") + "||||||8859/1\rPID|||P7^^^HOSP||M\u00fcller^J\u00fcrgen||\"\"|\r").encode("latin-1")
        assert ack_fields(SB + handler.handle(latin) + EB)["code"] == "AA"
        assert study_of("P7") == ("M\u00fcller^J\u00fcrgen", "", "F")  # name in Latin-1 read right; birth date cleared; sex kept
        # the same bytes without MSH-18 are not UTF-8: refused, nothing written
        a = ack_fields(SB + handler.handle((msh("ADT^A08", "L2") + "\rPID|||P7^^^HOSP||Meier\xe9\r").encode("latin-1")) + EB)
        assert a["code"] == "AR" and "MSH-18" in a["err_text"]
        assert study_of("P7")[0] == "M\u00fcller^J\u00fcrgen"
        # P8 is held by HOSP and by CLINIC: a message without an issuer is an AE, and neither is touched
        a = ack_fields(SB + handler.handle((msh("ADT^A08", "L3") + "\rPID|||P8||WRONG^NAME\r").encode()) + EB)
        assert a["code"] == "AE" and "several issuers" in a["err_text"]
        with archive.index.read_session() as s:
            assert sorted(s.scalars(select(Study.patient_name).join(Patient, Study.patient_fk == Patient.pk).where(Patient.patient_id == "P8"))) == ["DOE^JANE", "DOE^JANE"]
        # naming the issuer updates exactly that patient
        assert ack_fields(SB + handler.handle((msh("ADT^A08", "L4") + "\rPID|||P8^^^CLINIC||ROE^ANN\r").encode()) + EB)["code"] == "AA"
        with archive.index.read_session() as s:
            got = dict(s.execute(select(Patient.issuer_of_patient_id, Study.patient_name).join(Patient, Study.patient_fk == Patient.pk)
                                 .where(Patient.patient_id == "P8")).all())
        assert got == {"HOSP": "DOE^JANE", "CLINIC": "ROE^ANN"}
        # an unknown patient: nothing to update, still AA (a HIS sends every A08 to every system)
        assert ack_fields(SB + handler.handle((msh("ADT^A08", "L5") + "\rPID|||NOBODY^^^HOSP||X^Y\r").encode()) + EB)["code"] == "AA"
    finally:
        archive.close()


def test_two_workers_never_run_the_same_prefetch_job(tmp_path: Path, index_url: str) -> None:
    """Two prefetch workers on one index (two ``xdsi serve`` processes): every job is claimed and run exactly once."""
    import threading

    from xdsi.hl7.models import JOB_DONE, Hl7PrefetchJob
    from xdsi.hl7.prefetch import Prefetcher
    from xdsi.index.catalog import utcnow

    rules = (PrefetchRule("any"),)
    settings = replace(make_settings(tmp_path, index_url), hl7=Hl7Settings(port=1, prefetch=rules))
    archives = [Archive.open(settings), Archive.open(settings)]
    try:
        with archives[0].index.session() as s:
            for i in range(40):
                s.add(Hl7PrefetchJob(rule="any", patient_id=f"P{i}", state="pending", created_at=utcnow(), studies=0, recalled=0, pushed=0, error=""))
        ran: list[list[str]] = [[], []]
        claimed_pks: list[list[int]] = [[], []]

        def work(i: int) -> None:
            p = Prefetcher(archives[i])
            original = p.claim

            def claim(now=None):  # type: ignore[no-untyped-def]
                got = original(now)
                if got is not None:
                    claimed_pks[i].append(got[0])
                return got

            p.claim = claim  # type: ignore[method-assign]
            ran[i] = [r.rule for r in p.run_once()]

        threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert len(ran[0]) + len(ran[1]) == 40
        assert not set(claimed_pks[0]) & set(claimed_pks[1])
        with archives[0].index.read_session() as s:
            assert {j.state for j in s.scalars(select(Hl7PrefetchJob))} == {JOB_DONE}
    finally:
        for a in archives:
            a.close()
