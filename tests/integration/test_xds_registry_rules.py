"""Every XDS metadata rule broken on purpose and rejected by the strict test registry, through the zeep clients."""

from __future__ import annotations

import copy
import hashlib
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterator

import pytest
import requests
from lxml import etree

from tests.support.registry import TestRegistry
from tests.support.xds import PATIENT_CX, xds_settings
from xdsi.config import XdsSettings
from xdsi.tools.synth import StudySpec, ct_instance
from xdsi.uids import new_uid
from xdsi.standards import constants as C
from xdsi.wire.soap import readdress
from xdsi.xds.client import RegistryClient, RepositoryClient
from xdsi.xds.codes import CodeTable
from xdsi.xds.manifest import InstanceRow, RetrieveInfo, SeriesRow, StudySnapshot, build_kos
from xdsi.xds.metadata import DocumentInfo, build_submission, new_entry_uuid, oid_uid

R = f"{{{C.NS_RIM}}}"


@pytest.fixture(scope="module")
def registry() -> Iterator[TestRegistry]:
    with TestRegistry(CodeTable.load(), {PATIENT_CX, "OTHER^^^&1.3.6.1.4.1.21367.13.20.1000&ISO"}) as reg:
        yield reg


def snapshot(patient_id: str = "PAT001") -> StudySnapshot:
    spec = StudySpec(patient_id=patient_id)
    series = new_uid()
    ds = ct_instance(spec, series, 1)
    return StudySnapshot(
        patient_id=spec.patient_id, issuer_of_patient_id=spec.issuer, patient_name=spec.patient_name, birth_date=spec.birth_date,
        sex=spec.sex, study_uid=spec.study_uid, study_date=spec.study_date, study_time=spec.study_time,
        accession_number=spec.accession, accession_issuer="", study_id="1", study_description=spec.description,
        referring_physician="SMITH^JOHN", procedure_code=None,
        series=(SeriesRow(series, "CT", "CHEST", (InstanceRow(ds.SOPInstanceUID, ds.SOPClassUID),)),),
    )


def good(include_repository: bool = True, replaces: str = "", patient_id: str = "PAT001"):  # type: ignore[no-untyped-def]
    snap = snapshot(patient_id)
    m = build_kos(snap, RetrieveInfo("XDSI", "1.3.6.1.4.1.21367.13.80.110", ""))
    doc = DocumentInfo(m.sop_instance_uid, new_entry_uuid(), m.size, m.sha1, datetime.now())
    sub = build_submission(snap, doc, xds_settings(unmapped_patients="local-authority", patient_ids=(), issuer_oids={}), CodeTable.load(), submission_set_uid=oid_uid(),
                           include_repository=include_repository, replaces_entry_uuid=replaces)
    return sub.request, doc, m.data


def de_of(req: etree._Element) -> etree._Element:
    return req.find(f".//{R}ExtrinsicObject")


def ss_of(req: etree._Element) -> etree._Element:
    return req.find(f".//{R}RegistryPackage")


def slot(obj: etree._Element, name: str) -> etree._Element:
    return next(s for s in obj.findall(f"{R}Slot") if s.get("name") == name)


def classification(obj: etree._Element, scheme: str) -> etree._Element:
    return next(c for c in obj.findall(f"{R}Classification") if c.get("classificationScheme") == scheme)


def ext(obj: etree._Element, scheme: str) -> etree._Element:
    return next(e for e in obj.findall(f"{R}ExternalIdentifier") if e.get("identificationScheme") == scheme)


def set_value(el: etree._Element, value: str) -> None:
    el.find(f".//{R}Value").text = value


