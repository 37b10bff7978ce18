"""Helpers for the XDS-I.b tests: an ITI-18 Document Consumer built with zeep from the official WSDL."""

from __future__ import annotations

from lxml import etree
from zeep import Client, Settings as ZeepSettings

from xdsi.config import PatientIdMapping, XdsSettings
from xdsi.standards import constants as C
from xdsi.wire.xml import make_parser
from xdsi.xds.client import REGISTRY_WSDL, IheAddressing, MtomTransport

AFFINITY = "1.3.6.1.4.1.21367.13.20.1000"  # IHERED, the shipped default
PATIENT_CX = f"PAT001^^^&{AFFINITY}&ISO"
SAFE = make_parser()


def stored_query(registry_url: str, query_id: str, params: dict[str, str]) -> etree._Element:
    """ITI-18 through zeep (request built from the WSDL); the AdhocQueryResponse element, parsed by lxml.

    zeep cannot parse ebRIM's abstract Identifiable substitution group, so the
    reply is taken raw and parsed with the hardened parser.
    """
    client = Client(str(REGISTRY_WSDL), transport=MtomTransport(timeout=10), plugins=[IheAddressing()],
                    settings=ZeepSettings(strict=True, raw_response=True))
    service = client.create_service(C.REGISTRY_BINDING, registry_url)
    slots = [{"name": k, "ValueList": {"_value_1": [{"Value": v}]}} for k, v in params.items()]
    response = service[C.OP_STORED_QUERY](
        ResponseOption={"returnType": "LeafClass", "returnComposedObjects": True},
        AdhocQuery={"id": query_id, "Slot": slots},
    )
    assert response.status_code == 200, response.text[:500]
    env = etree.fromstring(response.content, SAFE)
    return env.find(f"{{{C.NS_SOAP12}}}Body/{C.q('query', 'AdhocQueryResponse')}")


def find_documents(registry_url: str, patient_cx: str, status: str = C.STATUS_APPROVED) -> list[etree._Element]:
    resp = stored_query(
        registry_url,
        C.SQ_FIND_DOCUMENTS,
        {"$XDSDocumentEntryPatientId": f"'{patient_cx}'", "$XDSDocumentEntryStatus": f"('{status}')"},
    )
    assert resp.get("status") == C.STATUS_SUCCESS, etree.tostring(resp)[:2000]
    return resp.findall(f"{C.q('rim', 'RegistryObjectList')}/{C.q('rim', 'ExtrinsicObject')}")


def ext_id(obj: etree._Element, scheme: str) -> str:
    for e in obj.findall(C.q("rim", "ExternalIdentifier")):
        if e.get("identificationScheme") == scheme:
            return e.get("value", "")
    return ""


# -- identity settings for tests (issue 11) ----------------------------------------------------------
# An unmapped patient is refused by default, and identifiers not configured are generated per data dir.
# Tests that build metadata without an Archive, or publish the synthetic patient PAT001 (issuer HOSP),
# map it explicitly, the way a site must.
HOSP_OID = "1.3.6.1.4.1.21367.13.80.110.2"  # the OID of the synthetic studies' local issuer "HOSP"
PATIENT_ROWS_TOML = (
    '[[xds.patient_ids]]\nlocal_id = "PAT001"\nlocal_issuer = "HOSP"\naffinity_id = "PAT001"\n'
    f'affinity_authority = "{AFFINITY}"\n\n[xds.issuer_oids]\nHOSP = "{HOSP_OID}"\n'
)


def xds_settings(**kw: object) -> XdsSettings:
    """XdsSettings with fixed identifiers (DEFAULT_REPOSITORY_UNIQUE_ID) and PAT001 of HOSP mapped to PATIENT_CX."""
    base: dict[str, object] = {
        "repository_unique_id": C.DEFAULT_REPOSITORY_UNIQUE_ID, "source_id": "1.3.6.1.4.1.21367.13.80.110.1",
        "accession_authority": "1.3.6.1.4.1.21367.13.80.110.3", "uid_root": "1.3.6.1.4.1.21367.13.80.110.4",
        "author_institution": "xdsi Imaging^^^^^^^^^1.3.6.1.4.1.21367.13.80.110",
        "patient_ids": (PatientIdMapping("PAT001", "HOSP", "PAT001", AFFINITY),), "issuer_oids": {"HOSP": HOSP_OID},
    }
    return XdsSettings(**{**base, **kw})  # type: ignore[arg-type]
