"""Session advisory locks in the catalog: the tenants' move lock, held for the whole run of a move,
and counted slots (moves into a stamp, sessions on a server) shared by every process of the fleet."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import psycopg

from migrator.catalog.models import Move, describe_move
from migrator.db import dsn as dsnlib
from migrator.db.locks import lock_key, try_lock
from migrator.db.retry import CATALOG
from migrator.errors import LockBusy

# How long a refused operator waits for the lock holder's move to appear in the catalog, to name it.
HOLDER_GRACE_S = 5.0


class TenantLock:
    """Session advisory locks in the catalog, one per tenant of a cohort, held for the whole run of a move.

    The server releases them when the holder's connection dies (kill -9 included), so a crashed move
    never blocks its own resume; a second live operator gets a clear error instead of a hang. All of
    a cohort's locks are tried in one statement and kept only if every one was free (else the
    session ends, releasing them), so two operators whose cohorts overlap never wait on each other.
    """

    def __init__(
        self,
        connect: Callable[[], psycopg.Connection[Any]],
        tenants: tuple[str, ...],
        holder: Callable[[str], Move | None],
    ) -> None:
        """`connect` opens an autocommit catalog session for the locks; `holder` reads a tenant's
        open move, to name it when its lock is taken."""
        self._connect = connect
        self.tenants = tenants
        self._holder = holder
        self.keys = [lock_key(f"migrator.move:{tenant}") for tenant in tenants]
        self._conn: psycopg.Connection[Any] | None = None

    def acquire(self) -> None:
        conn = self._connect()
        row = conn.execute(
            "SELECT array_agg(pg_try_advisory_lock(k) ORDER BY n) FROM unnest(%s::bigint[]) WITH ORDINALITY u(k, n)",
            (self.keys,),
        ).fetchone()
        got = row[0] if row else []
        if not all(got):
            conn.close()  # ending the session releases the locks it did take
            raise LockBusy(self._busy_message(self.tenants[got.index(False)]))
        self._conn = conn

    def _busy_message(self, tenant: str) -> str:
        """Name the holder's move; a holder still in preflight gets a moment to record it first."""
        deadline = time.monotonic() + HOLDER_GRACE_S
        while (holder := self._holder(tenant)) is None and time.monotonic() < deadline:
            time.sleep(0.2)
        if holder is None:
            return (
                f"tenant {tenant} is locked by another running migrator (a move still in preflight, an abort or "
                "a cleanup); try again when it has finished, `migrator move status` lists moves"
            )
        return (
            f"tenant {tenant} is locked by another running migrator: {describe_move(holder)} is running; "
            f"watch it with `migrator move status {holder.id}`"
        )

    def check(self) -> psycopg.Connection[Any]:
        """The lock's live session, re-acquired if it was lost (catalog restart): never act without it."""
        try:
            if self._conn is None or self._conn.closed:
                raise psycopg.OperationalError("lock connection closed")
            self._conn.execute("SELECT 1")
        except psycopg.Error:
            self.release()
            self.acquire()
        assert self._conn is not None
        return self._conn

    def held(self) -> psycopg.Connection[Any]:
        """The lock's session as it is, with no round trip to check it (inside the write freeze, whose
        caller checked it just before): a statement on a lost session fails, and nothing re-acquires
        the lock behind the caller's back."""
        if self._conn is None or self._conn.closed:
            raise psycopg.OperationalError("the tenant lock's catalog session was lost")
        return self._conn

    def release(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None

    def __enter__(self) -> TenantLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@CATALOG.wraps
def take_slot(catalog_url: str, name: str, size: int) -> psycopg.Connection[Any] | None:
    """One of `size` slots called `name`, fleet-wide, or None when every one is taken (never waits).

    The slot is the session advisory lock `name:i` on a catalog session of its own, returned open:
    closing it frees the slot, and so does the server when the holder dies (kill -9 included).
    Every local `apply` and every worker counts the same slots, so a limit holds whoever runs.
    """
    conn = dsnlib.connect(catalog_url, autocommit=True)
    try:
        if any(try_lock(conn, lock_key(f"{name}:{i}")) for i in range(size)):
            return conn
    except BaseException:
        conn.close()
        raise
    conn.close()
    return None


def stamp_slot(stamp: str) -> str:
    """The name of the `--per-stamp` slots of moves into `stamp`."""
    return f"migrator.stamp-slot:{stamp}"
