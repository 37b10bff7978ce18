"""The SOAP adapter: the IHE web services as spyne applications.

The Imaging Document Source (RAD-69, WADO-WS rendered and Information) and
the ITI-43 repository are spyne ``Application`` s of ``ServiceBase`` classes
(:mod:`ids`, :mod:`repository`) over typed ``ComplexModel`` requests and
responses (:mod:`models`), served by :class:`~xdsi.soap.application.SoapApplication`,
a thin ``spyne.server.wsgi.WsgiApplication``.  Where spyne 2.14 is weak, xdsi's
own parts plug into its extension points (measured limits: its lxml validator
rejects valid IHE requests, its MTOM output raises TypeError on Python 3, its
MTOM input needs ~17x the payload in memory and fails on a root part with an
XML declaration, it has no WS-Addressing, it answers Sender faults with HTTP
500, and its generated WSDL is not the IHE one):

* :class:`~xdsi.soap.protocol.IheSoap12`, a ``Soap12`` subclass: dispatch on
  ``wsa:Action``, WS-A reply headers, validation against the official schemas,
  SOAP 1.2 faults with subcodes and the binding's HTTP status, XOP out;
* :class:`~xdsi.soap.application.SoapApplication`: the request body read and
  spooled by the streaming MTOM reader before spyne sees the envelope, the
  response streamed part by part, the official WSDL and schemas at ``?wsdl``.

Importing this package first makes spyne 2.14.0 importable on Python 3.12+
(:mod:`xdsi.soap.spyne_compat`).
"""

import logging

from xdsi.soap import spyne_compat as _spyne_compat  # noqa: F401 -- before any "import spyne"

# spyne narrates its start-up at INFO ("Initializing application ..."); an operator needs its warnings only,
# and a start-up failure must stay one line on stderr
logging.getLogger("spyne").setLevel(logging.WARNING)