MUTATIONS: dict[str, tuple[Callable[[etree._Element], None], str]] = {
    "classCode not in the code list": (lambda r: classification(de_of(r), C.DE_CLASS_CODE).set("nodeRepresentation", "FOO"), C.XDS_REGISTRY_METADATA_ERROR),
    "code under an unknown coding scheme": (lambda r: set_value(classification(de_of(r), C.DE_TYPE_CODE), "9.9.9"), C.XDS_REGISTRY_METADATA_ERROR),
    "contentTypeCode not in the list": (lambda r: classification(ss_of(r), C.SS_CONTENT_TYPE_CODE).set("nodeRepresentation", "X"), C.XDS_REGISTRY_METADATA_ERROR),
    "patient with another assigning authority": (
        lambda r: [ext(de_of(r), C.DE_PATIENT_ID).set("value", "PAT001^^^&1.2.3&ISO"), ext(ss_of(r), C.SS_PATIENT_ID).set("value", "PAT001^^^&1.2.3&ISO")],
        C.XDS_UNKNOWN_PATIENT_ID,
    ),
    "patientId not a CX": (lambda r: [ext(de_of(r), C.DE_PATIENT_ID).set("value", "PAT001"), ext(ss_of(r), C.SS_PATIENT_ID).set("value", "PAT001")], C.XDS_REGISTRY_METADATA_ERROR),
    "DocumentEntry and SubmissionSet patients differ": (
        lambda r: ext(de_of(r), C.DE_PATIENT_ID).set("value", "OTHER^^^&1.3.6.1.4.1.21367.13.20.1000&ISO"), C.XDS_PATIENT_ID_DOES_NOT_MATCH),
    "creationTime missing": (lambda r: de_of(r).remove(slot(de_of(r), "creationTime")), C.XDS_REGISTRY_METADATA_ERROR),
    "creationTime not a DTM": (lambda r: set_value(slot(de_of(r), "creationTime"), "2024-01-15"), C.XDS_REGISTRY_METADATA_ERROR),
    "languageCode missing": (lambda r: de_of(r).remove(slot(de_of(r), "languageCode")), C.XDS_REGISTRY_METADATA_ERROR),
    "sourcePatientId not a CX": (lambda r: set_value(slot(de_of(r), "sourcePatientId"), "PAT001^^^HOSP"), C.XDS_REGISTRY_METADATA_ERROR),
    "sourcePatientInfo not PID-n|": (lambda r: set_value(slot(de_of(r), "sourcePatientInfo"), "DOE^JANE"), C.XDS_REGISTRY_METADATA_ERROR),
    "hash not SHA-1": (lambda r: set_value(slot(de_of(r), "hash"), "abc"), C.XDS_REGISTRY_METADATA_ERROR),
    "repositoryUniqueId missing": (lambda r: de_of(r).remove(slot(de_of(r), "repositoryUniqueId")), C.XDS_REGISTRY_METADATA_ERROR),
    "typeCode missing": (lambda r: de_of(r).remove(classification(de_of(r), C.DE_TYPE_CODE)), C.XDS_REGISTRY_METADATA_ERROR),
    "two classCodes": (lambda r: de_of(r).insert(de_of(r).index(classification(de_of(r), C.DE_CLASS_CODE)), copy.deepcopy(classification(de_of(r), C.DE_CLASS_CODE))), C.XDS_REGISTRY_METADATA_ERROR),
    "formatCode without codingScheme": (lambda r: classification(de_of(r), C.DE_FORMAT_CODE).remove(slot(classification(de_of(r), C.DE_FORMAT_CODE), "codingScheme")), C.XDS_REGISTRY_METADATA_ERROR),
    "uniqueId ExternalIdentifier missing": (lambda r: de_of(r).remove(ext(de_of(r), C.DE_UNIQUE_ID)), C.XDS_REGISTRY_METADATA_ERROR),
    "authorInstitution not an XON": (lambda r: set_value(slot(classification(de_of(r), C.DE_AUTHOR), "authorInstitution"), "^^^^^^^^^NOT-AN-OID"), C.XDS_REGISTRY_METADATA_ERROR),
    "authorPerson not an XCN": (lambda r: slot(classification(de_of(r), C.DE_AUTHOR), "authorInstitution").set("name", "authorPerson") or set_value(slot(classification(de_of(r), C.DE_AUTHOR), "authorPerson"), "12345"), C.XDS_REGISTRY_METADATA_ERROR),
    "author with an unknown slot": (lambda r: slot(classification(de_of(r), C.DE_AUTHOR), "authorInstitution").set("name", "authorFoo"), C.XDS_REGISTRY_METADATA_ERROR),
    "referenceIdList accession without ISO authority": (lambda r: set_value(slot(de_of(r), C.SLOT_REFERENCE_ID_LIST), "ACC001^^^^urn:ihe:iti:xds:2013:accession"), C.XDS_REGISTRY_METADATA_ERROR),
    "wrong objectType": (lambda r: de_of(r).set("objectType", "urn:uuid:34268e47-fdf5-41a6-ba33-82133c465248"), C.XDS_REGISTRY_METADATA_ERROR),
    "mimeType not in the domain": (lambda r: de_of(r).set("mimeType", "application/x-foo"), C.XDS_REGISTRY_METADATA_ERROR),
    "no HasMember": (lambda r: r[0].remove(r[0].find(f"{R}Association")), C.XDS_REGISTRY_METADATA_ERROR),
    "no SubmissionSet classification": (lambda r: r[0].remove(next(c for c in r[0].findall(f"{R}Classification") if c.get("classificationNode"))), C.XDS_REGISTRY_METADATA_ERROR),
    "submissionTime missing": (lambda r: ss_of(r).remove(slot(ss_of(r), "submissionTime")), C.XDS_REGISTRY_METADATA_ERROR),
    "sourceId not an OID": (lambda r: ext(ss_of(r), C.SS_SOURCE_ID).set("value", "xdsi"), C.XDS_REGISTRY_METADATA_ERROR),
    "schema-invalid Slot without name": (lambda r: slot(de_of(r), "size").attrib.pop("name"), C.XDS_REGISTRY_METADATA_ERROR),
    "RPLC of an unknown entry": (
        lambda r: etree.SubElement(r[0], f"{R}Association", id=new_entry_uuid(), associationType=C.ASSOC_RPLC,
                                   sourceObject=de_of(r).get("id"), targetObject=new_entry_uuid()),
        C.XDS_UNRESOLVED_REFERENCE),  # ITI TF-2 3.42.4.1.3.5
}


