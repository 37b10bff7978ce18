"""The order store: ORM^O01 / OMI^O23 orders recorded for routing and prefetch.

Where each value comes from (IHE RAD-2/RAD-4, HL7 v2.3.1 ORM and v2.5.1 OMI):

==================  ======================================  =====================
value               ORM^O01                                 OMI^O23
==================  ======================================  =====================
accession number    OBR-18 (Placer Field 1), else OBR-3.1   IPC-1, else OBR-18
modality            OBR-24 (Diagnostic Serv Sect ID)        IPC-5, else OBR-24
ordering physician  ORC-12, else OBR-16                     ORC-12, else OBR-16
patient location    PV1-3                                   PV1-3
scheduled time      OBR-27.4 / ORC-7.4                      TQ1-7, else OBR-27.4
==================  ======================================  =====================

:func:`order_attributes` is what the routing rules' extension point
(``xdsi.routing.conditions``) calls to match on HL7 data.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from xdsi.hl7.messages import REQUIRED_FIELD_MISSING, Hl7Error, Received
from xdsi.hl7.models import Hl7Order

__all__ = ["ORDER_ATTRIBUTES", "OrderFacts", "order_facts", "record_order", "order_attributes"]

#: the keys :func:`order_attributes` answers with
ORDER_ATTRIBUTES = (
    "patient_location", "ordering_physician", "referring_physician", "procedure_code", "procedure_text",
    "modality", "order_control", "order_status", "placer_order_number", "filler_order_number", "scheduled_at",
)


class OrderFacts(dict):  # type: ignore[type-arg]
    """The values of one order as read from a message (keys: the :class:`Hl7Order` columns)."""


def _patient(r: Received) -> tuple[str, str]:
    pid, issuer = r.get("PID", 3, 1), r.get("PID", 3, 4)
    if not pid:
        raise Hl7Error("AE", REQUIRED_FIELD_MISSING, "PID-3 (patient identifier) is empty", "PID^1^3")
    return pid, issuer


def order_facts(r: Received) -> OrderFacts:
    """What an ORM^O01 / OMI^O23 says about its (first) order; :class:`Hl7Error` when it names no patient or order."""
    if not r.has("ORC") or not r.has("OBR"):
        raise Hl7Error("AE", REQUIRED_FIELD_MISSING, f"{r.message_type} without an ORC and an OBR segment", "ORC^1")
    pid, issuer = _patient(r)
    omi = r.message_type.startswith("OMI")
    accession = (r.get("IPC", 1) if omi else "") or r.get("OBR", 18) or r.get("OBR", 3)
    if not accession:
        where = "IPC^1^1" if omi else "OBR^1^18"
        raise Hl7Error("AE", REQUIRED_FIELD_MISSING, "the order has no accession number (IPC-1 / OBR-18 / OBR-3)", where)
    modality = (r.get("IPC", 5) if omi else "") or r.get("OBR", 24)
    return OrderFacts(
        patient_id=pid,
        issuer_of_patient_id=issuer,
        accession_number=accession,
        placer_order_number=r.get("ORC", 2) or r.get("OBR", 2),
        filler_order_number=r.get("ORC", 3) or r.get("OBR", 3),
        order_control=r.get("ORC", 1),
        order_status=r.get("ORC", 5),
        message_type=r.message_type,
        procedure_code=r.get("OBR", 4, 1),
        procedure_text=r.get("OBR", 4, 2),
        modality=modality.upper(),
        patient_location=r.raw("PV1", 3),
        ordering_physician=r.raw("ORC", 12) or r.raw("OBR", 16),
        referring_physician=r.raw("PV1", 8),
        scheduled_at=r.get("TQ1", 7) or r.get("OBR", 27, 4) or r.get("ORC", 7, 4),
        message_control_id=r.control_id,
    )


def record_order(session: Session, facts: OrderFacts, now: datetime | None = None) -> Hl7Order:
    """Insert or update the order (same Patient ID and accession number: the RIS changed or cancelled it)."""
    now = now or datetime.now(timezone.utc)
    row = session.scalars(
        select(Hl7Order).where(Hl7Order.patient_id == facts["patient_id"], Hl7Order.accession_number == facts["accession_number"])
    ).one_or_none()
    if row is None:
        row = Hl7Order(received_at=now, **facts)
        session.add(row)
    else:
        for key, value in facts.items():
            # an update that leaves a field empty keeps what an earlier message said (HL7: empty = not sent)
            if value or key in ("order_control", "order_status"):
                setattr(row, key, value)
    row.updated_at = now
    session.flush()
    return row


def order_attributes(session: Session, accession_number: str, patient_id: str) -> dict[str, Any]:
    """The HL7 order data for an instance's (Accession Number, Patient ID): {} when no order is known.

    Routing conditions ``patient_location`` and ``ordering_physician`` (and the other
    :data:`ORDER_ATTRIBUTES`) are matched against these values, as sent by the RIS
    (an XCN or PL with its ``^`` components).  An empty accession number matches no order:
    a guess across a patient's orders could route images to the wrong ward.
    """
    accession_number, patient_id = (accession_number or "").strip(), (patient_id or "").strip()
    if not accession_number:
        return {}
    row = session.scalars(
        select(Hl7Order).where(Hl7Order.accession_number == accession_number, Hl7Order.patient_id == patient_id)
    ).one_or_none()
    if row is None:
        return {}
    return {key: getattr(row, key) for key in ORDER_ATTRIBUTES}
