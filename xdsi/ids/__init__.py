"""Imaging Document Source service (XDS-I.b RAD-69, DICOM WADO-WS): the rules, testable without HTTP."""

from xdsi.ids.model import DocumentRequest, RetrieveResult, ReturnedDocument
from xdsi.ids.service import ImagingDocumentSource

__all__ = ["DocumentRequest", "RetrieveResult", "ReturnedDocument", "ImagingDocumentSource"]