@pytest.mark.parametrize("case", sorted(MUTATIONS))
def test_iti42_rule_broken_is_rejected(registry: TestRegistry, case: str) -> None:
    mutate, code = MUTATIONS[case]
    req, doc, _ = good()
    # the unbroken submission would be accepted: checked on a copy with fresh identifiers below
    mutate(req)
    before = len(registry.entries)
    result = RegistryClient(registry.registry_url).register(req)
    assert result.status == C.STATUS_FAILURE, case
    assert code in [e.error_code for e in result.errors], (case, result.error_text())
    assert all(e.code_context for e in result.errors)
    assert len(registry.entries) == before


def test_unbroken_submission_is_accepted(registry: TestRegistry) -> None:
    req, doc, _ = good()
    result = RegistryClient(registry.registry_url).register(req)
    assert result.success, result.error_text()
    assert registry.by_unique_id(doc.unique_id) is not None


def test_duplicate_and_rplc_rules(registry: TestRegistry) -> None:
    req, doc, _ = good()
    assert RegistryClient(registry.registry_url).register(req).success
    # same document again, changed hash: XDSNonIdenticalHash
    again = copy.deepcopy(req)
    set_value(slot(de_of(again), "hash"), "0" * 40)
    ext(ss_of(again), C.SS_UNIQUE_ID).set("value", oid_uid())
    for o in again.iter(f"{R}ExtrinsicObject"):
        old = o.get("id")
        o.set("id", new_entry_uuid())
        for child in again.iter():
            for attr in ("classifiedObject", "registryObject", "targetObject"):
                if child.get(attr) == old:
                    child.set(attr, o.get("id"))
    r = RegistryClient(registry.registry_url).register(again)
    assert C.XDS_NON_IDENTICAL_HASH in [e.error_code for e in r.errors], r.error_text()
    # RPLC: the replaced entry becomes Deprecated; replacing it again is refused
    req2, doc2, _ = good(replaces=doc.entry_uuid)
    assert RegistryClient(registry.registry_url).register(req2).success
    assert registry.entries[doc.entry_uuid].status == C.STATUS_DEPRECATED
    req3, _, _ = good(replaces=doc.entry_uuid)
    r = RegistryClient(registry.registry_url).register(req3)
    assert C.XDS_REGISTRY_DEPRECATED_DOCUMENT_ERROR == "XDSRegistryDeprecatedDocumentError"
    assert C.XDS_REGISTRY_DEPRECATED_DOCUMENT_ERROR in [e.error_code for e in r.errors], r.error_text()
    # RPLC across patients
    req4, _, _ = good(replaces=doc2.entry_uuid, patient_id="OTHER")
    r = RegistryClient(registry.registry_url).register(req4)
    assert C.XDS_PATIENT_ID_DOES_NOT_MATCH in [e.error_code for e in r.errors], r.error_text()


