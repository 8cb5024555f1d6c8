"""The statements the application's router (`migrator.router`) runs on the catalog, kept with every
other statement on its tables. Imports psycopg alone, so the router library stays cheap to import."""

from __future__ import annotations

from typing import Any

import psycopg


def route_of(conn: psycopg.Connection[Any], tenant: str) -> tuple[str, int] | None:
    """The tenant's stamp and route version (None: no route), one indexed row of `routes`."""
    row = conn.execute("SELECT stamp, version FROM routes WHERE tenant = %s", (tenant,)).fetchone()
    return None if row is None else (str(row[0]), int(row[1]))


CUTOVER_CHANNEL = "migrator_cutovers"
"""Where a move announces, just before its freeze, the stamp its tenants are about to live on, so that
routers open connections there before the flip rather than after it. A channel of its own: a router
of an older migrator, listening on the routes' channel only, never mistakes it for a route change."""


def announce_cutover(conn: psycopg.Connection[Any], tenants: list[str], target: str) -> None:
    """Notify CUTOVER_CHANNEL of each tenant and its target stamp (delivered when `conn` commits)."""
    conn.execute(
        "SELECT pg_notify(%s, json_build_object('tenant', t, 'stamp', %s::text)::text) FROM unnest(%s::text[]) t",
        (CUTOVER_CHANNEL, target, tenants),
    )
