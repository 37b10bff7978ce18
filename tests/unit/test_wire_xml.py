"""The one hardened XML parser (xdsi.wire.xml): no entities, no network, no DTD, no huge trees, no DOCTYPE."""

from __future__ import annotations

import threading

import pytest
from lxml import etree

from xdsi.wire.xml import DoctypeRefused, NotWellFormed, UntrustedXml, make_parser, parse_untrusted

XXE = b'<?xml version="1.0"?><!DOCTYPE a [<!ENTITY e SYSTEM "file:///etc/hostname">]><a>&e;</a>'
LAUGHS = b'<!DOCTYPE a [<!ENTITY l "lol"><!ENTITY l2 "&l;&l;&l;&l;&l;&l;&l;&l;&l;&l;"><!ENTITY l3 "&l2;&l2;&l2;&l2;&l2;&l2;&l2;&l2;&l2;&l2;">]><a>&l3;</a>'


def test_make_parser_does_not_resolve_entities() -> None:
    for doc in (XXE, LAUGHS):
        root = etree.fromstring(doc, make_parser())
        assert not (root.text or "").strip() and b"lol" not in etree.tostring(root)


def test_make_parser_refuses_huge_trees() -> None:
    with pytest.raises(etree.XMLSyntaxError):
        etree.fromstring(b"<a>" * 300 + b"</a>" * 300, make_parser())


@pytest.mark.parametrize("option", [{"resolve_entities": True}, {"no_network": False}, {"load_dtd": True}, {"huge_tree": True}, {"dtd_validation": True}, {"attribute_defaults": True}])
def test_make_parser_cannot_be_weakened(option: dict[str, bool]) -> None:
    with pytest.raises(ValueError, match="weaken"):
        make_parser(**option)


def test_make_parser_takes_harmless_overrides() -> None:
    root = etree.fromstring(b"<a><!-- c --><b/></a>", make_parser(remove_comments=True))
    assert etree.tostring(root) == b"<a><b/></a>"
    assert etree.tostring(etree.fromstring(b"<a><!-- c --></a>", make_parser())) == b"<a><!-- c --></a>"


@pytest.mark.parametrize("doc", [XXE, LAUGHS, b'<!DOCTYPE a SYSTEM "http://example.invalid/a.dtd"><a/>', b"<!DOCTYPE a><a/>"])
def test_parse_untrusted_refuses_any_doctype(doc: bytes) -> None:
    with pytest.raises(DoctypeRefused):
        parse_untrusted(doc)


@pytest.mark.parametrize("doc", [b"", b"<a>", b"not xml", b"<a></b>", b"<a>" * 300 + b"</a>" * 300])
def test_parse_untrusted_not_well_formed(doc: bytes) -> None:
    with pytest.raises(NotWellFormed) as exc:
        parse_untrusted(doc)
    assert isinstance(exc.value, UntrustedXml) and isinstance(exc.value, ValueError)


def test_parse_untrusted_options_and_threads() -> None:
    assert etree.tostring(parse_untrusted(b"<a><!--c--><b/></a>", remove_comments=True)) == b"<a><b/></a>"
    assert etree.tostring(parse_untrusted(b"<a><!--c--></a>")) == b"<a><!--c--></a>"
    results: list[bytes] = []

    def work() -> None:
        for i in range(200):
            results.append(parse_untrusted(f"<n>{i}</n>".encode()).text.encode())

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == sorted(str(i).encode() for i in range(200) for _ in range(4))