def _fresh_ids(req: etree._Element, *, submission_set: bool = True) -> None:
    """A new entryUUID for the DocumentEntry and (by default) a new SubmissionSet uniqueId: only the DocumentEntry uniqueId stays."""
    _rename_doc(req, new_entry_uuid())
    if submission_set:
        ext(ss_of(req), C.SS_UNIQUE_ID).set("value", oid_uid())


def codes_of(r) -> list[str]:  # type: ignore[no-untyped-def]
    return [e.error_code for e in r.errors]


def test_resent_document_entry_rules(registry: TestRegistry) -> None:
    """ITI TF-2 3.42.4.1.3.3.1: same uniqueId, hash and size is no error; another hash or size is refused, each by its code."""
    client = RegistryClient(registry.registry_url)
    req, doc, _ = good()
    assert client.register(copy.deepcopy(req)).success
    again = copy.deepcopy(req)
    _fresh_ids(again)
    r = client.register(again)
    assert r.success and not r.errors, r.error_text()
    assert len(registry.all_by_unique_id(doc.unique_id)) == 2
    for name, value, code in (("hash", "0" * 40, C.XDS_NON_IDENTICAL_HASH), ("size", "1", C.XDS_NON_IDENTICAL_SIZE)):
        bad = copy.deepcopy(req)
        _fresh_ids(bad)
        set_value(slot(de_of(bad), name), value)
        r = client.register(bad)
        assert r.status == C.STATUS_FAILURE and codes_of(r) == [code], (name, r.error_text())
        assert doc.unique_id in r.errors[0].code_context  # "The codeContext shall indicate uniqueId"
    assert len(registry.all_by_unique_id(doc.unique_id)) == 2
    # the same uniqueId twice in one submission
    two = copy.deepcopy(req)
    _fresh_ids(two)
    de2 = copy.deepcopy(de_of(two))
    two[0].insert(1, de2)
    _rename_doc_el(two, de2, new_entry_uuid())
    r = client.register(two)
    assert C.XDS_REGISTRY_DUPLICATE_UNIQUE_ID_IN_MESSAGE in codes_of(r), r.error_text()


def test_submission_set_and_folder_unique_ids(registry: TestRegistry) -> None:
    """XDSDuplicateUniqueIdInRegistry only for a SubmissionSet or Folder uniqueId, its codeContext naming which and the value."""
    client = RegistryClient(registry.registry_url)
    req, doc, _ = good()
    ss_uid = ext(ss_of(req), C.SS_UNIQUE_ID).get("value")
    assert client.register(copy.deepcopy(req)).success
    # the same SubmissionSet uniqueId again (with a new DocumentEntry, and with the very same one)
    again, _, _ = good()
    ext(ss_of(again), C.SS_UNIQUE_ID).set("value", ss_uid)
    same = copy.deepcopy(req)
    _fresh_ids(same, submission_set=False)
    for sub in (again, same):
        r = client.register(sub)
        assert r.status == C.STATUS_FAILURE and codes_of(r) == [C.XDS_DUPLICATE_UNIQUE_ID], r.error_text()
        assert "SubmissionSet" in r.errors[0].code_context and ss_uid in r.errors[0].code_context
    # a SubmissionSet uniqueId that a registered DocumentEntry already has (3.42.4.1.3.3.7)
    taken, _, _ = good()
    ext(ss_of(taken), C.SS_UNIQUE_ID).set("value", doc.unique_id)
    r = client.register(taken)
    assert codes_of(r) == [C.XDS_DUPLICATE_UNIQUE_ID] and doc.unique_id in r.errors[0].code_context, r.error_text()
    # a Folder: accepted once, its uniqueId refused the second time
    folder_uid = oid_uid()
    for attempt in range(2):
        sub, _, _ = good()
        _add_folder(sub, folder_uid, PATIENT_CX)
        r = client.register(sub)
        if attempt == 0:
            assert r.success, r.error_text()
            assert registry.folders[folder_uid] == PATIENT_CX
        else:
            assert codes_of(r) == [C.XDS_DUPLICATE_UNIQUE_ID], r.error_text()
            assert "Folder" in r.errors[0].code_context and folder_uid in r.errors[0].code_context


