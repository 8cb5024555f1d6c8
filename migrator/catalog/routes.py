"""The statements the application's router (`migrator.router`) runs on the catalog, kept with every
other statement on its tables. Imports psycopg alone, so the router library stays cheap to import."""

from __future__ import annotations

from typing import Any

import psycopg


def route_of(conn: psycopg.Connection[Any], tenant: str) -> tuple[str, int] | None:
    """The tenant's stamp and route version (None: no route), one indexed row of `routes`."""
    row = conn.execute("SELECT stamp, version FROM routes WHERE tenant = %s", (tenant,)).fetchone()
    return None if row is None else (str(row[0]), int(row[1]))
