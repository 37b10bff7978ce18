"""The HIS/RIS interface (issue 15 item 4): HL7 v2 over MLLP.

* :mod:`xdsi.hl7.listener` — the MLLP listener (python-hl7's asyncio MLLP streams), ACK/NAK;
* :mod:`xdsi.hl7.messages` — reading fields of a parsed message, building ACKs with ERR;
* :mod:`xdsi.hl7.orders` — the order store (ORM^O01 / OMI^O23) and :func:`~xdsi.hl7.orders.order_attributes`,
  which routing rules call for patient location and ordering physician;
* :mod:`xdsi.hl7.patients` — RAD-12 Patient Update: ADT^A08 demographics, ADT^A40 merge, manifest replacement;
* :mod:`xdsi.hl7.prefetch` — ``[[prefetch]]`` rules: priors recalled from slow tiers to the cache.

Nothing here is imported by the index models but :mod:`xdsi.hl7.models` (the order table).
"""
