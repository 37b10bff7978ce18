"""Every standard string of IHE XDS.b / XDS-I.b, ebRS/ebRIM, SOAP/WS-Addressing/MTOM and DICOM WADO-WS.

One module, so the SOAP adapter, the Imaging Document Source, the XDS
publishing side and the wire layer agree on every value that reaches the wire;
nothing else in xdsi spells these strings.  Names follow the transactions
(``ACTION_ITI41`` for Provide and Register, ``ACTION_RAD69`` ...).  DICOM values
come from pydicom where it names them (``pydicom.uid``, ``pydicom.sr.codedict``).
Sources: ``shared/standards/FACTS.md`` (ITI TF-2/3, RAD TF-3 as quoted by
Gazelle and NIST, PS3.18-2019a section 6.4); scheme UUIDs ITI TF-3 4.2.5;
statuses and error codes ITI TF-3 4.2.4; the KOS manifest RAD TF-3 4.68.
"""

from __future__ import annotations

from pydicom.sr.codedict import codes
from pydicom.uid import KeyObjectSelectionDocumentStorage

# -- namespaces -------------------------------------------------------------------------------------
NS_SOAP12 = "http://www.w3.org/2003/05/soap-envelope"
NS_SOAP11 = "http://schemas.xmlsoap.org/soap/envelope/"
NS_WSA = "http://www.w3.org/2005/08/addressing"
NS_XOP = "http://www.w3.org/2004/08/xop/include"
NS_WSSE = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-secext-1.0.xsd"
NS_SAML2 = "urn:oasis:names:tc:SAML:2.0:assertion"
NS_XDS = "urn:ihe:iti:xds-b:2007"
NS_IHERAD = "urn:ihe:rad:xdsi-b:2009"
NS_WADO = "urn:dicom:wado:ws:2011"
NS_WADO_SWAPPED = "urn:dicom:ws:wado:2011"  # dcm4che before fix #380; still accepted on input
NS_RS = "urn:oasis:names:tc:ebxml-regrep:xsd:rs:3.0"
NS_RIM = "urn:oasis:names:tc:ebxml-regrep:xsd:rim:3.0"
NS_LCM = "urn:oasis:names:tc:ebxml-regrep:xsd:lcm:3.0"
NS_QUERY = "urn:oasis:names:tc:ebxml-regrep:xsd:query:3.0"
NS_NATIVE_DICOM = "http://dicom.nema.org/PS3.19/models/NativeDICOM"

WSA_ANONYMOUS = "http://www.w3.org/2005/08/addressing/anonymous"

# -- WS-Addressing actions --------------------------------------------------------------------------
ACTION_RAD69 = "urn:ihe:rad:2009:RetrieveImagingDocumentSet"
ACTION_RAD69_LEGACY = "urn:ihe:rad:xdsi-b:2009:RetrieveImagingDocumentSet"  # early IHE WSDL; accepted, never sent
ACTION_RAD69_RESPONSE = "urn:ihe:iti:2007:RetrieveDocumentSetResponse"
ACTION_ITI43 = "urn:ihe:iti:2007:RetrieveDocumentSet"
ACTION_ITI43_RESPONSE = "urn:ihe:iti:2007:RetrieveDocumentSetResponse"
ACTION_ITI41 = "urn:ihe:iti:2007:ProvideAndRegisterDocumentSet-b"
ACTION_ITI41_RESPONSE = "urn:ihe:iti:2007:ProvideAndRegisterDocumentSet-bResponse"
ACTION_ITI42 = "urn:ihe:iti:2007:RegisterDocumentSet-b"
ACTION_ITI42_RESPONSE = "urn:ihe:iti:2007:RegisterDocumentSet-bResponse"
ACTION_ITI18 = "urn:ihe:iti:2007:RegistryStoredQuery"
ACTION_ITI18_RESPONSE = "urn:ihe:iti:2007:RegistryStoredQueryResponse"
ACTION_RENDERED = "urn:dicom:wado:ws:2011:RetrieveRenderedImagingDocumentSet"
ACTION_RENDERED_SWAPPED = "urn:dicom:ws:wado:2011:RetrieveRenderedImagingDocumentSet"
ACTION_RENDERED_RESPONSE = "urn:dicom:wado:ws:2011:RetrieveRenderedImagingDocumentSetResponse"
ACTION_RENDERED_SWAPPED_RESPONSE = "urn:dicom:ws:wado:2011:RetrieveRenderedImagingDocumentSetResponse"
ACTION_INFORMATION = "urn:wado:2011:RetrieveImagingDocumentSetInformation"
ACTION_INFORMATION_RESPONSE = "urn:wado:2011:RetrieveImagingDocumentSetInformationResponse"
ACTION_FAULT = "http://www.w3.org/2005/08/addressing/soap/fault"

