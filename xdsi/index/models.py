"""The relational index: what the archive holds and where each copy lives.

The index never holds pixel data.  Every attribute that C-FIND, QIDO-RS and
the XDS metadata need is a column, so queries never open a file.  One row per
stored copy (``FileCopy``) records the tier, relative path, size and checksum,
which is how migration, recall and verification find the bytes.

Schema changes go through Alembic migrations in ``xdsi/index/migrations``;
``Base.metadata`` is the target those migrations are checked against.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# Stable constraint names so Alembic migrations are identical on SQLite and PostgreSQL.
NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


UID = String(64)  # validated before it reaches the index (xdsi.uids)

# Every other column holding a DICOM value is Text: a value is stored whole, never cut
# to a VR's maximum (SQLite would keep it anyway, PostgreSQL's VARCHAR(n) would refuse
# the whole instance).  DA and TM columns hold the normalised form (header.normalize_da
# and normalize_tm); the stored file keeps the bytes it was received with.


class Patient(Base):
    """A patient as identified by (Patient ID, Issuer of Patient ID).

    A study received without a Patient ID identifies nobody: it gets a patient row of
    its own, keyed by ``scope_study_uid`` (that study's UID), so two such studies are
    never merged into one person.  ``scope_study_uid`` is ``""`` for every patient that
    has a Patient ID.  A plain three-column unique constraint (no partial index) lets
    ``INSERT ... ON CONFLICT DO NOTHING`` arbitrate concurrent stores on both backends.

    The name, birth date and sex here are those of the first instance received for this
    identity; what each study was received with is kept on the study (``Study.patient_*``)
    and is what study, series and image level queries answer.
    """

    __tablename__ = "patient"
    __table_args__ = (
        UniqueConstraint("patient_id", "issuer_of_patient_id", "scope_study_uid", name="uq_patient_identity"),
        # text_pattern_ops: PostgreSQL answers a prefix wildcard (LIKE 'SMI%') from this index whatever the
        # database collation; SQLite ignores the option
        Index("ix_patient_patient_name_norm", "patient_name_norm", postgresql_ops={"patient_name_norm": "text_pattern_ops"}),
    )

    pk: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_id: Mapped[str] = mapped_column(Text, default="")
    issuer_of_patient_id: Mapped[str] = mapped_column(Text, default="")
    scope_study_uid: Mapped[str] = mapped_column(UID, default="", server_default="")
    patient_name: Mapped[str] = mapped_column(Text, default="", index=True)
    # upper-cased copy of the name for case-insensitive matching on every backend
    patient_name_norm: Mapped[str] = mapped_column(Text, default="")
    birth_date: Mapped[str] = mapped_column(Text, default="")
    sex: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    studies: Mapped[list["Study"]] = relationship(back_populates="patient")


class Study(Base):
    __tablename__ = "study"
    __table_args__ = (
        Index("ix_study_date_time", "study_date", "study_time"),
        Index("ix_study_patient_date", "patient_fk", "study_date"),
        Index("ix_study_patient_name_norm", "patient_name_norm", postgresql_ops={"patient_name_norm": "text_pattern_ops"}),
    )

    pk: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_fk: Mapped[int] = mapped_column(ForeignKey("patient.pk"), index=True)
    study_uid: Mapped[str] = mapped_column(UID, unique=True)
    # the patient attributes this study was received with (its first instance): the
    # study's own, answered at study/series/image level even if another study of the
    # same Patient ID arrived with a different name
    patient_name: Mapped[str] = mapped_column(Text, default="", server_default="")
    patient_name_norm: Mapped[str] = mapped_column(Text, default="", server_default="")
    patient_birth_date: Mapped[str] = mapped_column(Text, default="", server_default="")
    patient_sex: Mapped[str] = mapped_column(Text, default="", server_default="")
    study_date: Mapped[str] = mapped_column(Text, default="")
    study_time: Mapped[str] = mapped_column(Text, default="")
    accession_number: Mapped[str] = mapped_column(Text, default="", index=True)
    accession_issuer: Mapped[str] = mapped_column(Text, default="")
    study_id: Mapped[str] = mapped_column(Text, default="")
    study_description: Mapped[str] = mapped_column(Text, default="")
    referring_physician: Mapped[str] = mapped_column(Text, default="")
    procedure_code_value: Mapped[str] = mapped_column(Text, default="")
    procedure_code_scheme: Mapped[str] = mapped_column(Text, default="")
    procedure_code_meaning: Mapped[str] = mapped_column(Text, default="")
    # backslash-joined distinct series modalities, kept in step by the store service
    modalities: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # last time an instance was added or removed: the "stable study" clock for publishing
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    # Number of Study Related Series / Instances, kept in step by catalog (record_instance counts
    # up, prune_empty recounts after a delete or a move), so a query reads them instead of counting
    num_series: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    num_instances: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # when an HL7 ADT^A08/A40 last changed this study's patient identity (xdsi.hl7.patients); NULL: never.
    # Set: every retrieve path sends its objects with the index's patient attributes (xdsi.archive.coercion)
    identity_updated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)

    patient: Mapped[Patient] = relationship(back_populates="studies")
    series: Mapped[list["Series"]] = relationship(back_populates="study")


class Series(Base):
    __tablename__ = "series"

    pk: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_fk: Mapped[int] = mapped_column(ForeignKey("study.pk"), index=True)
    series_uid: Mapped[str] = mapped_column(UID, unique=True)
    modality: Mapped[str] = mapped_column(Text, default="", index=True)
    series_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    series_description: Mapped[str] = mapped_column(Text, default="")
    body_part: Mapped[str] = mapped_column(Text, default="")
    series_date: Mapped[str] = mapped_column(Text, default="")
    series_time: Mapped[str] = mapped_column(Text, default="")
    institution_name: Mapped[str] = mapped_column(Text, default="")
    station_name: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # Number of Series Related Instances, kept in step like Study.num_instances
    num_instances: Mapped[int] = mapped_column(Integer, default=0, server_default="0")

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list["Instance"]] = relationship(back_populates="series")


class Instance(Base):
    __tablename__ = "instance"

    pk: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_fk: Mapped[int] = mapped_column(ForeignKey("series.pk"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    sop_class_uid: Mapped[str] = mapped_column(UID, index=True)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    instance_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    number_of_frames: Mapped[int | None] = mapped_column(Integer, nullable=True)
    content_date: Mapped[str] = mapped_column(Text, default="")
    content_time: Mapped[str] = mapped_column(Text, default="")
    rows: Mapped[int | None] = mapped_column(Integer, nullable=True)
    columns: Mapped[int | None] = mapped_column(Integer, nullable=True)
    source_ae_title: Mapped[str] = mapped_column(String(16), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_read_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)

    series: Mapped[Series] = relationship(back_populates="instances")
    copies: Mapped[list["FileCopy"]] = relationship(back_populates="instance", cascade="all, delete-orphan")


class FileCopy(Base):
    """One stored copy of an instance on one tier."""

    __tablename__ = "file_copy"
    __table_args__ = (
        UniqueConstraint("instance_fk", "tier"),
        Index("ix_file_copy_tier_last_read", "tier", "last_read_at"),
    )

    pk: Mapped[int] = mapped_column(Integer, primary_key=True)
    instance_fk: Mapped[int] = mapped_column(ForeignKey("instance.pk", ondelete="CASCADE"), index=True)
    tier: Mapped[str] = mapped_column(String(64))
    rel_path: Mapped[str] = mapped_column(String(512))
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    stored_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_read_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # the size of the file this copy was losslessly compressed from (a compressing tier, compress_on_receive);
    # None: the bytes as received.  ``xdsi status`` sums original_size - size per tier as bytes saved
    original_size: Mapped[int | None] = mapped_column(BigInteger, nullable=True)

    instance: Mapped[Instance] = relationship(back_populates="copies")


# XDS-I.b publishing tables (outbox, registered manifests): defined in their own module, registered on Base here.
from xdsi.index import xds_models as _xds_models  # noqa: E402,F401
from xdsi.hl7 import models as _hl7_models  # noqa: E402,F401  (the HL7 order store, issue 15)
# Routing queue tables (issue 15): defined with the routing engine, registered on Base here.
from xdsi.routing import models as _routing_models  # noqa: E402,F401