def _add_folder(req: etree._Element, uid: str, patient: str) -> None:
    """A new Folder holding the submission's DocumentEntry (ITI TF-3 4.2.1.3, 4.2.3.4), member of the SubmissionSet."""
    objs, fid = req[0], "Folder01"
    ss_id, de_id = ss_of(req).get("id"), de_of(req).get("id")
    f = etree.SubElement(objs, f"{R}RegistryPackage", id=fid, objectType=C.OBJECT_TYPE_REGISTRY_PACKAGE)
    etree.SubElement(etree.SubElement(f, f"{R}Name"), f"{R}LocalizedString", value="imaging")
    for scheme, value in ((C.FOLDER_PATIENT_ID, patient), (C.FOLDER_UNIQUE_ID, uid)):
        e = etree.SubElement(f, f"{R}ExternalIdentifier", id=new_entry_uuid(), identificationScheme=scheme, value=value,
                             objectType=C.EXTERNAL_IDENTIFIER_OBJECT_TYPE, registryObject=fid)
        etree.SubElement(etree.SubElement(e, f"{R}Name"), f"{R}LocalizedString", value=C.EXTERNAL_ID_NAMES[scheme])
    etree.SubElement(objs, f"{R}Classification", id=new_entry_uuid(), objectType=C.CLASSIFICATION_OBJECT_TYPE,
                     classifiedObject=fid, classificationNode=C.FOLDER_CLASSIFICATION_NODE)
    for src, tgt in ((ss_id, fid), (fid, de_id)):
        etree.SubElement(objs, f"{R}Association", id=new_entry_uuid(), associationType=C.ASSOC_HAS_MEMBER, sourceObject=src, targetObject=tgt)


def _rename_doc_el(req: etree._Element, de: etree._Element, new_id: str) -> None:
    """Give one DocumentEntry a new id (its classifications and identifiers follow) and make it a member of the SubmissionSet."""
    old = de.get("id")
    for el in de.iter():
        for attr in ("id", "classifiedObject", "registryObject"):
            if el.get(attr) == old:
                el.set(attr, new_id)
    for el in de.iter():
        if el is not de and el.get("id", "").startswith("urn:uuid:"):
            el.set("id", new_entry_uuid())
    hm = etree.SubElement(req[0], f"{R}Association", id=new_entry_uuid(), associationType=C.ASSOC_HAS_MEMBER,
                          sourceObject=ss_of(req).get("id"), targetObject=new_id)
    etree.SubElement(etree.SubElement(etree.SubElement(hm, f"{R}Slot", name="SubmissionSetStatus"), f"{R}ValueList"), f"{R}Value").text = "Original"


def _rename_doc(req: etree._Element, new_id: str) -> None:
    de = de_of(req)
    old = de.get("id")
    for el in req.iter():
        for attr in ("id", "classifiedObject", "registryObject", "targetObject", "sourceObject"):
            if el.get(attr) == old:
                el.set(attr, new_id)


