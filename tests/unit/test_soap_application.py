"""The SOAP endpoints are spyne applications whose services declare every operation the official WSDL has.

Not a transport test (tests/conformance and tests/integration/test_soap_transport.py
drive them with zeep over HTTP): this pins the composition, so that a refactoring
cannot quietly swap the spyne application for hand-made dispatch again.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Iterator

import pytest
from lxml import etree

import xdsi.soap  # noqa: F401 -- spyne importable on 3.12+ before "import spyne"
from spyne import Application, ServiceBase
from spyne.server.wsgi import WsgiApplication

from tests.conftest import make_settings
from xdsi.app import IDS_PATH, REPOSITORY_PATH, make_app
from xdsi.archive import Archive
from xdsi.soap.validation import WSDL_DIR
from xdsi.wire.xml import make_parser

WSDL = "{http://schemas.xmlsoap.org/wsdl/}"
STANDARD_WSDL = Path(__file__).resolve().parents[2] / "xdsi" / "standards" / "ihe" / "wsdl"


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Archive]:
    settings = make_settings(tmp_path_factory.mktemp("soapapp"))
    settings = dataclasses.replace(settings, xds=dataclasses.replace(settings.xds, mode="integrated"))
    a = Archive.open(settings)
    try:
        yield a
    finally:
        a.close()


def _mounted(archive: Archive) -> dict[str, Any]:
    """What the composed HTTP application mounts at each prefix, under its body-limit wrapper."""
    dispatcher = make_app(archive, {}).__wrapped__  # safe_headers -> access check (xdsi.web.auth) -> DispatcherMiddleware
    while not hasattr(dispatcher, "mounts"):
        dispatcher = dispatcher.__wrapped__
    return {path: getattr(app, "__wrapped__", app) for path, app in dispatcher.mounts.items()}


def _wsdl_operations(path: Path) -> set[str]:
    root = etree.parse(str(path), make_parser()).getroot()
    return {op.get("name") for op in root.iter(f"{WSDL}portType") for op in op.iter(f"{WSDL}operation")}


def _declared(app: WsgiApplication) -> set[str]:
    assert isinstance(app.app, Application)
    services = app.app.services
    assert services and all(issubclass(s, ServiceBase) for s in services)
    return {m.operation_name for s in services for m in s.public_methods.values()}


def test_imaging_document_source_is_a_spyne_application_with_every_wsdl_operation(archive: Archive) -> None:
    mounted = _mounted(archive)[IDS_PATH]
    assert isinstance(mounted, WsgiApplication)
    expected = _wsdl_operations(WSDL_DIR / "ImagingDocumentSource.wsdl")
    assert expected == {
        "ImagingDocumentSource_RetrieveImagingDocumentSet",
        "ImagingDocumentSource_RetrieveRenderedImagingDocumentSet",
        "ImagingDocumentSource_RetrieveImagingDocumentSetInformation",
    }
    assert _declared(mounted) == expected


def test_document_repository_is_a_spyne_application_declaring_iti43(archive: Archive) -> None:
    mounted = _mounted(archive)[REPOSITORY_PATH]
    assert isinstance(mounted, WsgiApplication)
    wsdl_ops = _wsdl_operations(STANDARD_WSDL / "XDS.b_DocumentRepository.wsdl")
    # the repository of our own manifests retrieves (ITI-43); it accepts no ITI-41 from other sources
    assert _declared(mounted) == {"DocumentRepository_RetrieveDocumentSet"} and _declared(mounted) <= wsdl_ops


def test_every_routed_action_reaches_a_declared_method(archive: Archive) -> None:
    for path in (IDS_PATH, REPOSITORY_PATH):
        app = _mounted(archive)[path]
        protocol = app.app.in_protocol
        keys = app.app.interface.service_method_map
        for action, route in protocol.routes.items():
            assert protocol.method_key(route.method) in keys, (path, action)
