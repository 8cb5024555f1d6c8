"""Reading a stamp: reachability (errors name the stamp, never the password), its layout, tenants' row counts."""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import sql

from migrator.catalog import Stamp
from migrator.config import Tenancy
from migrator.db import dsn as dsnlib
from migrator.db.locks import lock_key
from migrator.db.retry import is_transient
from migrator.errors import Unreachable
from migrator.stamps.discovery import Layout, discover, tenant_filter, tenant_text

SCHEMA = "_migrator"  # migrator's own schema on each stamp (guard function, change log, copy cursors, fingerprint)
DDL_LOCK = lock_key("migrator.ddl")  # serialises migrator's own DDL on one stamp (`_migrator` made at once by two)
TRIGGER = "migrator_guard"  # migrator's own trigger on a moving tenant's tables (see migrator.move.fence)


def connect(stamp: Stamp, *, autocommit: bool = True) -> psycopg.Connection[Any]:
    """A session on the stamp; a failure names the stamp and never the password."""
    return connect_dsn(stamp.dsn, f"stamp {stamp.name}", autocommit=autocommit)


def connect_dsn(dsn: str, what: str, *, autocommit: bool = True) -> psycopg.Connection[Any]:
    """The one way a stamp session opens (pinned settings, bounded connect timeout): a failure names
    `what` and the masked DSN, never the password, and stays transient when a later attempt may
    connect (a retried step runs again). Use it as `with connect_dsn(...) as conn:`, which commits
    (or rolls back) and closes, or keep the session open."""
    try:
        return dsnlib.connect(dsn, autocommit=autocommit)
    except psycopg.Error as exc:
        raise Unreachable(
            f"cannot connect to {what} ({dsnlib.mask(dsn)}): {dsnlib.reason(exc, dsn)}", transient=is_transient(exc)
        ) from None


class ThreadSessions:
    """Sessions on one stamp kept for a job of several steps (a move's copy), one per thread.

    A step asks for its thread's session instead of opening one: a connection costs tens of
    milliseconds on a loaded machine (SCRAM's key derivation on both ends, a new server process),
    and a copy of many small tables paid about 30 of them per move. A session found lost (a retried
    step's) or left in a transaction is replaced or rolled back; all of them close with the job.
    """

    def __init__(self, dsn: str, what: str, setup: Callable[[psycopg.Connection[Any]], object] | None = None) -> None:
        self.dsn, self.what, self._setup = dsn, what, setup  # `setup`: run on each session opened
        self._mine = threading.local()
        self._opened: list[psycopg.Connection[Any]] = []
        self._lock = threading.Lock()

    def session(self, *, autocommit: bool) -> psycopg.Connection[Any]:
        """This thread's session, idle, in the given mode and the server's default isolation level."""
        conn: psycopg.Connection[Any] | None = getattr(self._mine, "conn", None)
        if conn is None or conn.closed or conn.broken:
            conn = connect_dsn(self.dsn, self.what, autocommit=autocommit)
            with self._lock:
                self._opened.append(conn)
            if self._setup is not None:
                self._setup(conn)
            self._mine.conn = conn
            return conn
        if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            conn.rollback()
        conn.autocommit = autocommit
        conn.isolation_level = None
        return conn

    def __enter__(self) -> ThreadSessions:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close every session (after the threads that used them are done)."""
        with self._lock:
            for conn in self._opened:
                conn.close()
            self._opened.clear()


def layout(stamp: Stamp, tenancy: Tenancy) -> Layout:
    with connect(stamp) as conn:
        return discover(conn, tenancy)


def tenant_rows(conn: psycopg.Connection[Any], layout: Layout, tenant: str | None = None) -> dict[str, dict[str, int]]:
    """Rows per tenant per table on this stamp: {tenant: {table: rows}}."""
    counts: dict[str, dict[str, int]] = defaultdict(dict)
    for table in layout.tables:
        where = tenant_filter(table, (tenant,), sql.Identifier("t")) if tenant else sql.SQL("true")
        query = sql.SQL(
            "SELECT k, count(*) FROM (SELECT {key} AS k FROM {table} t WHERE {where} OFFSET 0) rows"
            " WHERE k IS NOT NULL GROUP BY 1"
        )
        for key, rows in conn.execute(
            query.format(key=tenant_text(table, sql.Identifier("t")), table=table.ident, where=where)
        ):
            counts[key][table.label] = rows
    return dict(counts)
