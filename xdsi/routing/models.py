"""Index tables of the routing queue: one row per (destination, instance) and the evaluation cursor.

Every forward is a row before anything is sent, like the XDS outbox
(:mod:`xdsi.index.xds_models`), so a destination that is down, a crash or a
restart never loses one.  The unique (destination, SOP Instance UID) pair is
what makes an instance go to a destination once: evaluating the rules again
(the sweep after a restart) finds the row and adds nothing.  Rows are not
foreign keys to ``instance``: a forward already sent stays on record after the
instance is deleted.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import DateTime, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from xdsi.index.models import UID, Base

# RouteForward.state values
PENDING = "pending"  # waiting for next_attempt_at (first attempt, retry after a failure, or the stability window)
SENDING = "sending"  # claimed by one process until lease_until
SENT = "sent"  # the destination answered Success or Warning (C-STORE) / listed it as stored (STOW-RS)
GAVE_UP = "gave_up"  # [routing] max_attempts reached; `xdsi route` queues it again

OPEN_STATES = (PENDING, SENDING)


class RouteForward(Base):
    """One instance to be sent (or sent) to one destination: a [peers] AE title or a STOW-RS URL."""

    __tablename__ = "route_forward"
    __table_args__ = (
        UniqueConstraint("destination", "sop_instance_uid", name="uq_route_forward_destination_sop"),
        Index("ix_route_forward_state_next", "state", "next_attempt_at"),
        Index("ix_route_forward_study_uid", "study_uid"),
    )

    pk: Mapped[int] = mapped_column(Integer, primary_key=True)
    destination: Mapped[str] = mapped_column(String(1024))
    sop_instance_uid: Mapped[str] = mapped_column(UID)
    study_uid: Mapped[str] = mapped_column(UID)
    # the stored copy's checksum when queued: a replaced instance (other bytes) is queued again, the same bytes never
    sha256: Mapped[str] = mapped_column(String(64), default="")
    route: Mapped[str] = mapped_column(String(128))  # the [[routes]] name, or "manual" (`xdsi route`)
    transfer_syntax: Mapped[str] = mapped_column(String(64), default="")  # "": as stored
    priority: Mapped[int] = mapped_column(Integer, default=0)  # higher first; also the C-STORE Priority
    delay: Mapped[int] = mapped_column(Integer, default=0)  # seconds the study must be unchanged before sending
    state: Mapped[str] = mapped_column(String(16), default=PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    lease_owner: Mapped[str] = mapped_column(String(128), default="")
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    last_error: Mapped[str] = mapped_column(Text, default="")  # the destination's own answer, or the transport error
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class RouteCursor(Base):
    """How far the rules have been evaluated: instances with a larger ``instance.pk`` are still to be looked at.

    One row (name ``"instances"``), created by migration ``0006_routing_queue`` at the
    newest instance then held: routes apply to what arrives from then on (a new index:
    from its first instance), and ``xdsi route`` sends older studies by hand.
    """

    __tablename__ = "route_cursor"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    instance_pk: Mapped[int] = mapped_column(Integer, default=0)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
