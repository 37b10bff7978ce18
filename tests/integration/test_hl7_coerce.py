"""After an HL7 patient update, every retrieve path sends the index's patient identity (issue 15, RAD-12).

A real ``xdsi serve`` holds three studies:

* ``updated``: PAT001 (issuer HOSP) "DOE^JANE", two synthetic CTs (Explicit VR LE) and pydicom's JPEG 2000
  lossless MR; an ADT^A08 over MLLP changes the name, birth date and sex;
* ``merged``: TMP9 "UNKNOWN^TRAUMA", two CTs and pydicom's big endian MR; an ADT^A40 merges TMP9 into
  PAT002 "ROE^RICHARD" (a Patient ID this archive did not hold);
* ``untouched``: PAT777, two CTs, never named by HL7.

Requesters that are not our code (pynetdicom C-GET and a pynetdicom C-MOVE destination, ``requests`` for
WADO-URI and WADO-RS, zeep from the IHE WSDL for RAD-69) ask for every object *in its stored transfer
syntax*, the case the fast paths (stored bytes by sendfile / direct PDUs) answer.  Each object of the
first two studies must carry the new identity, every other attribute and the pixels (pydicom's decoding)
as received; the untouched study's objects must be the stored bytes exactly.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import requests
from hl7.client import MLLPClient
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import UID, ExplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage, MRImageStorage
from requests_toolbelt.multipart import decoder

from tests.support.ids import IHE_WSDL, populate, retrieve_study, zeep_client
from tests.support.retrieve_clients import RecordingStorage, c_get_study, c_move_study
from tests.support.server import XdsiProcess, free_port
from xdsi.tools.synth import StudySpec, write_study
from xdsi.uids import new_uid

TIMEOUT = 30
REPOSITORY = "1.3.6.1.4.1.21367.13.70.7"
DEST = "COERCEDEST"
PATIENT_TAGS = ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex")
SB, EB = b"\x0b", b"\x1c\r"


@dataclass(frozen=True)
class Item:
    path: Path
    sop_uid: str
    series_uid: str
    sop_class: str
    transfer_syntax: str


@dataclass
class Study:
    name: str
    uid: str
    items: list[Item]
    expected: dict[str, str] | None  # the patient attributes every retrieved object must carry; None: as stored

    def item(self, sop_uid: str) -> Item:
        return next(i for i in self.items if i.sop_uid == sop_uid)


def _item(path: Path) -> Item:
    ds = dcmread(path, stop_before_pixels=True)
    return Item(path, str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))


def _adopt(src: str, out: Path, spec: StudySpec) -> Path:
    """A pydicom test file in our study (same patient, new UIDs), its stored transfer syntax kept."""
    ds = dcmread(get_testdata_file(src))
    ds.PatientID, ds.PatientName, ds.IssuerOfPatientID = spec.patient_id, spec.patient_name, spec.issuer
    ds.PatientBirthDate, ds.PatientSex = spec.birth_date, spec.sex
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = spec.study_uid, new_uid(), new_uid()
    ds.AccessionNumber = spec.accession
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(out, enforce_file_format=True)
    return out


def _msh(kind: str, control: str) -> str:
    return f"MSH|^~\\&|HIS|HOSP|XDSI|RAD|20261130101500||{kind}|{control}|P|2.5"


A08 = "\r".join([_msh("ADT^A08", "CO1"), "EVN||20261130101500", "PID|||PAT001^^^HOSP||DOE^JANE^MARIE||19691231|O", "PV1||O"]) + "\r"
A40 = "\r".join([_msh("ADT^A40", "CO2"), "EVN||20261130101600", "PID|||PAT002^^^HOSP||ROE^RICHARD||19550505|M", "PV1||O",
                 "MRG|TMP9^^^HOSP"]) + "\r"


@dataclass
class World:
    proc: XdsiProcess
    studies: list[Study]
    destination: RecordingStorage
    acks: list[bytes] = field(default_factory=list)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.proc.http_port}"

    def by_name(self, name: str) -> Study:
        return next(s for s in self.studies if s.name == name)


def _studies(root: Path) -> list[Study]:
    updated = StudySpec(patient_id="PAT001", patient_name="DOE^JANE", accession="ACCU1")
    merged = StudySpec(patient_id="TMP9", patient_name="UNKNOWN^TRAUMA", birth_date="", sex="O", accession="ACCM1")
    untouched = StudySpec(patient_id="PAT777", patient_name="STAYS^SAME", accession="ACCS1")
    files = {
        "updated": write_study(root / "u", updated, series=1, per_series=2, rows=32, columns=32)
        + [_adopt("MR_small_jp2klossless.dcm", root / "u-mr-j2k.dcm", updated)],
        "merged": write_study(root / "m", merged, series=1, per_series=2, rows=32, columns=32)
        + [_adopt("MR_small_bigendian.dcm", root / "m-mr-be.dcm", merged)],
        "untouched": write_study(root / "s", untouched, series=1, per_series=2, rows=32, columns=32),
    }
    expected = {
        "updated": {"PatientName": "DOE^JANE^MARIE", "PatientID": "PAT001", "IssuerOfPatientID": "HOSP",
                    "PatientBirthDate": "19691231", "PatientSex": "O"},
        "merged": {"PatientName": "ROE^RICHARD", "PatientID": "PAT002", "IssuerOfPatientID": "HOSP",
                   "PatientBirthDate": "19550505", "PatientSex": "M"},
        "untouched": None,
    }
    specs = {"updated": updated, "merged": merged, "untouched": untouched}
    return [Study(n, specs[n].study_uid, [_item(p) for p in files[n]], expected[n]) for n in ("updated", "merged", "untouched")]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("coerce")
    studies = _studies(root / "src")
    syntaxes = sorted({i.transfer_syntax for s in studies for i in s.items})
    destination = RecordingStorage(DEST, [(cls, syntaxes) for cls in (CTImageStorage, MRImageStorage)])
    data = root / "data"
    populate(data, [i.path for s in studies for i in s.items])
    hl7_port = free_port()
    cfg = root / "xdsi.toml"
    cfg.write_text(f'[hl7]\nport = {hl7_port}\n\n[peers.{DEST}]\nhost = "127.0.0.1"\nport = {destination.port}\n')
    proc = XdsiProcess(data, config=cfg, env={"XDSI_REPOSITORY_UNIQUE_ID": REPOSITORY}, workers=1).start()
    try:
        w = World(proc, studies, destination)
        # before any update: the metadata journal of every study is built (it must not keep answering the old identity)
        for s in studies:
            assert requests.get(f"{w.base}/dicomweb/studies/{s.uid}/metadata", timeout=TIMEOUT).status_code == 200
        with MLLPClient("127.0.0.1", hl7_port) as client:
            for message in (A08, A40):
                w.acks.append(client.send_message(message))
        yield w
    finally:
        proc.stop()
        destination.stop()


# -- checks --------------------------------------------------------------------------------------------------


def check(study: Study, ds: Dataset, raw_dataset: bytes | None = None) -> None:
    """``ds`` is the object of ``study`` it names: the expected identity, everything else and the pixels as stored."""
    item = study.item(str(ds.SOPInstanceUID))
    original = dcmread(item.path)
    if study.expected is None:
        for kw in PATIENT_TAGS:
            assert ds.get(kw) == original.get(kw), kw
        if raw_dataset is not None:  # the stored bytes as they are (the fast path)
            whole = item.path.read_bytes()
            assert whole.endswith(raw_dataset) and len(raw_dataset) > len(whole) // 2
    else:
        for kw, value in study.expected.items():
            assert str(ds.get(kw, "")) == value, (kw, ds.get(kw), value)
        assert str(ds.PatientID) != str(original.PatientID) or str(ds.PatientName) != str(original.PatientName)
    for elem in original:
        if elem.tag.group in (0x0010, 0x7FE0) or elem.keyword == "SpecificCharacterSet":
            continue
        assert elem.tag in ds, elem
        assert ds[elem.tag].value == elem.value, elem.keyword
    assert np.array_equal(ds.pixel_array, original.pixel_array)  # pydicom's decoding of the original


def dataset_from(ts: str, raw: bytes) -> Dataset:
    u = UID(ts)
    ds = read_dataset(io.BytesIO(raw), is_implicit_VR=u.is_implicit_VR, is_little_endian=u.is_little_endian)
    ds.file_meta = Dataset()
    ds.file_meta.TransferSyntaxUID = u
    return ds


def test_hl7_messages_were_accepted(world: World) -> None:
    assert len(world.acks) == 2
    for ack in world.acks:
        assert b"MSA|AA|" in ack, ack


# -- DIMSE -------------------------------------------------------------------------------------------------


def test_c_get_in_the_stored_syntax(world: World) -> None:
    for study in world.studies:
        pairs = sorted({(i.sop_class, i.transfer_syntax) for i in study.items})
        got = c_get_study(world.proc, [(c, [ts]) for c, ts in pairs], study.uid)  # only the stored syntax: the stored bytes would do
        assert got.final.Status == 0x0000, (study.name, got.final)
        assert sorted(got.received) == sorted(i.sop_uid for i in study.items)
        for sop, (ts, raw) in got.received.items():
            assert ts == study.item(sop).transfer_syntax
            check(study, dataset_from(ts, raw), raw)


def test_c_move_in_the_stored_syntax(world: World) -> None:
    for study in world.studies:
        world.destination.received.clear()
        responses = c_move_study(world.proc, study.uid, DEST)
        assert responses[-1][0].Status == 0x0000, (study.name, responses[-1])
        assert sorted(world.destination.received) == sorted(i.sop_uid for i in study.items)
        for sop, (ts, raw) in world.destination.received.items():
            assert ts == study.item(sop).transfer_syntax  # C-MOVE proposes the stored syntax first
            check(study, dataset_from(ts, raw), raw)


# -- web -----------------------------------------------------------------------------------------------------


def test_wado_uri_in_the_stored_syntax(world: World) -> None:
    for study in world.studies:
        for item in study.items:
            r = requests.get(f"{world.base}/wado", params={
                "requestType": "WADO", "studyUID": study.uid, "seriesUID": item.series_uid, "objectUID": item.sop_uid,
                "contentType": "application/dicom", "transferSyntax": item.transfer_syntax}, timeout=TIMEOUT)
            assert r.status_code == 200, r.text[:300]
            if study.expected is None:
                assert r.content == item.path.read_bytes()  # stored bytes, byte for byte
            check(study, dcmread(io.BytesIO(r.content)))


def test_wado_rs_study_as_stored(world: World) -> None:
    for study in world.studies:
        r = requests.get(f"{world.base}/dicomweb/studies/{study.uid}",
                         headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}, timeout=TIMEOUT)
        assert r.status_code == 200, r.text[:300]
        parts = decoder.MultipartDecoder.from_response(r).parts
        assert len(parts) == len(study.items)
        for part in parts:
            ds = dcmread(io.BytesIO(part.content))
            assert str(ds.file_meta.TransferSyntaxUID) == study.item(str(ds.SOPInstanceUID)).transfer_syntax
            if study.expected is None:
                assert part.content == study.item(str(ds.SOPInstanceUID)).path.read_bytes()
            check(study, ds)


def test_wado_rs_instance_converted(world: World) -> None:
    """Asked for Explicit VR LE (the JPEG 2000 and big endian MRs are converted): still the new identity."""
    for study in world.studies:
        for item in study.items:
            r = requests.get(f"{world.base}/dicomweb/studies/{study.uid}/series/{item.series_uid}/instances/{item.sop_uid}",
                             headers={"Accept": f'multipart/related; type="application/dicom"; transfer-syntax={ExplicitVRLittleEndian}'},
                             timeout=TIMEOUT)
            assert r.status_code == 200, r.text[:300]
            (part,) = decoder.MultipartDecoder.from_response(r).parts
            ds = dcmread(io.BytesIO(part.content))
            assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
            check(study, ds)


def _json_value(d: dict[str, Any], tag: str) -> str:
    v = d.get(tag, {}).get("Value", [""])[0]
    return v["Alphabetic"] if isinstance(v, dict) else str(v)


def test_wado_rs_metadata(world: World) -> None:
    tags = {"PatientName": "00100010", "PatientID": "00100020", "IssuerOfPatientID": "00100021",
            "PatientBirthDate": "00100030", "PatientSex": "00100040"}
    for study in world.studies:
        for url in (f"{world.base}/dicomweb/studies/{study.uid}/metadata",
                    f"{world.base}/dicomweb/studies/{study.uid}/series/{study.items[0].series_uid}/metadata"):
            r = requests.get(url, headers={"Accept": "application/dicom+json"}, timeout=TIMEOUT)
            assert r.status_code == 200, r.text[:300]
            answers = json.loads(r.content)
            assert answers
            for d in answers:
                item = study.item(_json_value(d, "00080018"))
                original = dcmread(item.path, stop_before_pixels=True)
                for kw, tag in tags.items():
                    want = study.expected[kw] if study.expected else str(original.get(kw, ""))
                    assert _json_value(d, tag) == want, (study.name, kw)
                assert _json_value(d, "0020000D") == study.uid and _json_value(d, "00080060") == str(original.Modality)


def test_qido_agrees(world: World) -> None:
    """What C-FIND/QIDO answered before this change; the objects now say the same."""
    for study in world.studies:
        r = requests.get(f"{world.base}/dicomweb/studies", params={"StudyInstanceUID": study.uid}, timeout=TIMEOUT)
        (d,) = r.json()
        want = study.expected["PatientID"] if study.expected else str(dcmread(study.items[0].path, stop_before_pixels=True).PatientID)
        assert _json_value(d, "00100020") == want


# -- RAD-69 ------------------------------------------------------------------------------------------------


def test_rad69_in_the_stored_syntax(world: World) -> None:
    client, service = zeep_client(IHE_WSDL, f"{world.base}/xdsi/ImagingDocumentSource")
    for study in world.studies:
        syntaxes = sorted({i.transfer_syntax for i in study.items})
        res = retrieve_study(service, study.uid, [(i.series_uid, i.sop_uid) for i in study.items], REPOSITORY, syntaxes)
        assert res.RegistryResponse.status.endswith(":Success"), res.RegistryResponse
        docs = {d.DocumentUniqueId: d.Document for d in res.DocumentResponse}
        assert sorted(docs) == sorted(i.sop_uid for i in study.items)
        for sop, data in docs.items():
            ds = dcmread(io.BytesIO(data))
            assert str(ds.file_meta.TransferSyntaxUID) == study.item(sop).transfer_syntax
            if study.expected is None:
                assert data == study.item(sop).path.read_bytes()
            check(study, ds)


def test_wado_ws_information_xml(world: World) -> None:
    """RetrieveImagingDocumentSetInformation (PS3.19 Native DICOM Model, XPath): the identity the objects carry."""
    from tests.support.ids import OUR_WSDL, exchange, status_of
    from xdsi.standards.constants import ACTION_INFORMATION, NS_WADO, STATUS_SUCCESS

    xpaths = [
        'string(/NativeDicomModel/DicomAttribute[@keyword="PatientID"]/Value[@number=1])',
        'string(/NativeDicomModel/DicomAttribute[@keyword="PatientName"]/PersonName[@number=1]/Alphabetic/FamilyName)',
        'string(/NativeDicomModel/DicomAttribute[@keyword="PatientBirthDate"]/Value[@number=1])',
        'string(/NativeDicomModel/DicomAttribute[@keyword="StudyInstanceUID"]/Value[@number=1])',
    ]
    client, service = zeep_client(OUR_WSDL, f"{world.base}/xdsi/ImagingDocumentSource")
    for study in world.studies:
        item = study.items[-1]  # the pydicom MR (J2K / big endian) for the updated studies
        resp = exchange(client, service, "ImagingDocumentSource_RetrieveImagingDocumentSetInformation", "ours", ACTION_INFORMATION,
                        StudyRequest=[{"studyInstanceUID": study.uid, "SeriesRequest": [{"seriesInstanceUID": item.series_uid, "DocumentRequest": [
                            {"RepositoryUniqueId": REPOSITORY, "DocumentUniqueId": item.sop_uid, "XPath": xpaths}]}]}])
        assert status_of(resp.body) == STATUS_SUCCESS
        (d,) = resp.body.iter(f"{{{NS_WADO}}}DocumentInformationResponse")
        got = [x.text or "" for x in d.iter(f"{{{NS_WADO}}}XPathResponse")]
        original = dcmread(item.path, stop_before_pixels=True)
        if study.expected is None:
            want = [str(original.PatientID), original.PatientName.family_name, str(original.PatientBirthDate)]
        else:
            want = [study.expected["PatientID"], study.expected["PatientName"].split("^")[0], study.expected["PatientBirthDate"]]
        assert got == want + [study.uid], study.name


# -- in one process, on both index backends ----------------------------------------------------------------


def test_only_a_changed_study_leaves_the_fast_path(tmp_path: Path, index_url: str) -> None:
    """``study.identity_updated_at`` is set for the studies an A08 touched and for no other; their refs carry the
    identity, :meth:`produce` writes them anew (a spool) even in the stored syntax while an untouched study's
    stored file is handed out as it is; the stored files keep their bytes; a prefetch push sends the new identity."""
    from dataclasses import replace
    from hashlib import sha256

    from pynetdicom import AllStoragePresentationContexts
    from sqlalchemy import select

    from tests.conftest import make_settings
    from xdsi.archive import Archive
    from xdsi.config import Hl7Settings, Peer
    from xdsi.hl7.listener import Hl7Handler
    from xdsi.hl7.prefetch import push_studies
    from xdsi.index.models import Study as StudyRow
    from xdsi.config import JpipSettings
    from xdsi.jpip.urls import JPIP_REFERENCED

    received: dict[str, Dataset] = {}

    def on_store(event: Any) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        received[str(event.request.AffectedSOPInstanceUID)] = ds
        return 0x0000

    scp = AE(ae_title="WS1")
    scp.supported_contexts = AllStoragePresentationContexts
    port = free_port()
    server = scp.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    settings = replace(make_settings(tmp_path, index_url), hl7=Hl7Settings(port=1), peers={"WS1": Peer("WS1", "127.0.0.1", port)},
                       public_url="http://127.0.0.1:9", jpip=JpipSettings(enabled=True))
    archive = Archive.open(settings)
    try:
        changed, kept = StudySpec(patient_id="PAT001", accession="A1"), StudySpec(patient_id="PAT777", patient_name="STAYS^SAME", accession="A2")
        originals: dict[str, bytes] = {}
        for name, spec in (("c", changed), ("k", kept)):
            for p in write_study(tmp_path / name, spec, series=1, per_series=2, rows=64, columns=64):  # (JPEG 2000 needs more than 16x16)
                assert archive.store.store_file(p).ok
                originals[str(dcmread(p, stop_before_pixels=True).SOPInstanceUID)] = p.read_bytes()
        reply = Hl7Handler(archive).handle(A08.encode())
        assert b"MSA|AA|" in reply, reply
        with archive.index.read_session() as s:
            stamps = dict(s.execute(select(StudyRow.study_uid, StudyRow.identity_updated_at)).all())
        assert stamps[changed.study_uid] is not None and stamps[kept.study_uid] is None

        refs = archive.retrieve.select(study_uids=[changed.study_uid, kept.study_uid])
        assert len(refs) == 4
        for ref in refs:
            one = archive.retrieve.instance(ref.study_uid, ref.series_uid, ref.sop_instance_uid)
            assert one is not None and one.identity == ref.identity
            stored = archive.retrieve.path(ref)
            with archive.retrieve.produce(ref, [ref.transfer_syntax_uid]) as produced:
                ds = dcmread(produced.file_path())
                original = dcmread(io.BytesIO(originals[ref.sop_instance_uid]))
                assert np.array_equal(ds.pixel_array, original.pixel_array)
                if ref.study_uid == kept.study_uid:
                    assert ref.identity is None and produced.unchanged and produced.file_path() == stored
                    assert produced.file_path().read_bytes() == originals[ref.sop_instance_uid]
                else:
                    assert ref.identity is not None and not produced.unchanged and produced.file_path() != stored
                    assert (str(ds.PatientName), ds.PatientBirthDate, ds.PatientSex, ds.PatientID) == ("DOE^JANE^MARIE", "19691231", "O", "PAT001")
                    assert str(archive.retrieve.header(ref).PatientName) == "DOE^JANE^MARIE"
                    # JPIP Referenced (header without Pixel Data, issue 16): the same identity
                    with archive.retrieve.produce(ref, [JPIP_REFERENCED]) as jpip:
                        assert jpip.transfer_syntax == JPIP_REFERENCED
                        h = dcmread(jpip.file_path())
                        assert "PixelData" not in h and "PixelDataProviderURL" in h
                        assert (str(h.PatientName), h.PatientID, h.PatientBirthDate) == ("DOE^JANE^MARIE", "PAT001", "19691231")
            # the archive's own copy is what was received, and its checksum still says so
            assert stored.read_bytes() == originals[ref.sop_instance_uid]
            assert sha256(stored.read_bytes()).hexdigest() == ref.copies[0][3]

        done, errors = push_studies(archive, "WS1", [changed.study_uid, kept.study_uid])
        assert (done, errors) == (4, [])
        for ref in refs:
            want = "DOE^JANE^MARIE" if ref.study_uid == changed.study_uid else "STAYS^SAME"
            assert str(received[ref.sop_instance_uid].PatientName) == want
        # the routing queue (`xdsi route --study UID --to WS1`) sends the same
        from xdsi.routing.queue import RouteQueue
        from xdsi.routing.service import deliver_now

        received.clear()
        q = RouteQueue(archive, settings.routes, settings.routing)
        pks = q.queue_study(changed.study_uid, "WS1", None)
        assert len(pks) == 2 and len(deliver_now(q, pks)) == 2
        assert sorted(received) == sorted(r.sop_instance_uid for r in refs if r.study_uid == changed.study_uid)
        for uid, ds in received.items():
            assert (str(ds.PatientName), ds.PatientID) == ("DOE^JANE^MARIE", "PAT001")
            assert np.array_equal(ds.pixel_array, dcmread(io.BytesIO(originals[uid])).pixel_array)

        # an A40 into a patient this archive already holds: the merged study is marked and sent as the survivor
        merge = "\r".join([_msh("ADT^A40", "CO9"), "PID|||PAT001^^^HOSP||DOE^JANE^MARIE||19691231|O", "MRG|PAT777^^^HOSP"]) + "\r"
        assert b"MSA|AA|" in Hl7Handler(archive).handle(merge.encode())
        for ref in archive.retrieve.select(study_uids=[kept.study_uid]):
            assert ref.identity is not None and ref.identity.patient_id == "PAT001"
            with archive.retrieve.produce(ref, [ref.transfer_syntax_uid]) as produced:
                ds = dcmread(produced.file_path())
                assert (ds.PatientID, str(ds.PatientName), ds.PatientSex) == ("PAT001", "DOE^JANE^MARIE", "O")
    finally:
        archive.close()
        server.shutdown()


def test_wado_uri_patient_annotation_burns_in_the_new_identity(world: World, tmp_path: Path) -> None:
    """``annotation=patient`` draws name, ID, birth date and sex into the image: the index's, as the objects say."""
    from xdsi.archive.coercion import Identity, write_coerced
    from xdsi.render import render

    study = world.by_name("merged")
    item = study.items[0]
    r = requests.get(f"{world.base}/wado", params={
        "requestType": "WADO", "studyUID": study.uid, "seriesUID": item.series_uid, "objectUID": item.sop_uid,
        "contentType": "image/png", "annotation": "patient"}, timeout=TIMEOUT)
    assert r.status_code == 200, r.text[:300]
    e = study.expected
    assert e is not None
    coerced = tmp_path / "coerced.dcm"
    with open(coerced, "wb") as out:
        write_coerced(item.path, out, Identity(e["PatientID"], e["IssuerOfPatientID"], e["PatientName"], e["PatientBirthDate"], e["PatientSex"]))
    assert r.content == render(coerced, content_type="image/png", annotation=("patient",))
    assert r.content != render(item.path, content_type="image/png", annotation=("patient",))