def test_iti41_repository_rules(registry: TestRegistry) -> None:
    repo = RepositoryClient(registry.repository_url)
    req, doc, data = good(include_repository=False)
    # wrong hash
    bad = copy.deepcopy(req)
    set_value(slot(de_of(bad), "hash"), hashlib.sha1(b"other").hexdigest())
    r = repo.provide_and_register(bad, {doc.entry_uuid: data})
    assert r.status == C.STATUS_FAILURE and C.XDS_REPOSITORY_METADATA_ERROR in [e.error_code for e in r.errors], r.error_text()
    # wrong size
    bad = copy.deepcopy(req)
    set_value(slot(de_of(bad), "size"), str(len(data) + 1))
    r = repo.provide_and_register(bad, {doc.entry_uuid: data})
    assert C.XDS_REPOSITORY_METADATA_ERROR in [e.error_code for e in r.errors], r.error_text()
    # a DocumentEntry without its Document, a Document without its DocumentEntry
    r = repo.provide_and_register(copy.deepcopy(req), {"urn:uuid:0bd1e0a5-71cb-4bd5-a3a8-0e9a8b0a1a1a": data})
    codes = [e.error_code for e in r.errors]
    assert C.XDS_MISSING_DOCUMENT in codes and C.XDS_MISSING_DOCUMENT_METADATA in codes, r.error_text()
    # registry-side errors are copied into the ITI-41 answer and nothing is kept
    bad = copy.deepcopy(req)
    classification(de_of(bad), C.DE_CLASS_CODE).set("nodeRepresentation", "FOO")
    r = repo.provide_and_register(bad, {doc.entry_uuid: data})
    assert C.XDS_REGISTRY_METADATA_ERROR in [e.error_code for e in r.errors]
    assert doc.unique_id not in registry.documents
    # and the correct one is accepted: the repository adds repositoryUniqueId
    r = repo.provide_and_register(req, {doc.entry_uuid: data})
    assert r.success, r.error_text()
    entry = registry.by_unique_id(doc.unique_id)
    assert entry is not None and entry.repository_unique_id == registry.repository_unique_id
    # the same uniqueId with other bytes: XDSNonIdenticalHash / Size at the repository
    req2, doc2, _ = good(include_repository=False)
    ext(de_of(req2), C.DE_UNIQUE_ID).set("value", doc.unique_id)
    for s in ("hash", "size"):
        de_of(req2).remove(slot(de_of(req2), s))
    r = repo.provide_and_register(req2, {doc2.entry_uuid: data + b"x"})
    codes = [e.error_code for e in r.errors]
    assert C.XDS_NON_IDENTICAL_HASH in codes and C.XDS_NON_IDENTICAL_SIZE in codes, r.error_text()


def test_transport_rules(registry: TestRegistry) -> None:
    """ITI-41 sent as plain SOAP, and WS-Addressing without mustUnderstand / ReplyTo: SOAP Faults."""
    req, doc, data = good(include_repository=False)
    env = etree.Element(f"{{{C.NS_SOAP12}}}Envelope")
    etree.SubElement(env, f"{{{C.NS_SOAP12}}}Header")
    body = etree.SubElement(env, f"{{{C.NS_SOAP12}}}Body")
    pnr = etree.SubElement(body, C.q("xds", "ProvideAndRegisterDocumentSetRequest"))
    pnr.append(req)
    d = etree.SubElement(pnr, C.q("xds", "Document"), id=doc.entry_uuid)
    import base64

    d.text = base64.b64encode(data).decode()
    readdress(env, C.ACTION_ITI41, registry.repository_url)
    r = requests.post(registry.repository_url, data=etree.tostring(env), headers={"Content-Type": "application/soap+xml; charset=utf-8"}, timeout=10)
    assert r.status_code == 400 and b"MTOM" in r.content
    env2 = copy.deepcopy(env)
    env2.find(f".//{{{C.NS_WSA}}}Action").attrib.pop(f"{{{C.NS_SOAP12}}}mustUnderstand")
    r = requests.post(registry.registry_url, data=etree.tostring(env2), headers={"Content-Type": "application/soap+xml"}, timeout=10)
    assert r.status_code == 400 and b"IHE-WSA101" in r.content
    env3 = copy.deepcopy(env)
    h = env3.find(f"{{{C.NS_SOAP12}}}Header")
    h.remove(h.find(f"{{{C.NS_WSA}}}ReplyTo"))
    r = requests.post(registry.registry_url, data=etree.tostring(env3), headers={"Content-Type": "application/soap+xml"}, timeout=10)
    assert r.status_code == 400 and b"IHE-WSA102" in r.content
