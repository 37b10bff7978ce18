"""The order store: one row per radiology order received from the RIS (ORM^O01, OMI^O23).

Why a table of its own and not columns on ``study``: the order arrives *before* the
images (that is what prefetch and routing need it for), and a study's images may
arrive under an accession number the index has never seen.  Rows are keyed by
(Patient ID, Accession Number) as the RIS sent them; routing looks them up by the
same pair from the instance (:func:`xdsi.hl7.orders.order_attributes`).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import DateTime, Integer, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from xdsi.index.models import Base


class Hl7Order(Base):
    __tablename__ = "hl7_order"
    __table_args__ = (UniqueConstraint("patient_id", "accession_number", name="uq_hl7_order_patient_id_accession_number"),)

    pk: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_id: Mapped[str] = mapped_column(Text, default="")  # PID-3 ID (first repetition)
    issuer_of_patient_id: Mapped[str] = mapped_column(Text, default="")  # PID-3.4 namespace ID
    accession_number: Mapped[str] = mapped_column(Text, default="", index=True)  # IPC-1 (OMI) / OBR-18 (ORM)
    placer_order_number: Mapped[str] = mapped_column(Text, default="")  # ORC-2
    filler_order_number: Mapped[str] = mapped_column(Text, default="")  # ORC-3
    order_control: Mapped[str] = mapped_column(Text, default="")  # ORC-1: NW, XO, CA, DC, ...
    order_status: Mapped[str] = mapped_column(Text, default="")  # ORC-5
    message_type: Mapped[str] = mapped_column(Text, default="")  # "ORM^O01", "OMI^O23"
    procedure_code: Mapped[str] = mapped_column(Text, default="")  # OBR-4.1 universal service identifier
    procedure_text: Mapped[str] = mapped_column(Text, default="")  # OBR-4.2
    modality: Mapped[str] = mapped_column(Text, default="")  # IPC-5 (OMI) / OBR-24 (ORM)
    patient_location: Mapped[str] = mapped_column(Text, default="")  # PV1-3 as sent (point^room^bed^facility)
    ordering_physician: Mapped[str] = mapped_column(Text, default="")  # ORC-12, else OBR-16 (XCN as sent)
    referring_physician: Mapped[str] = mapped_column(Text, default="")  # PV1-8
    scheduled_at: Mapped[str] = mapped_column(Text, default="")  # TQ1-7 / OBR-27.4 / ORC-7.4 (DTM as sent)
    message_control_id: Mapped[str] = mapped_column(Text, default="")  # MSH-10 of the last message for this order
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
