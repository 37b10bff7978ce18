"""Constants of IHE XDS.b / XDS-I.b and DICOM WADO-WS: namespaces, actions, statuses, error codes.

One place for every string that reaches the wire, so the SOAP adapter, the
Imaging Document Source service and the XDS publishing side agree on them.
Sources: ``/work/shared/standards/FACTS.md`` sections 1-2 (ITI TF-2/3, RAD TF-3
as quoted by Gazelle and NIST, PS3.18-2019a section 6.4).
"""

from __future__ import annotations

# -- namespaces -------------------------------------------------------------------------------------
NS_SOAP12 = "http://www.w3.org/2003/05/soap-envelope"
NS_SOAP11 = "http://schemas.xmlsoap.org/soap/envelope/"
NS_WSA = "http://www.w3.org/2005/08/addressing"
NS_XOP = "http://www.w3.org/2004/08/xop/include"
NS_WSSE = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-secext-1.0.xsd"
NS_SAML2 = "urn:oasis:names:tc:SAML:2.0:assertion"
NS_IHE = "urn:ihe:iti:xds-b:2007"
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
# The repositoryUniqueId an unconfigured install answers to: a fixed UUID-derived OID so that
# tests and first runs agree.  A deployment sets its own in ``[xds] repository_unique_id``.
DEFAULT_REPOSITORY_UNIQUE_ID = "2.25.174983427195862233712418339462367446029"
