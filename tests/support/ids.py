"""A running Imaging Document Source with a known study, zeep clients from the official WSDLs, and schema checks.

Every request a test sends and every response it receives can be validated
here against the *official* schemas in shared/standards (not the
copies the server serves), so a schema mistake on our side cannot hide.
"""

from __future__ import annotations

import copy
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests
from lxml import etree

from tests.support.server import XdsiProcess
from xdsi.archive import Archive
from xdsi.config import Settings
from xdsi.tools.synth import StudySpec, write_study
from xdsi.standards.constants import NS_XDS, NS_IHERAD, NS_RS, NS_SOAP12, NS_WADO, NS_XOP

from tests.support.standards import STANDARDS  # noqa: E402
IHE_WSDL = STANDARDS / "ihe/wsdl/XDS-I.b_ImagingDocumentSource.wsdl"
WADO_WSDL = STANDARDS / "wado-ws/wsdl/XDS-I.b_ImagingDocumentSource.wsdl"
NIST_REPOSITORY = "1.3.6.1.4.1.21367.13.80.110"  # ids_2018 test configuration
ENDPOINT = "/xdsi/ImagingDocumentSource"


@dataclass
class Study:
    spec: StudySpec
    files: list[Path]
    series: dict[str, list[tuple[str, Path]]] = field(default_factory=dict)  # series uid -> [(sop uid, file)]

    @property
    def uid(self) -> str:
        return self.spec.study_uid


def make_study(out: Path, *, series: int = 2, per_series: int = 2, rows: int = 64, columns: int = 64, **spec_kw: Any) -> Study:
    from pydicom import dcmread

    spec = StudySpec(**spec_kw)
    files = write_study(out, spec, series=series, per_series=per_series, rows=rows, columns=columns)
    st = Study(spec, files)
    for f in files:
        ds = dcmread(f, stop_before_pixels=True)
        st.series.setdefault(ds.SeriesInstanceUID, []).append((ds.SOPInstanceUID, f))
    return st


def populate(data_dir: Path, files: list[Path]) -> None:
    archive = Archive.open(Settings(data_dir=data_dir))
    try:
        for f in files:
            r = archive.store.store_file(f)
            assert r.ok, r.reason
    finally:
        archive.close()


@dataclass
class IdsServer:
    proc: XdsiProcess
    studies: list[Study]
    repository_unique_id: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.proc.http_port}{ENDPOINT}"


def start_ids(tmp_path: Path, studies: list[Study], repository_unique_id: str = NIST_REPOSITORY) -> XdsiProcess:
    data = tmp_path / "xdsi-data"
    populate(data, [f for s in studies for f in s.files])
    return XdsiProcess(data, env={"XDSI_REPOSITORY_UNIQUE_ID": repository_unique_id}).start()


@pytest.fixture(scope="module")
def ids_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IdsServer]:
    """An ``xdsi serve`` holding two studies (two series of two CT images each), NIST repository id."""
    tmp = tmp_path_factory.mktemp("ids")
    studies = [make_study(tmp / "s1"), make_study(tmp / "s2", patient_id="PAT002", patient_name="ROE^RICHARD")]
    proc = start_ids(tmp, studies)
    try:
        yield IdsServer(proc, studies, NIST_REPOSITORY)
    finally:
        proc.stop()


# -- official schemas ------------------------------------------------------------------------------


def _schema(entries: dict[str, Path]) -> etree.XMLSchema:
    imports = "".join(f'<xs:import namespace="{ns}" schemaLocation="{p.as_uri()}"/>' for ns, p in entries.items())
    doc = f'<xs:schema xmlns:xs="http://www.w3.org/2001/XMLSchema" targetNamespace="urn:test:wrapper">{imports}</xs:schema>'
    return etree.XMLSchema(etree.fromstring(doc.encode(), base_url=(STANDARDS / "w.xsd").as_uri()))


_SCHEMAS: dict[str, etree.XMLSchema] = {}


def official_schema(kind: str) -> etree.XMLSchema:
    """``ihe``: the IHE-published RAD-69/ITI-43 schemas; ``wado``: dcm4che's WADO-WS schema set."""
    if kind not in _SCHEMAS:
        if kind == "ihe":
            _SCHEMAS[kind] = _schema(
                {NS_IHERAD: STANDARDS / "ihe/schema/IHE/XDSI.b_ImagingDocumentSource.xsd", NS_XDS: STANDARDS / "ihe/schema/IHE/XDS.b_DocumentRepository.xsd"}
            )
        elif kind == "wado":
            _SCHEMAS[kind] = _schema({NS_WADO: STANDARDS / "wado-ws/schema/DICOM/dicom.wado.ws.2011.xsd"})
        elif kind == "ours":
            from xdsi.soap.validation import message_schema

            _SCHEMAS[kind] = message_schema()
    return _SCHEMAS[kind]


