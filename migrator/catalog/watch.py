"""Reads of the catalog by a watcher on a session of its own, one statement each and never retried:
the chaos run's oracle polls a move's phase every few milliseconds and decides itself what an
unreachable catalog means. Kept here with every other statement on the catalog's tables."""

from __future__ import annotations

from typing import Any

import psycopg

from migrator.catalog.models import TERMINAL


def last_move_id(conn: psycopg.Connection[Any]) -> int:
    """The newest move's id (0: none yet)."""
    row = conn.execute("SELECT coalesce(max(id), 0) FROM moves").fetchone()
    return int(row[0]) if row else 0


def latest_phase(conn: psycopg.Connection[Any], tenant: str, after_id: int) -> str | None:
    """The phase of the tenant's newest move after `after_id` (alone or in a cohort), if any."""
    row = conn.execute(
        "SELECT phase FROM moves WHERE id > %s"
        " AND id IN (SELECT move_id FROM move_tenants WHERE tenant = %s) ORDER BY id DESC LIMIT 1",
        (after_id, tenant),
    ).fetchone()
    return None if row is None else str(row[0])


def unfinished_move_ids(conn: psycopg.Connection[Any]) -> list[int]:
    """The moves not in a terminal phase (resumable, or still running)."""
    return [int(row[0]) for row in conn.execute("SELECT id FROM moves WHERE phase <> ALL(%s)", (sorted(TERMINAL),))]
