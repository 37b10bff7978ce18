"""Imaging Document Source service (XDS-I.b RAD-69, DICOM WADO-WS): the rules, testable without HTTP."""

from xdsi.ids.model import DocumentRequest, RegistryError, RetrieveResult, ReturnedDocument, response_status
from xdsi.ids.service import ImagingDocumentSource

__all__ = ["DocumentRequest", "RegistryError", "RetrieveResult", "ReturnedDocument", "response_status", "ImagingDocumentSource"]