def assert_valid(element: Any, kind: str = "ihe") -> None:
    """Validate a body element (xop:Include children removed, as XOP's infoset says) against a schema set."""
    el = copy.deepcopy(element)
    for inc in list(el.iter(f"{{{NS_XOP}}}Include")):
        parent = inc.getparent()
        parent.remove(inc)
    schema = official_schema(kind)
    ok = schema.validate(etree.ElementTree(el))
    assert ok, f"{etree.QName(element).localname} invalid against {kind} schemas: {schema.error_log}\n{etree.tostring(element)[:3000]!r}"


# -- raw exchanges ---------------------------------------------------------------------------------


@dataclass
class RawResponse:
    http: requests.Response
    envelope: Any
    body: Any
    headers: list[Any]
    attachments: dict[str, bytes]

    def header(self, local: str) -> Any:
        return next((h for h in self.headers if etree.QName(h).localname == local), None)

    def document(self, element: Any) -> bytes:
        """The bytes an ihe:Document (xop:Include or inline) stands for."""
        import base64

        from xdsi.wire.mtom import normalize_cid

        inc = element.find(f"{{{NS_XOP}}}Include")
        if inc is not None:
            return self.attachments[normalize_cid(inc.get("href"))]
        return base64.b64decode(element.text or "")


def post_raw(url: str, envelope: bytes, *, content_type: str | None = None, action: str = "") -> RawResponse:
    """POST an envelope and decode the MTOM answer with requests_toolbelt (not our own reader)."""
    from requests_toolbelt.multipart.decoder import MultipartDecoder

    ct = content_type or f'application/soap+xml; charset=utf-8; action="{action}"'
    r = requests.post(url, data=envelope, headers={"Content-Type": ct}, timeout=60)
    assert r.headers["Content-Type"].startswith("multipart/related"), r.headers["Content-Type"]
    dec = MultipartDecoder(r.content, r.headers["Content-Type"])
    root = dec.parts[0]
    atts = {}
    for p in dec.parts[1:]:
        cid = p.headers[b"Content-ID"].decode().strip("<>")
        atts[cid] = p.content
    env = etree.fromstring(root.content)
    hdr = env.find(f"{{{NS_SOAP12}}}Header")
    body = env.find(f"{{{NS_SOAP12}}}Body")[0]
    return RawResponse(r, env, body, list(hdr) if hdr is not None else [], atts)


def registry_errors(body: Any) -> list[dict[str, str]]:
    return [dict(e.attrib) for e in body.iter(f"{{{NS_RS}}}RegistryError")]


def status_of(body: Any) -> str:
    rr = next(body.iter(f"{{{NS_RS}}}RegistryResponse"), None)
    if rr is None:
        rr = body.find(f"{{{NS_WADO}}}RegistryResponse")
    return rr.get("status")


def zeep_client(wsdl: Path, url: str, **kw: Any) -> Any:
    import zeep
    from zeep.plugins import HistoryPlugin

    history = HistoryPlugin(maxlen=4)
    client = zeep.Client(str(wsdl), settings=zeep.Settings(strict=True, xml_huge_tree=False), plugins=[history], **kw)
    service = client.create_service(next(iter(next(iter(client.wsdl.services.values())).ports.values())).binding.name, url)
    client.history = history  # type: ignore[attr-defined]
    client.service_address = url  # type: ignore[attr-defined]  # where exchange() posts what zeep built
    return client, service


def dicom_of(data: bytes):  # type: ignore[no-untyped-def]
    from pydicom import dcmread

    return dcmread(io.BytesIO(data))


# -- a richer study for the WADO-WS operations -----------------------------------------------------

GSPS_CENTER, GSPS_WIDTH = 1500.0, 600.0


@dataclass
class WadoStudy:
    study: Study
    image: tuple[str, str, Path]  # (series uid, sop uid, file): 64 rows x 128 columns, smooth, ViewCodeSequence
    multiframe: tuple[str, str, Path]  # 3 frames
    gsps: tuple[str, str, Path]  # a GSPS with a VOI window of GSPS_CENTER/GSPS_WIDTH for ``image``


