"""Advisory locks: one way to name them and one way to try one.

Session locks (tenant moves, plan applies, schema rollouts) are held on a connection of their own,
so the server drops them with the holder's session: a process killed with -9 never blocks the
command that resumes its work.

Locks named here take one 64-bit key. The per-move locks of the guard (`move.fence`) and the
per-sequence locks of the copy take two 32-bit keys (a class and an id) instead: the guard
trigger's PL/pgSQL takes them too, from the move id it reads, where no Python name can be hashed,
and the class keeps them apart from every named lock.
"""

from __future__ import annotations

import hashlib
from typing import Any

import psycopg


def lock_key(name: str) -> int:
    """A stable signed 64-bit advisory-lock key for a name (`hashtext` differs across versions)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


def try_lock(conn: psycopg.Connection[Any], key: int) -> bool:
    """Take the session advisory lock `key` on `conn` if it is free; never waits."""
    row = conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()
    return bool(row and row[0])


def xact_lock(conn: psycopg.Connection[Any], key: int) -> None:
    """Take the transaction advisory lock `key`, waiting for it; released at commit or rollback."""
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (key,))
