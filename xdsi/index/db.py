"""Engines, sessions and schema upgrades.

The schema is owned by Alembic: :func:`open_index` upgrades the database to
the newest revision before returning, under a lock so that several xdsi
processes starting at once on one PostgreSQL index do not race.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Iterator

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger(__name__)

_READONLY = "xdsi_readonly"
_ONE_STATEMENT = "xdsi_one_statement"  # a read of one statement: no BEGIN on SQLite (Index.read_connection)
_PG_MIGRATION_LOCK = 0x78647369  # "xdsi": advisory lock key held while migrating


class Index:
    """A connection pool and session factory bound to one index database."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A unit of work: committed on success, rolled back on any exception."""
        with self._sessions() as s:
            try:
                yield s
                s.commit()
            except BaseException:
                s.rollback()
                raise

    @contextmanager
    def read_session(self) -> Iterator[Session]:
        """A read-only unit of work.

        On SQLite it begins a deferred transaction, so readers run beside one
        writer under WAL instead of queueing for the write lock that
        :meth:`session` takes up front.  Nothing is committed: closing the
        session ends the transaction and leaves loaded objects usable (detached).
        """
        with self._sessions() as s:
            s.connection(execution_options={_READONLY: True})
            yield s

    @contextmanager
    def read_connection(self) -> Iterator[Connection]:
        """:meth:`read_session` without the ORM: a Core connection for statements that select columns.

        Why: C-FIND selects columns only, and the ORM session's set-up and result handling were a
        tenth of a one-match query's time.  Same transaction as :meth:`read_session` (deferred BEGIN on
        SQLite), rolled back when the connection closes.  On SQLite a single SELECT needs no BEGIN: the
        statement reads one snapshot until it is reset, also when its rows are fetched in batches, so
        a connection from here runs without one (``_ONE_STATEMENT``): run one statement on it.
        """
        with self.engine.connect() as conn:
            conn.execution_options(**{_READONLY: True, _ONE_STATEMENT: True})
            yield conn

    def dispose(self) -> None:
        self.engine.dispose()


# PostgreSQL's "try again" errors: a deadlock broken by the server, a serialization failure
_RETRYABLE_SQLSTATES = frozenset({"40P01", "40001"})


def retryable(exc: BaseException) -> bool:
    """Whether a failed write may simply be run again: the database broke a deadlock or a serialization conflict.

    Two writers that take the same rows (a study's counters, a series'
    counters) in different orders deadlock now and then on PostgreSQL; the
    server aborts one of them, and nothing about the instance is wrong.
    Refusing it with A700 (as a CI run did with two workers) would push a
    retry onto the modality for a condition that clears by itself.  A locked
    SQLite database (past its busy timeout) counts too.
    """
    from sqlalchemy.exc import DBAPIError

    if not isinstance(exc, DBAPIError):
        return False
    if getattr(exc.orig, "sqlstate", None) in _RETRYABLE_SQLSTATES:
        return True
    return "database is locked" in str(exc.orig)


def _unicode_upper(value: object) -> object:
    return value.upper() if isinstance(value, str) else value


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        db_path = url.split("///", 1)[-1]
        if db_path and db_path != ":memory:":
            Path(db_path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # type: ignore[no-untyped-def]
            # pysqlite's own transaction handling defers BEGIN; take it over so
            # that BEGIN IMMEDIATE can be issued for writers (no lock upgrades).
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            # FULL: a committed transaction survives power loss: a C-STORE is
            # acknowledged only after its index row is durable.
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()
            # SQLite's upper() folds ASCII only; Person Name matching is case-insensitive for
            # every script (PostgreSQL's upper() already is), so use Python's Unicode rules.
            dbapi_conn.create_function("upper", 1, _unicode_upper, deterministic=True)

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn):  # type: ignore[no-untyped-def]
            # writers take the write lock at BEGIN, so a transaction never has
            # to upgrade a read lock (which fails at once under WAL); readers don't
            options = conn.get_execution_options()
            if options.get(_ONE_STATEMENT):
                return
            conn.exec_driver_sql("BEGIN" if options.get(_READONLY) else "BEGIN IMMEDIATE")

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


def alembic_config(engine: Engine) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(resources.files("xdsi.index") / "migrations"))
    cfg.attributes["connection"] = None
    cfg.attributes["engine"] = engine
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Bring the schema to ``revision``; safe to call from several processes at once."""
    cfg = alembic_config(engine)
    sqlite = engine.dialect.name == "sqlite"
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _PG_MIGRATION_LOCK})
            conn.commit()
        if sqlite:
            # Batch migrations rebuild a SQLite table (copy, DROP, rename).  With foreign keys
            # enforced, DROP TABLE first deletes every row, and ON DELETE CASCADE would take the
            # child rows with it (file_copy under instance).  The pragma only takes effect
            # outside a transaction, hence the DBAPI connection (autocommit mode); integrity is
            # checked before the pragma is restored.
            _sqlite_pragma(conn, "PRAGMA foreign_keys=OFF")
        try:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)
            conn.commit()
            if sqlite:
                broken = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                conn.commit()
                if broken:
                    raise RuntimeError(f"index migration left dangling references: {broken[:5]}")
        finally:
            if sqlite:
                conn.rollback()
                _sqlite_pragma(conn, "PRAGMA foreign_keys=ON")
            if engine.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _PG_MIGRATION_LOCK})
                conn.commit()


def _sqlite_pragma(conn, pragma: str) -> None:  # type: ignore[no-untyped-def]
    """Run a pragma on the raw SQLite connection, outside any transaction."""
    dbapi = conn.connection.dbapi_connection
    cur = dbapi.cursor()
    try:
        cur.execute(pragma)
    finally:
        cur.close()


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def open_index(url: str, migrate: bool = True) -> Index:
    engine = make_engine(url)
    if migrate:
        upgrade(engine)
    return Index(engine)