def make_wado_study(out: Path) -> WadoStudy:
    import numpy as np
    from pydicom import dcmread
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, UID

    from xdsi.tools.synth import ct_instance
    from xdsi.uids import new_uid

    out.mkdir(parents=True, exist_ok=True)
    spec = StudySpec(patient_name="MÜLLER^ANNA^M^DR", patient_id="WADO01")
    series1, series2, series_ps = new_uid(), new_uid(), new_uid()
    ds = ct_instance(spec, series1, 1, rows=64, columns=128)
    y, x = np.mgrid[0:64, 0:128]
    ds.PixelData = (x * 30 + y).astype(np.uint16).tobytes()  # stored 0..3873: HU -1024..2849
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "R-10206", "SRT", "frontal"
    ds.ViewCodeSequence = [item]
    ds.add_new(0x00290010, "LO", "XDSI TEST")
    ds.add_new(0x00291001, "LO", "private value")
    f1 = out / "image.dcm"
    ds.save_as(f1, enforce_file_format=True)

    mf = ct_instance(spec, series2, 1, rows=32, columns=32)
    mf.NumberOfFrames = 3
    mf.PixelData = b"".join((np.full((32, 32), 1000 * (k + 1), dtype=np.uint16)).tobytes() for k in range(3))
    f2 = out / "multiframe.dcm"
    mf.save_as(f2, enforce_file_format=True)

    ps = Dataset()
    ps.file_meta = FileMetaDataset()
    ps.file_meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.11.1")
    ps.file_meta.MediaStorageSOPInstanceUID = new_uid()
    ps.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ps.SOPClassUID = ps.file_meta.MediaStorageSOPClassUID
    ps.SOPInstanceUID = ps.file_meta.MediaStorageSOPInstanceUID
    ps.Modality = "PR"
    for kw in ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber"):
        setattr(ps, kw, ds[kw].value)  # the study's own patient (issuer too: the archive refuses a mismatch)
    ps.SeriesInstanceUID = series_ps
    ps.SeriesNumber = 99
    ps.InstanceNumber = 1
    ps.ContentLabel = "TEST"
    ref_img = Dataset()
    ref_img.ReferencedSOPClassUID, ref_img.ReferencedSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    ref_series = Dataset()
    ref_series.SeriesInstanceUID = series1
    ref_series.ReferencedImageSequence = [ref_img]
    ps.ReferencedSeriesSequence = [ref_series]
    voi = Dataset()
    voi.ReferencedImageSequence = [ref_img]
    voi.WindowCenter, voi.WindowWidth = GSPS_CENTER, GSPS_WIDTH
    ps.SoftcopyVOILUTSequence = [voi]
    ps.PresentationLUTShape = "IDENTITY"
    f3 = out / "gsps.dcm"
    ps.save_as(f3, enforce_file_format=True)

    st = Study(spec, [f1, f2, f3])
    for f in st.files:
        d = dcmread(f, stop_before_pixels=True)
        st.series.setdefault(d.SeriesInstanceUID, []).append((d.SOPInstanceUID, f))
    return WadoStudy(st, (series1, ds.SOPInstanceUID, f1), (series2, mf.SOPInstanceUID, f2), (series_ps, ps.SOPInstanceUID, f3))


@dataclass
class WadoServer(IdsServer):
    wado: WadoStudy | None = None


@pytest.fixture(scope="module")
def wado_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WadoServer]:
    tmp = tmp_path_factory.mktemp("wado")
    w = make_wado_study(tmp / "w")
    proc = start_ids(tmp, [w.study])
    try:
        yield WadoServer(proc, [w.study], NIST_REPOSITORY, w)
    finally:
        proc.stop()


OUR_WSDL = Path(__file__).resolve().parents[2] / "xdsi/soap/wsdl/ImagingDocumentSource.wsdl"


def exchange(client: Any, service: Any, op: str, kind: str, action: str, **kw: Any) -> RawResponse:
    """Build with zeep, validate the request (schema set ``kind``), send it raw, validate the answer."""
    env = client.create_message(service, op, **kw)
    body = env.find(f"{{{NS_SOAP12}}}Body")[0]
    assert_valid(body, kind)
    msg_id = env.find(".//{http://www.w3.org/2005/08/addressing}MessageID").text
    resp = post_raw(client.service_address, etree.tostring(env, xml_declaration=True, encoding="UTF-8"), action=action)
    assert resp.http.status_code == 200, resp.http.text[:3000]
    assert_valid(resp.body, kind)
    assert resp.header("RelatesTo").text == msg_id
    return resp


def retrieve_study(service: Any, study_uid: str, documents: list[tuple[str, str]], repository: str, syntaxes: list[str]) -> Any:
    """RAD-69 for one study through a zeep ``service``: ``documents`` are (Series Instance UID, SOP Instance UID)."""
    series: dict[str, list[str]] = {}
    for series_uid, sop_uid in documents:
        series.setdefault(series_uid, []).append(sop_uid)
    request = [{
        "studyInstanceUID": study_uid,
        "SeriesRequest": [
            {"seriesInstanceUID": s, "DocumentRequest": [{"RepositoryUniqueId": repository, "DocumentUniqueId": u} for u in uids]}
            for s, uids in series.items()
        ],
    }]  # fmt: skip
    return service.ImagingDocumentSource_RetrieveImagingDocumentSet(StudyRequest=request, TransferSyntaxUIDList={"TransferSyntaxUID": syntaxes})