# -- RegistryResponse status and severity -----------------------------------------------------------
STATUS_SUCCESS = "urn:oasis:names:tc:ebxml-regrep:ResponseStatusType:Success"
STATUS_PARTIAL_SUCCESS = "urn:ihe:iti:2007:ResponseStatusType:PartialSuccess"
STATUS_FAILURE = "urn:oasis:names:tc:ebxml-regrep:ResponseStatusType:Failure"
SEVERITY_ERROR = "urn:oasis:names:tc:ebxml-regrep:ErrorSeverityType:Error"
SEVERITY_WARNING = "urn:oasis:names:tc:ebxml-regrep:ErrorSeverityType:Warning"

# -- IHE error codes (ITI TF-3 Table 4.2.4.1-2) -----------------------------------------------------
XDS_DOCUMENT_UNIQUE_ID_ERROR = "XDSDocumentUniqueIdError"
XDS_UNKNOWN_REPOSITORY_ID = "XDSUnknownRepositoryId"
XDS_REPOSITORY_ERROR = "XDSRepositoryError"
XDS_REPOSITORY_BUSY = "XDSRepositoryBusy"
XDS_REPOSITORY_OUT_OF_RESOURCES = "XDSRepositoryOutOfResources"
XDS_REPOSITORY_METADATA_ERROR = "XDSRepositoryMetadataError"
XDS_MISSING_DOCUMENT = "XDSMissingDocument"
XDS_MISSING_HOME_COMMUNITY_ID = "XDSMissingHomeCommunityId"
XDS_UNKNOWN_COMMUNITY = "XDSUnknownCommunity"
XDS_RESULT_NOT_SINGLE_PATIENT = "XDSResultNotSinglePatient"

# -- DICOM WADO-WS error codes (PS3.18-2019a 6.4.4) -------------------------------------------------
WADO_UNABLE_TO_ANONYMIZE = "urn:dicom:wado:0001"
WADO_ANONYMIZATION_NOT_SUPPORTED = "urn:dicom:wado:0002"
WADO_NOT_IMMEDIATELY_AVAILABLE = "urn:dicom:wado:0003"
WADO_NO_LONGER_AVAILABLE = "urn:dicom:wado:0004"
WADO_SIZE_EXCEEDS_LIMITS = "urn:dicom:wado:0005"
WADO_FORMAT_NOT_SUPPORTED = "urn:dicom:wado:0006"
WADO_CANNOT_PROVIDE_FORMAT = "urn:dicom:wado:0007"
WADO_SINGLE_FRAME_NOT_AVAILABLE = "urn:dicom:wado:0008"
WADO_UID_DOES_NOT_MATCH_SOP_CLASS = "urn:dicom:wado:0009"
WADO_INCONSISTENT_IDENTIFIERS = "urn:dicom:wado:0010"
WADO_SOP_CLASS_NOT_SUPPORTED = "urn:dicom:wado:0011"
WADO_INVALID_PARAMETER = "urn:dicom:wado:0012"
WADO_UNSUPPORTED_PARAMETER = "urn:dicom:wado:0013"
WADO_PROCESSING_FAILURE = "urn:dicom:wado:0014"
WADO_UNKNOWN_STUDY = "urn:dicom:wado:0015"
WADO_UNKNOWN_SERIES = "urn:dicom:wado:0016"
WADO_UNKNOWN_DOCUMENT = "urn:dicom:wado:0017"
WADO_FRAME_OUT_OF_RANGE = "urn:dicom:wado:0018"
WADO_UNKNOWN_PRESENTATION = "urn:dicom:wado:0019"
WADO_UNKNOWN_PRESENTATION_SERIES = "urn:dicom:wado:0020"

# -- MIME types -------------------------------------------------------------------------------------
MIME_DICOM = "application/dicom"
MIME_SOAP12 = "application/soap+xml"
MIME_XOP = "application/xop+xml"
MIME_NATIVE_DICOM = "application/x-dicom.native"

# -- our defaults -----------------------------------------------------------------------------------
# A fixed UUID-derived repositoryUniqueId for tests and benches, which configure it explicitly
# (XDSI_REPOSITORY_UNIQUE_ID / [xds] repository_unique_id).  It is nobody's default: an install
# without one generates its own (xdsi/installation.py, issue 11).
DEFAULT_REPOSITORY_UNIQUE_ID = "2.25.174983427195862233712418339462367446029"

# == XDS.b publishing (ITI-41/42/43/57, ebRIM metadata) ==========================================

NSMAP = {"soap": NS_SOAP12, "wsa": NS_WSA, "xop": NS_XOP, "xds": NS_XDS, "rs": NS_RS, "lcm": NS_LCM, "query": NS_QUERY, "rim": NS_RIM}


def q(prefix: str, local: str) -> str:
    """Clark notation ``{ns}local`` for a prefix of :data:`NSMAP`."""
    return f"{{{NSMAP[prefix]}}}{local}"


# -- ITI-57 Update Document Set (FACTS §3.1) -------------------------------------------------------
ACTION_ITI57 = "urn:ihe:iti:2010:UpdateDocumentSet"  # ITI-57 (Metadata Update option)
ACTION_ITI57_RESPONSE = "urn:ihe:iti:2010:UpdateDocumentSetResponse"

