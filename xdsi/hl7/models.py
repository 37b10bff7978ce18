"""The order store: one row per radiology order received from the RIS (ORM^O01, OMI^O23).

Why a table of its own and not columns on ``study``: the order arrives *before* the
images (that is what prefetch and routing need it for), and a study's images may
arrive under an accession number the index has never seen.  Rows are keyed by
(Patient ID, Accession Number) as the RIS sent them; routing looks them up by the
same pair from the instance (:func:`xdsi.hl7.orders.order_attributes`).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import DateTime, Integer, String, Text, UniqueConstraint
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


# Hl7PrefetchJob.state values
JOB_PENDING = "pending"  # recorded with the message, before its ACK
JOB_RUNNING = "running"  # claimed by one process's prefetch worker (retaken when started_at is older than JOB_LEASE)
JOB_DONE = "done"
JOB_FAILED = "failed"  # some instance could not be recalled or pushed; `error` says which and why


class Hl7PrefetchJob(Base):
    """One ``[[prefetch]]`` rule to run for one message: recorded before the ACK, so a restart does not forget it.

    Why rows and not an in-memory queue: the RIS was told ``AA``; the priors it expects in the
    cache must come even if ``xdsi serve`` restarts in between, and ``xdsi status`` (another
    process) shows what is waiting and what failed.
    """

    __tablename__ = "hl7_prefetch_job"

    pk: Mapped[int] = mapped_column(Integer, primary_key=True)
    rule: Mapped[str] = mapped_column(Text, default="")  # [[prefetch]] name
    patient_id: Mapped[str] = mapped_column(Text, default="")
    issuer_of_patient_id: Mapped[str] = mapped_column(Text, default="")
    modality: Mapped[str] = mapped_column(Text, default="")  # the order's (same_modality)
    accession_number: Mapped[str] = mapped_column(Text, default="")  # the order's own study is no prior
    message_type: Mapped[str] = mapped_column(Text, default="")
    message_control_id: Mapped[str] = mapped_column(Text, default="")
    state: Mapped[str] = mapped_column(String(16), default=JOB_PENDING, index=True)
    studies: Mapped[int] = mapped_column(Integer, default=0)  # priors selected
    recalled: Mapped[int] = mapped_column(Integer, default=0)  # instances copied to the first tier
    pushed: Mapped[int] = mapped_column(Integer, default=0)  # instances the push_to peer acknowledged
    error: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
