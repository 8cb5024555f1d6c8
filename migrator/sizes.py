"""How much each tenant and each stamp holds, and the stamp settings that bound it (capacity, state).

A tenant's size is measured per table on the stamp that holds it: rows are an exact count, bytes
the sum of `pg_column_size(t.*)` over its rows, row by row as stored: exact for the row payload
(tuple header, null bitmap, data; compressed values compressed), without indexes, page overhead
or dead rows; a row with an out-of-line TOAST value counts its values inline and decompressed
(PostgreSQL flattens such a row to form `t.*`). A stamp's disk use is therefore larger.

A stamp's usage is the sum of the sizes of the tenants *routed* to it: leftovers of moved tenants
awaiting cleanup and partial copies of running moves are not counted.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from migrator import stamps
from migrator.catalog import STAMP_STATES, TERMINAL, Stamp
from migrator.context import Context
from migrator.discovery import Layout, discover
from migrator.errors import BadInput


@dataclass(frozen=True)
class TenantSize:
    """One tenant on one stamp: exact rows, payload bytes, and both per table."""

    tenant: str
    stamp: str
    rows: int
    bytes: int
    tables: dict[str, tuple[int, int]] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class StampUsage:
    """What the tenants routed to a stamp hold, against its capacity (None: unlimited)."""

    stamp: Stamp
    rows: int
    bytes: int
    revision: str | None

    @property
    def free_rows(self) -> float:
        return math.inf if self.stamp.capacity_rows is None else self.stamp.capacity_rows - self.rows

    @property
    def free_bytes(self) -> float:
        return math.inf if self.stamp.capacity_bytes is None else self.stamp.capacity_bytes - self.bytes

    def utilisation(self, rows: int | None = None) -> float | None:
        """Rows used / capacity_rows (None without a row capacity); `rows` overrides the current use."""
        if self.stamp.capacity_rows is None:
            return None
        return (self.rows if rows is None else rows) / self.stamp.capacity_rows


@dataclass(frozen=True)
class FleetSizes:
    """Sizes measured on a set of stamps: every routed tenant's size and every stamp's usage."""

    tenants: dict[str, TenantSize]
    usage: dict[str, StampUsage]

    def routed_to(self, stamp: str) -> list[TenantSize]:
        return [t for t in self.tenants.values() if t.stamp == stamp]


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
            "SELECT k, count(*), coalesce(sum(s), 0)::bigint FROM (SELECT t.{key}::text AS k, {size} AS s"
            " FROM {table} t WHERE t.{key} IS NOT NULL OFFSET 0) rows GROUP BY k"
        ).format(key=sql.Identifier(table.key), size=size, table=table.ident)
        for tenant, rows, nbytes in conn.execute(query):
            per_tenant[tenant][table.label] = (int(rows), int(nbytes))
    return {
        tenant: TenantSize(
            tenant, stamp, sum(r for r, _ in tables.values()), sum(b for _, b in tables.values()), dict(tables)
        )
        for tenant, tables in per_tenant.items()
    }


def measure_fleet(ctx: Context, chosen: Iterable[Stamp]) -> FleetSizes:
    """Measure the given stamps; keeps only tenants routed to the stamp they were measured on."""
    routes = {r.tenant: r.stamp for r in ctx.catalog.routes()}
    tenants: dict[str, TenantSize] = {}
    usage: dict[str, StampUsage] = {}
    for stamp in chosen:
        with stamps.connect(stamp) as conn:
            revision = stamps.revision(conn)
            found = measure(conn, discover(conn, ctx.config.tenancy), stamp.name)
        routed = [t for t in found.values() if routes.get(t.tenant) == stamp.name]
        tenants.update({t.tenant: t for t in routed})
        usage[stamp.name] = StampUsage(stamp, sum(t.rows for t in routed), sum(t.bytes for t in routed), revision)
    return FleetSizes(tenants, usage)


# -- stamp settings (`migrator stamp set-state`, `migrator stamp update`) ------------------------------


def set_stamp_state(ctx: Context, name: str, state: str) -> Stamp:
    """Mark a stamp active, draining (receives no tenants) or retired (holds nothing and never will).

    Retiring is refused while a tenant is routed there or an unfinished move touches it; the check
    and the change happen in one catalog transaction holding the stamp's row lock.
    """
    if state not in STAMP_STATES:
        raise BadInput(f"unknown stamp state {state!r} (expected one of {', '.join(STAMP_STATES)})")
    catalog = ctx.catalog
    catalog.stamp(name)
    with catalog.transaction() as conn:
        conn.execute("SELECT 1 FROM stamps WHERE name = %s FOR UPDATE", (name,))
        if state == "retired":
            _refuse_retire(conn, name)
        conn.execute("UPDATE stamps SET state = %s WHERE name = %s", (state, name))
    return catalog.stamp(name)


def _refuse_retire(conn: psycopg.Connection[Any], name: str) -> None:
    routed = [r[0] for r in conn.execute("SELECT tenant FROM routes WHERE stamp = %s ORDER BY tenant", (name,))]
    if routed:
        shown = ", ".join(routed[:5]) + (", ..." if len(routed) > 5 else "")
        raise BadInput(
            f"stamp {name} still has {len(routed)} tenant(s) routed to it ({shown}); drain it first "
            f"(`migrator plan drain {name}`, then `migrator apply`)"
        )
    moves = conn.execute(
        "SELECT id, tenant FROM moves WHERE (source = %s OR target = %s) AND phase <> ALL(%s) ORDER BY id",
        (name, name, list(TERMINAL)),
    ).fetchall()
    if moves:
        listed = ", ".join(f"move {m} (tenant {t})" for m, t in moves[:5])
        raise BadInput(f"stamp {name} is touched by {len(moves)} unfinished move(s): {listed}; finish or abort them")


def update_stamp(
    ctx: Context, name: str, capacity_rows: int | None, capacity_bytes: int | None, region: str | None
) -> Stamp:
    """Change a stamp's capacity (flags --capacity-rows, --capacity-bytes) or region."""
    if capacity_rows is None and capacity_bytes is None and region is None:
        raise BadInput("nothing to update: give --capacity-rows, --capacity-bytes or --region")
    return ctx.catalog.update_stamp(name, capacity_rows=capacity_rows, capacity_bytes=capacity_bytes, region=region)


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
