"""SOAP 1.2 adapter for the IHE web services.

Reusable pieces (the XDS publishing side uses them too): :mod:`envelope` (hardened parsing, WS-Addressing
headers, faults, wsse:Security logging), :mod:`validation` (lxml validation against the served schemas),
:mod:`endpoint` (the WSGI endpoint: dispatch on wsa:Action, ?wsdl/?xsd serving), :mod:`ebrs`
(RegistryResponse).  MTOM/XOP in and out is :mod:`xdsi.wire.mtom`, below this package.  The Imaging
Document Source itself is :mod:`ids` and :mod:`wado`; the consumer is :mod:`client`.

spyne is not used: what it would contribute here (SOAP 1.2 envelopes and body mapping) is a few lines of
lxml, while the parts that matter for IHE peers are unusable in spyne 2.14 (its lxml validator rejects
valid IHE requests, MTOM output raises TypeError on Python 3, MTOM input fails on a root part with an XML
declaration and needs ~17x the payload in memory, no wsa:Action dispatch or WS-A reply headers, and its
generated WSDL has no operations for zeep).
"""
