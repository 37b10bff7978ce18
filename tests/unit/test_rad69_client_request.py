"""The RAD-69 request ``xdsi retrieve`` sends carries IHE's WS-Addressing, not zeep's (ITI TF-2 V.3.2.2)."""

from __future__ import annotations

from lxml import etree

from xdsi.soap.client import build_request
from xdsi.standards.constants import ACTION_RAD69, NS_SOAP12, NS_WSA, WSA_ANONYMOUS
from xdsi.wire.xml import make_parser

WSA = f"{{{NS_WSA}}}"


def test_rad69_request_has_ihe_addressing_to_the_target_url() -> None:
    url = "http://127.0.0.1:9/xdsi/ImagingDocumentSource"
    env = etree.fromstring(build_request(url, "1.2.3", {"1.2.3.4": ["1.2.3.4.5"]}, "1.3.6.1.4.1.21367.13.80.110"), make_parser())
    header = env.find(f"{{{NS_SOAP12}}}Header")
    tags = [etree.QName(h).localname for h in header if etree.QName(h).namespace == NS_WSA]
    assert sorted(tags) == ["Action", "MessageID", "ReplyTo", "To"]  # each once
    action = header.find(WSA + "Action")
    assert action.text == ACTION_RAD69 and action.get(f"{{{NS_SOAP12}}}mustUnderstand") in ("1", "true")  # IHE-WSA101
    assert header.findtext(f"{WSA}ReplyTo/{WSA}Address") == WSA_ANONYMOUS  # IHE-WSA102
    assert header.findtext(WSA + "To") == url  # the target, not the WSDL's soap:address
    assert header.findtext(WSA + "MessageID").startswith("urn:uuid:")
