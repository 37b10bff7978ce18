"""SOAP 1.2 adapter: envelopes and WS-Addressing (envelope), MTOM/XOP (mtom), schema validation
(validation), the generic endpoint (endpoint), ebRS responses (ebrs) and the Imaging Document Source
service (ids, wado).  Reusable pieces for other IHE services: envelope, mtom, validation, endpoint, ebrs."""
