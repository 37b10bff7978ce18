"""Every XDS.b / XDS-I.b constant in one place: namespaces, actions, ebRIM scheme UUIDs, statuses, error codes.

Values are from ITI TF-3 4.2.5 (scheme UUIDs), ITI TF-3 4.2.4 (statuses and
error codes), ITI TF-2 3.41-3.43 (actions) and RAD TF-3 4.68 (KOS manifest),
as digested in ``shared/standards/FACTS.md`` §3.  Nothing else in xdsi spells
these strings; import them from here.
"""

from __future__ import annotations

from pathlib import Path

from xdsi.xdsconst import (  # noqa: F401 -- re-exported: defined once, shared with the SOAP layer
    NS_SOAP12,
    NS_WSA,
    NS_XOP,
    NS_IHE as NS_XDS,
    NS_RS,
    NS_LCM,
    NS_QUERY,
    NS_RIM,
    WSA_ANONYMOUS,
    ACTION_ITI41 as ACTION_PNR,
    ACTION_ITI41_RESPONSE as ACTION_PNR_RESPONSE,
    ACTION_ITI42 as ACTION_REGISTER,
    ACTION_ITI42_RESPONSE as ACTION_REGISTER_RESPONSE,
    ACTION_ITI18 as ACTION_STORED_QUERY,
    ACTION_ITI18_RESPONSE as ACTION_STORED_QUERY_RESPONSE,
    ACTION_ITI43 as ACTION_RETRIEVE,
    ACTION_ITI43_RESPONSE as ACTION_RETRIEVE_RESPONSE,
    STATUS_SUCCESS,
    STATUS_FAILURE,
    STATUS_PARTIAL_SUCCESS as STATUS_PARTIAL,
    SEVERITY_ERROR,
    SEVERITY_WARNING,
    XDS_REPOSITORY_METADATA_ERROR,
    XDS_REPOSITORY_ERROR,
    XDS_MISSING_DOCUMENT,
    XDS_UNKNOWN_REPOSITORY_ID,
    XDS_DOCUMENT_UNIQUE_ID_ERROR,
    MIME_DICOM,
)

# -- XML namespaces ---------------------------------------------------------------------------

NSMAP = {"soap": NS_SOAP12, "wsa": NS_WSA, "xop": NS_XOP, "xds": NS_XDS, "rs": NS_RS, "lcm": NS_LCM, "query": NS_QUERY, "rim": NS_RIM}


def q(prefix: str, local: str) -> str:
    """Clark notation ``{ns}local`` for a prefix of :data:`NSMAP`."""
    return f"{{{NSMAP[prefix]}}}{local}"


# -- WS-Addressing actions (FACTS §3.1) ---------------------------------------------------------
ACTION_UPDATE = "urn:ihe:iti:2010:UpdateDocumentSet"  # ITI-57 (Metadata Update option)
ACTION_UPDATE_RESPONSE = "urn:ihe:iti:2010:UpdateDocumentSetResponse"

# zeep binding and operation names in the official WSDLs
REPOSITORY_BINDING = f"{{{NS_XDS}}}DocumentRepository_Binding"
REGISTRY_BINDING = f"{{{NS_XDS}}}DocumentRegistry_Binding_Soap12"
OP_PNR = "DocumentRepository_ProvideAndRegisterDocumentSet-b"
OP_RETRIEVE = "DocumentRepository_RetrieveDocumentSet"
OP_REGISTER = "DocumentRegistry_RegisterDocumentSet-b"
OP_STORED_QUERY = "DocumentRegistry_RegistryStoredQuery"

# -- Statuses and severities (ITI TF-3 4.2.4) --------------------------------------------------

# -- Error codes (ITI TF-3 Table 4.2.4.1-2) ----------------------------------------------------
XDS_REGISTRY_METADATA_ERROR = "XDSRegistryMetadataError"
XDS_REGISTRY_ERROR = "XDSRegistryError"
XDS_UNKNOWN_PATIENT_ID = "XDSUnknownPatientId"
XDS_PATIENT_ID_DOES_NOT_MATCH = "XDSPatientIdDoesNotMatch"
XDS_MISSING_DOCUMENT_METADATA = "XDSMissingDocumentMetadata"
XDS_NON_IDENTICAL_HASH = "XDSNonIdenticalHash"
XDS_NON_IDENTICAL_SIZE = "XDSNonIdenticalSize"
XDS_DUPLICATE_UNIQUE_ID = "XDSDuplicateUniqueIdInRegistry"
XDS_UNKNOWN_STORED_QUERY = "XDSUnknownStoredQuery"
XDS_STORED_QUERY_MISSING_PARAM = "XDSStoredQueryMissingParam"
XDS_REPLACED_DOCUMENT_NOT_APPROVED = "XDSRegistryMetadataError"  # RPLC target not Approved (ITI TF-3 4.2.2.2.1)

# -- ebRIM object types, statuses, association types ------------------------------------------
OBJECT_TYPE_STABLE_DOCUMENT = "urn:uuid:7edca82f-054d-47f2-a032-9b2a5b5186c1"
OBJECT_TYPE_REGISTRY_PACKAGE = "urn:oasis:names:tc:ebxml-regrep:ObjectType:RegistryObject:RegistryPackage"
STATUS_APPROVED = "urn:oasis:names:tc:ebxml-regrep:StatusType:Approved"
STATUS_DEPRECATED = "urn:oasis:names:tc:ebxml-regrep:StatusType:Deprecated"
ASSOC_HAS_MEMBER = "urn:oasis:names:tc:ebxml-regrep:AssociationType:HasMember"
ASSOC_UPDATE_AVAILABILITY_STATUS = "urn:ihe:iti:2010:AssociationType:UpdateAvailabilityStatus"
ASSOC_RPLC = "urn:ihe:iti:2007:AssociationType:RPLC"
CLASSIFICATION_OBJECT_TYPE = "urn:oasis:names:tc:ebxml-regrep:ObjectType:RegistryObject:Classification"
EXTERNAL_IDENTIFIER_OBJECT_TYPE = "urn:oasis:names:tc:ebxml-regrep:ObjectType:RegistryObject:ExternalIdentifier"

