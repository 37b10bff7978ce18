"""The KOS manifest and its metadata, built from the index: dciodvfy, pydicom attribute by attribute, the official schema."""

from __future__ import annotations

import subprocess
from datetime import datetime
from pathlib import Path

import pytest
from lxml import etree
from pydicom import dcmread
from pydicom.uid import KeyObjectSelectionDocumentStorage

from tests.support.registry import SAFE_PARSER, SCHEMA_DIR
from xdsi.archive import Archive
from xdsi.config import PatientIdMapping, XdsSettings
from xdsi.tools.synth import StudySpec, write_study
from xdsi.standards import constants as C
from xdsi.xds.codes import CodeTable
from xdsi.xds.manifest import NonConformantManifest, RetrieveInfo, build_kos, load_study
from xdsi.xds.metadata import DocumentInfo, MetadataError, build_submission, new_entry_uuid, oid_uid, xpn
from xdsi.xds.patients import patient_ids
from tests.support.xds import xds_settings

RETRIEVE = RetrieveInfo("XDSI", "1.3.6.1.4.1.21367.13.80.110", "http://127.0.0.1:8080/dicomweb")


@pytest.fixture
def study(archive: Archive, tmp_path: Path):  # type: ignore[no-untyped-def]
    spec = StudySpec(patient_name="MÜLLER^JÜRGEN^K^DR^JR", body_part="CHEST")
    paths = write_study(tmp_path / "in", spec, series=2, per_series=3)
    for p in paths:
        assert archive.store.store_file(p).ok
    return spec, paths


def test_kos_passes_dciodvfy_and_matches_the_study(archive: Archive, study, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    spec, paths = study
    snap = load_study(archive.index, spec.study_uid)
    assert snap is not None and snap.instance_count == 6
    m = build_kos(snap, RETRIEVE)
    out = tmp_path / "kos.dcm"
    out.write_bytes(m.data)
    run = subprocess.run(["/usr/bin/dciodvfy", str(out)], capture_output=True, text=True)
    report = run.stdout + run.stderr
    assert report.splitlines()[0].strip() == "KeyObjectSelectionDocument", report
    assert not [line for line in report.splitlines() if line.startswith("Error")], report

    kos = dcmread(out)
    images = [dcmread(p, stop_before_pixels=True) for p in paths]
    first = images[0]
    assert kos.SOPClassUID == KeyObjectSelectionDocumentStorage and kos.Modality == "KO"
    assert kos.SOPInstanceUID == m.sop_instance_uid and kos.SOPInstanceUID not in {i.SOPInstanceUID for i in images}
    assert kos.SeriesInstanceUID not in {i.SeriesInstanceUID for i in images}
    for kw in ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID",
               "AccessionNumber", "StudyDate", "StudyTime", "StudyID", "ReferringPhysicianName", "StudyDescription"):
        assert kos.get(kw) == first.get(kw), kw
    title = kos.ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning) == ("113030", "DCM", "Manifest")
    assert kos.ContentTemplateSequence[0].TemplateIdentifier == "2010"
    assert kos.ValueType == "CONTAINER" and kos.ContinuityOfContent == "SEPARATE"
    req = kos.ReferencedRequestSequence[0]
    assert req.AccessionNumber == spec.accession and req.StudyInstanceUID == spec.study_uid
    ev = kos.CurrentRequestedProcedureEvidenceSequence
    assert len(ev) == 1 and ev[0].StudyInstanceUID == spec.study_uid
    by_series = {s.SeriesInstanceUID: s for s in ev[0].ReferencedSeriesSequence}
    assert set(by_series) == {i.SeriesInstanceUID for i in images}
    for img in images:
        s = by_series[img.SeriesInstanceUID]
        assert s.RetrieveAETitle == "XDSI"
        assert s.RetrieveLocationUID == RETRIEVE.location_uid
        assert s.RetrieveURL == f"{RETRIEVE.wado_rs_base}/studies/{spec.study_uid}/series/{img.SeriesInstanceUID}"
        refs = {(r.ReferencedSOPClassUID, r.ReferencedSOPInstanceUID) for r in s.ReferencedSOPSequence}
        assert (img.SOPClassUID, img.SOPInstanceUID) in refs
    assert sum(len(s.ReferencedSOPSequence) for s in by_series.values()) == len(images)
    assert {c.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for c in kos.ContentSequence} == {i.SOPInstanceUID for i in images}
    assert all(c.ValueType == "IMAGE" and c.RelationshipType == "CONTAINS" for c in kos.ContentSequence)


def test_kos_file_meta_and_character_set(archive: Archive, study) -> None:  # type: ignore[no-untyped-def]
    """What the DICOM Conformance Statement says of the KOS we create: pydicom's Implementation Class UID, our version name, UTF-8."""
    from io import BytesIO

    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian

    spec, _ = study
    snap = load_study(archive.index, spec.study_uid)
    assert snap is not None
    kos = dcmread(BytesIO(build_kos(snap, RETRIEVE).data))
    assert kos.file_meta.ImplementationClassUID == PYDICOM_IMPLEMENTATION_UID
    assert kos.file_meta.ImplementationVersionName == "XDSI_KOS_1"
    assert kos.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert kos.SpecificCharacterSet == "ISO_IR 192" and kos.PatientName == spec.patient_name
    assert kos.Manufacturer == "xdsi" and "SourceApplicationEntityTitle" not in kos.file_meta


