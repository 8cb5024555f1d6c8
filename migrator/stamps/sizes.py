"""How much each tenant holds on a stamp: exact rows, and payload bytes per table.

Rows are an exact count, bytes the sum of `pg_column_size(t.*)` over the tenant's rows, row by row
as stored: exact for the row payload (tuple header, null bitmap, data; compressed values
compressed), without indexes, page overhead or dead rows; a row with an out-of-line TOAST value
counts its values inline and decompressed (PostgreSQL flattens such a row to form `t.*`). A
stamp's disk use is therefore larger.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from migrator.stamps.discovery import Layout, tenant_text


@dataclass(frozen=True)
class TenantSize:
    """One tenant on one stamp: exact rows, payload bytes, and both per table."""

    tenant: str
    stamp: str
    rows: int
    bytes: int
    tables: dict[str, tuple[int, int]] = field(default_factory=dict, compare=False)


def measure(
    conn: psycopg.Connection[Any], layout: Layout, stamp: str, with_bytes: bool = True
) -> dict[str, TenantSize]:
    """Every tenant on this stamp with its rows and payload bytes per table (one scan per table)."""
    per_tenant: dict[str, dict[str, tuple[int, int]]] = defaultdict(dict)
    # The size is taken per row in a subquery that is never flattened (OFFSET 0), so it is the stored
    # tuple's size: summing pg_column_size(t.*) inside a sort or hash aggregate would size a copy of
    # the row re-formed by the executor, a few bytes off and depending on the plan.
    size = sql.SQL("pg_column_size(t.*)") if with_bytes else sql.SQL("0")
    for table in layout.tables:
        query = sql.SQL(
            "SELECT k, count(*), coalesce(sum(s), 0)::bigint FROM (SELECT {key} AS k, {size} AS s"
            " FROM {table} t OFFSET 0) rows WHERE k IS NOT NULL GROUP BY k"
        ).format(key=tenant_text(table, sql.Identifier("t")), size=size, table=table.ident)
        for tenant, rows, nbytes in conn.execute(query):
            per_tenant[tenant][table.label] = (int(rows), int(nbytes))
    return {
        tenant: TenantSize(
            tenant, stamp, sum(r for r, _ in tables.values()), sum(b for _, b in tables.values()), dict(tables)
        )
        for tenant, tables in per_tenant.items()
    }


def human_bytes(value: float) -> str:
    """1536 -> '1.5 KiB': for tables and messages (plans keep exact integers)."""
    if value == math.inf:
        return "unlimited"
    amount = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(amount) < 1024 or unit == "TiB":
            return f"{amount:.0f} {unit}" if unit == "B" else f"{amount:.1f} {unit}"
        amount /= 1024
    return f"{amount:.1f} TiB"
