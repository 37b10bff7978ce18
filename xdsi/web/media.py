"""Media types, transfer syntaxes and STOW-RS reason codes of PS3.18, named once for the web adapters."""

from __future__ import annotations

from pydicom.uid import ExplicitVRLittleEndian

DICOM = "application/dicom"
DICOM_JSON = "application/dicom+json"
DICOM_XML = "application/dicom+xml"
JSON = "application/json"
OCTET_STREAM = "application/octet-stream"
MULTIPART_RELATED = "multipart/related"

# PS3.18 8.7.3 default transfer syntax for application/dicom and uncompressed bulk data
DEFAULT_TRANSFER_SYNTAX = str(ExplicitVRLittleEndian)

# PS3.18 Table 10.5.3-1 / PS3.4 B.2.3: STOW-RS Failure Reason (0008,1197) values
FAILURE_PROCESSING = 0x0110
FAILURE_SOP_CLASS_NOT_SUPPORTED = 0x0122
FAILURE_OUT_OF_RESOURCES = 0xA700
FAILURE_DATASET_DOES_NOT_MATCH = 0xA900  # also: Study Instance UID differs from the target study
FAILURE_CANNOT_UNDERSTAND = 0xC000
FAILURE_TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122

# DICOM JSON tags used in responses
TAG_RETRIEVE_URL = "00081190"
TAG_FAILED_SOP_SEQUENCE = "00081198"
TAG_REFERENCED_SOP_SEQUENCE = "00081199"
TAG_FAILURE_REASON = "00081197"
TAG_WARNING_REASON = "00081196"
TAG_REFERENCED_SOP_CLASS = "00081150"
TAG_REFERENCED_SOP_INSTANCE = "00081155"