def test_non_conformant_kos_is_refused(archive: Archive, study) -> None:  # type: ignore[no-untyped-def]
    spec, _ = study
    snap = load_study(archive.index, spec.study_uid)
    with pytest.raises(NonConformantManifest, match="Retrieve Location UID"):
        build_kos(snap, RetrieveInfo("XDSI", "not-an-oid", ""))
    with pytest.raises(NonConformantManifest, match="Retrieve AE Title"):
        build_kos(snap, RetrieveInfo("", RETRIEVE.location_uid, ""))
    with pytest.raises(NonConformantManifest, match="new series"):
        build_kos(snap, RETRIEVE, series_uid=snap.series[0].series_uid)
    with pytest.raises(NonConformantManifest, match="no instances"):
        build_kos(load_study(archive.index, spec.study_uid, exclude_sops=snap.sop_uids), RETRIEVE)


def test_metadata_validates_against_the_official_schema(archive: Archive, study) -> None:  # type: ignore[no-untyped-def]
    spec, _ = study
    snap = load_study(archive.index, spec.study_uid)
    m = build_kos(snap, RETRIEVE)
    x = xds_settings()
    codes = CodeTable.load()
    sub = build_submission(snap, DocumentInfo(m.sop_instance_uid, new_entry_uuid(), m.size, m.sha1, datetime.now()),
                           x, codes, submission_set_uid=oid_uid(), include_repository=True)
    schema = etree.XMLSchema(etree.parse(str(SCHEMA_DIR / "IHE" / "XDS.b_DocumentRepository.xsd"), SAFE_PARSER))
    assert schema.validate(sub.request), schema.error_log
    de = sub.request.find(f".//{C.q('rim', 'ExtrinsicObject')}")
    assert de.get("mimeType") == "application/dicom"
    classes = {c.get("classificationScheme"): c for c in de.findall(C.q("rim", "Classification"))}
    fmt = classes[C.DE_FORMAT_CODE]
    assert fmt.get("nodeRepresentation") == "1.2.840.10008.5.1.4.1.1.88.59"
    assert fmt.findtext(f".//{C.q('rim', 'Value')}") == "1.2.840.10008.2.6.1"
    events = [c.get("nodeRepresentation") for c in de.findall(C.q("rim", "Classification")) if c.get("classificationScheme") == C.DE_EVENT_CODE]
    assert events == ["CT", "816094009"]  # one CID 29 modality, then the CID 4 region of CHEST (816094009, not 43799004)
    slots = {s.get("name"): [v.text for v in s.iter(C.q("rim", "Value"))] for s in de.findall(C.q("rim", "Slot"))}
    assert slots["sourcePatientInfo"][1] == "PID-5|MÜLLER^JÜRGEN^K^JR^DR"  # DICOM prefix/suffix order -> XPN
    assert slots[C.SLOT_REFERENCE_ID_LIST] == [
        f"ACC001^^^&{x.accession_authority}&ISO^urn:ihe:iti:xds:2013:accession",
        f"{spec.study_uid}^^^^urn:ihe:iti:xds:2016:studyInstanceUID",
    ]
    assert slots["serviceStartTime"][0].startswith("2024011")
    ext = {e.get("identificationScheme"): e.get("value") for e in de.findall(C.q("rim", "ExternalIdentifier"))}
    assert ext[C.DE_UNIQUE_ID] == m.sop_instance_uid
    assert ext[C.DE_PATIENT_ID] == "PAT001^^^&1.3.6.1.4.1.21367.13.20.1000&ISO"


def test_patient_id_mapping_table(archive: Archive, study) -> None:  # type: ignore[no-untyped-def]
    spec, _ = study
    snap = load_study(archive.index, spec.study_uid)
    x = XdsSettings(patient_ids=(PatientIdMapping("PAT001", "HOSP", "IHERED-994", "1.3.6.1.4.1.21367.13.20.1000"),),
                    issuer_oids={"HOSP": "1.2.3.4.5"})
    ids = patient_ids(snap, x)
    assert ids.mapped and ids.affinity == "IHERED-994^^^&1.3.6.1.4.1.21367.13.20.1000&ISO"
    assert ids.source == "PAT001^^^&1.2.3.4.5&ISO"
    with pytest.raises(MetadataError, match="not in \\[\\[xds.patient_ids\\]\\]"):
        patient_ids(snap, XdsSettings())  # unmapped: refused by default (issue 11)


def test_code_outside_the_domain_is_not_sent(archive: Archive, study) -> None:  # type: ignore[no-untyped-def]
    spec, _ = study
    snap = load_study(archive.index, spec.study_uid)
    m = build_kos(snap, RETRIEVE)
    with pytest.raises(MetadataError, match="classCode 'FOO' is not in the affinity domain"):
        build_submission(snap, DocumentInfo(m.sop_instance_uid, new_entry_uuid(), m.size, m.sha1, datetime.now()),
                         xds_settings(class_code="FOO"), CodeTable.load(), submission_set_uid=oid_uid())


def test_xpn() -> None:
    assert xpn("DOE^JOHN") == "DOE^JOHN"
    assert xpn("Yamada^Tarou=山田^太郎") == "Yamada^Tarou"
