"""The tenant's move lock: a session advisory lock in the catalog, held for the whole run of a move."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import psycopg

from migrator.catalog.models import Move, describe_move
from migrator.db.locks import lock_key, try_lock
from migrator.errors import LockBusy

# How long a refused operator waits for the lock holder's move to appear in the catalog, to name it.
HOLDER_GRACE_S = 5.0


class TenantLock:
    """A session advisory lock in the catalog held for the whole run of a move.

    The server releases it when the holder's connection dies (kill -9 included), so a crashed move
    never blocks its own resume; a second live operator gets a clear error instead of a hang.
    """

    def __init__(
        self, connect: Callable[[], psycopg.Connection[Any]], tenant: str, holder: Callable[[], Move | None]
    ) -> None:
        """`connect` opens an autocommit catalog session for the lock; `holder` reads the tenant's
        open move, to name it when the lock is taken."""
        self._connect = connect
        self.tenant = tenant
        self._holder = holder
        self.key = lock_key(f"migrator.move:{tenant}")
        self._conn: psycopg.Connection[Any] | None = None

    def acquire(self) -> None:
        conn = self._connect()
        if not try_lock(conn, self.key):
            conn.close()
            raise LockBusy(self._busy_message())
        self._conn = conn

    def _busy_message(self) -> str:
        """Name the holder's move; a holder still in preflight gets a moment to record it first."""
        deadline = time.monotonic() + HOLDER_GRACE_S
        while (holder := self._holder()) is None and time.monotonic() < deadline:
            time.sleep(0.2)
        if holder is None:
            return (
                f"tenant {self.tenant} is locked by another running migrator (a move still in preflight, an abort or "
                "a cleanup); try again when it has finished, `migrator move status` lists moves"
            )
        return (
            f"tenant {self.tenant} is locked by another running migrator: {describe_move(holder)} is running; "
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