# -- DocumentEntry scheme UUIDs (ITI TF-3 4.2.5) -----------------------------------------------
DE_AUTHOR = "urn:uuid:93606bcf-9494-43ec-9b4e-a7748d1a838d"
DE_CLASS_CODE = "urn:uuid:41a5887f-8865-4c09-adf7-e362475b143a"
DE_CONFIDENTIALITY_CODE = "urn:uuid:f4f85eac-e6cb-4883-b524-f2705394840f"
DE_EVENT_CODE = "urn:uuid:2c6b8cb7-8b2a-4051-b291-b1ae6a575ef4"
DE_FORMAT_CODE = "urn:uuid:a09d5840-386c-46f2-b5ad-9c3699a4309d"
DE_HEALTHCARE_FACILITY_TYPE_CODE = "urn:uuid:f33fb8ac-18af-42cc-ae0e-ed0b0bdb91e1"
DE_PRACTICE_SETTING_CODE = "urn:uuid:cccf5598-8b07-4b77-a05e-ae952c785ead"
DE_TYPE_CODE = "urn:uuid:f0306f51-975f-434e-a61c-c59651d33983"
DE_PATIENT_ID = "urn:uuid:58a6f841-87b3-4a3e-92fd-a8ffeff98427"
DE_UNIQUE_ID = "urn:uuid:2e82c1f6-a085-4c72-9da3-8640a32e42ab"

# -- SubmissionSet scheme UUIDs -----------------------------------------------------------------
SS_CLASSIFICATION_NODE = "urn:uuid:a54d6aa5-d40d-43f9-88c5-b4633d873bdd"
SS_AUTHOR = "urn:uuid:a7058bb9-b4e4-4307-ba5b-e3f0ab85e12d"
SS_CONTENT_TYPE_CODE = "urn:uuid:aa543740-bdda-424e-8c96-df4873be8500"
SS_PATIENT_ID = "urn:uuid:6b5aea1a-874d-4603-a4bc-96a0a7b38446"
SS_SOURCE_ID = "urn:uuid:554ac39e-e3fe-47fe-b233-965d2a147832"
SS_UNIQUE_ID = "urn:uuid:96fdda7c-d067-4183-912e-bf5ee74998a8"

# Name of each ExternalIdentifier, as ITI TF-3 4.2.3 wants it written
EXTERNAL_ID_NAMES = {
    DE_PATIENT_ID: "XDSDocumentEntry.patientId",
    DE_UNIQUE_ID: "XDSDocumentEntry.uniqueId",
    SS_PATIENT_ID: "XDSSubmissionSet.patientId",
    SS_SOURCE_ID: "XDSSubmissionSet.sourceId",
    SS_UNIQUE_ID: "XDSSubmissionSet.uniqueId",
}

# Codes-file CodeType name -> DocumentEntry / SubmissionSet classification scheme
CODE_TYPE_SCHEMES = {
    "classCode": DE_CLASS_CODE,
    "confidentialityCode": DE_CONFIDENTIALITY_CODE,
    "eventCodeList": DE_EVENT_CODE,
    "formatCode": DE_FORMAT_CODE,
    "healthcareFacilityTypeCode": DE_HEALTHCARE_FACILITY_TYPE_CODE,
    "practiceSettingCode": DE_PRACTICE_SETTING_CODE,
    "typeCode": DE_TYPE_CODE,
    "contentTypeCode": SS_CONTENT_TYPE_CODE,
}

# -- Stored queries (FACTS §3.3) ------------------------------------------------------------------
SQ_FIND_DOCUMENTS = "urn:uuid:14d4debf-8f97-4251-9a74-a90016b0af0d"
SQ_GET_DOCUMENTS = "urn:uuid:5c4f972b-d56b-40ac-a5fc-c8ca9b40b9d4"
SQ_FIND_DOCUMENTS_BY_REFERENCE_ID = "urn:uuid:12941a89-e02e-4be5-967c-ce4bfc8fe492"

# -- referenceIdList (ITI TF-3 4.2.3.2.28 CXi) -----------------------------------------------------
SLOT_REFERENCE_ID_LIST = "urn:ihe:iti:xds:2013:referenceIdList"
REFID_ACCESSION = "urn:ihe:iti:xds:2013:accession"
REFID_STUDY_UID = "urn:ihe:iti:xds:2016:studyInstanceUID"

# -- The KOS manifest (RAD TF-3 4.68.4.1.2; FACTS §3.5) ------------------------------------------
KOS_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.88.59"
FORMAT_CODE_KOS = ("1.2.840.10008.5.1.4.1.1.88.59", "1.2.840.10008.2.6.1", "Key Object Selection Document")
MANIFEST_TITLE = ("113030", "DCM", "Manifest")
KOS_TEMPLATE_ID = "2010"
DCMR_MAPPING = "DCMR"
MODALITY_CODING_SCHEME = "1.2.840.10008.2.16.4"  # DCM, the scheme of CID 29 acquisition modality codes
SNOMED_CODING_SCHEME = "2.16.840.1.113883.6.96"

# -- Files shipped with xdsi -----------------------------------------------------------------------
DATA_DIR = Path(__file__).with_name("data")
DEFAULT_CODES_FILE = DATA_DIR / "codes.xml"
