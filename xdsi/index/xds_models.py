"""Index tables for XDS-I.b publishing: the submission outbox and the registered manifest of each study.

Every submission is a row here before anything is sent, so a crash, a restart
or a registry that is down never loses one; a row is ``done`` only after the
registry answered Success.  Study rows are not foreign keys: a study whose
instances are all deleted disappears from ``study`` while its manifest must
still be deprecated at the registry.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, DateTime, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from xdsi.index.models import UID, Base

# XdsSubmission.state values
PENDING = "pending"  # waiting for its next attempt (next_attempt_at)
SENDING = "sending"  # claimed by one process until lease_until
DONE = "done"  # the registry answered Success
SUPERSEDED = "superseded"  # replaced by a newer submission for the same study before it was sent
GAVE_UP = "gave_up"  # max_attempts reached; `xdsi publish` or a config fix re-queues it

# XdsSubmission.kind values
KIND_PUBLISH = "publish"  # a new manifest (RPLC of the registered one, if any, is decided at send time)
KIND_DEPRECATE = "deprecate"  # every instance is gone: deprecate the registered manifest (ITI-57)


class XdsSubmission(Base):
    """One XDS submission (ITI-41, ITI-42 or ITI-57) and its delivery state."""

    __tablename__ = "xds_submission"
    __table_args__ = (
        Index("ix_xds_submission_state_next", "state", "next_attempt_at"),
        Index("ix_xds_submission_study_created", "study_uid", "created_at"),
    )

    pk: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_uid: Mapped[str] = mapped_column(UID)
    kind: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16), default=PENDING)
    # the document this submission registers (publish) or deprecates (deprecate)
    kos_sop_uid: Mapped[str] = mapped_column(UID, index=True)
    kos_series_uid: Mapped[str] = mapped_column(UID, default="")
    entry_uuid: Mapped[str] = mapped_column(String(64))
    submission_set_uid: Mapped[str] = mapped_column(UID, unique=True)
    kos_path: Mapped[str] = mapped_column(String(1024), default="")
    kos_size: Mapped[int] = mapped_column(BigInteger, default=0)
    kos_sha1: Mapped[str] = mapped_column(String(40), default="")
    # sha1 of the sorted SOP Instance UIDs the manifest references: what "the study changed" compares
    fingerprint: Mapped[str] = mapped_column(String(40), default="")
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    replaces_entry_uuid: Mapped[str] = mapped_column(String(64), default="")  # set when sent
    transaction: Mapped[str] = mapped_column(String(16), default="")  # ITI-41 / ITI-42 / ITI-57, set when sent
    endpoint: Mapped[str] = mapped_column(String(1024), default="")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    lease_owner: Mapped[str] = mapped_column(String(128), default="")
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    last_status: Mapped[str] = mapped_column(String(128), default="")  # registry status URI or transport error class
    last_error: Mapped[str] = mapped_column(Text, default="")  # the registry's own error text
    last_response: Mapped[str] = mapped_column(Text, default="")  # RegistryResponse XML as received
    last_metadata: Mapped[str] = mapped_column(Text, default="")  # SubmitObjectsRequest XML as last sent
    # the study as the manifest saw it (JSON): the metadata is rebuilt from it at every attempt, by any process
    snapshot: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    done_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class XdsManifest(Base):
    """The manifest of a study as the registry knows it: written only on a Success answer."""

    __tablename__ = "xds_manifest"

    pk: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_uid: Mapped[str] = mapped_column(UID, unique=True)
    kos_sop_uid: Mapped[str] = mapped_column(UID)
    entry_uuid: Mapped[str] = mapped_column(String(64))
    fingerprint: Mapped[str] = mapped_column(String(40), default="")
    status: Mapped[str] = mapped_column(String(16), default="approved")  # approved | deprecated
    submission_fk: Mapped[int] = mapped_column(Integer)
    registered_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