# zeep binding and operation names in the official WSDLs
REPOSITORY_BINDING = f"{{{NS_XDS}}}DocumentRepository_Binding"
REGISTRY_BINDING = f"{{{NS_XDS}}}DocumentRegistry_Binding_Soap12"
OP_PNR = "DocumentRepository_ProvideAndRegisterDocumentSet-b"
OP_RETRIEVE = "DocumentRepository_RetrieveDocumentSet"
OP_REGISTER = "DocumentRegistry_RegisterDocumentSet-b"
OP_STORED_QUERY = "DocumentRegistry_RegistryStoredQuery"

# -- Error codes (ITI TF-3 Table 4.2.4.1-2) ----------------------------------------------------
XDS_REGISTRY_METADATA_ERROR = "XDSRegistryMetadataError"
XDS_REGISTRY_ERROR = "XDSRegistryError"
XDS_UNKNOWN_PATIENT_ID = "XDSUnknownPatientId"
XDS_PATIENT_ID_DOES_NOT_MATCH = "XDSPatientIdDoesNotMatch"
XDS_MISSING_DOCUMENT_METADATA = "XDSMissingDocumentMetadata"
XDS_NON_IDENTICAL_HASH = "XDSNonIdenticalHash"
XDS_NON_IDENTICAL_SIZE = "XDSNonIdenticalSize"
# a SubmissionSet or Folder uniqueId already used in the registry; never for a DocumentEntry, whose re-sent
# uniqueId with the same hash and size is accepted (ITI TF-2 3.42.4.1.3.3.1), else XDSNonIdenticalHash/Size
XDS_DUPLICATE_UNIQUE_ID = "XDSDuplicateUniqueIdInRegistry"
XDS_REGISTRY_DUPLICATE_UNIQUE_ID_IN_MESSAGE = "XDSRegistryDuplicateUniqueIdInMessage"  # one uniqueId twice in a submission
XDS_UNKNOWN_STORED_QUERY = "XDSUnknownStoredQuery"
XDS_STORED_QUERY_MISSING_PARAM = "XDSStoredQueryMissingParam"
# an Association (RPLC ...) whose target DocumentEntry is not Approved (ITI TF-2 3.42.4.1.3.5)
XDS_REGISTRY_DEPRECATED_DOCUMENT_ERROR = "XDSRegistryDeprecatedDocumentError"
# an entryUUID reference (Association source/target) that resolves to nothing (ITI TF-2 3.42.4.1.3.5)
XDS_UNRESOLVED_REFERENCE = "UnresolvedReferenceException"

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

# -- Folder scheme UUIDs (ITI TF-3 4.2.5.3) --------------------------------------------------------
FOLDER_CLASSIFICATION_NODE = "urn:uuid:d9d542f3-6cc4-48b6-8870-ea235fbc94c2"
FOLDER_PATIENT_ID = "urn:uuid:f64ffdf0-4b97-4e06-b79f-a52b38ec2f8a"
FOLDER_UNIQUE_ID = "urn:uuid:75df8f67-9973-4fbe-a900-df66cefecc5a"

# Name of each ExternalIdentifier, as ITI TF-3 4.2.3 wants it written
EXTERNAL_ID_NAMES = {
    DE_PATIENT_ID: "XDSDocumentEntry.patientId",
    DE_UNIQUE_ID: "XDSDocumentEntry.uniqueId",
    SS_PATIENT_ID: "XDSSubmissionSet.patientId",
    SS_SOURCE_ID: "XDSSubmissionSet.sourceId",
    SS_UNIQUE_ID: "XDSSubmissionSet.uniqueId",
    FOLDER_PATIENT_ID: "XDSFolder.patientId",
    FOLDER_UNIQUE_ID: "XDSFolder.uniqueId",
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
FORMAT_CODE_KOS = (str(KeyObjectSelectionDocumentStorage), "1.2.840.10008.2.6.1", "Key Object Selection Document")
MANIFEST_TITLE = codes.DCM.Manifest  # (113030, DCM, "Manifest")
KOS_TEMPLATE_ID = "2010"
DCMR_MAPPING = "DCMR"
MODALITY_CODING_SCHEME = "1.2.840.10008.2.16.4"  # DCM, the scheme of CID 29 acquisition modality codes
SNOMED_CODING_SCHEME = "2.16.840.1.113883.6.96"

# -- Imaging Document Source operations in the WSDLs (xdsi conformance builds its requests by them) --
OP_RAD69 = "ImagingDocumentSource_RetrieveImagingDocumentSet"
OP_RENDERED = "ImagingDocumentSource_RetrieveRenderedImagingDocumentSet"
OP_INFORMATION = "ImagingDocumentSource_RetrieveImagingDocumentSetInformation"
XDS_UNAVAILABLE_COMMUNITY = "XDSUnavailableCommunity"  # ITI TF-3 Table 4.2.4.1-2 (XCA; a retrieve may carry it)
