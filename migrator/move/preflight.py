"""Everything a move checks before its first write; each failure is one clear line and changes nothing."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from migrator import stamps
from migrator.catalog import Catalog, Route, Stamp
from migrator.config import Tenancy
from migrator.db.alembic import read_revision
from migrator.errors import PreflightError
from migrator.move import shapes
from migrator.stamps.discovery import Layout, Table, inspect, problems_message, tenant_filter

log = logging.getLogger("migrator.preflight")


@dataclass(frozen=True)
class Checked:
    """What preflight established, handed to the copy so nothing is looked up twice."""

    tenant: str
    route: Route
    source: Stamp
    target: Stamp
    layout: Layout
    revision: str | None
    rows: dict[str, int]
    null_tenant_rows: dict[str, int] = field(default_factory=dict)
    """Rows of nullable tenant columns holding NULL, per table: they belong to no tenant and stay put."""
    skipped: tuple[str, ...] = ()
    """Views and materialized views of the tenancy schema: no rows of their own, not copied."""

    @property
    def total_rows(self) -> int:
        return sum(self.rows.values())


def resolve(catalog: Catalog, tenant: str, target_name: str) -> tuple[Route, Stamp, Stamp]:
    """Catalog-only checks: known tenant and stamps, a different and active target."""
    route = catalog.route(tenant)
    target = catalog.stamp(target_name)
    source = catalog.stamp(route.stamp)
    if source.name == target.name:
        raise PreflightError(f"tenant {tenant} already lives on stamp {target.name}; source and target are the same")
    if target.state != "active":
        raise PreflightError(f"target stamp {target.name} is {target.state}; only active stamps receive tenants")
    return route, source, target


def check_move(catalog: Catalog, tenancy: Tenancy, tenant: str, target_name: str) -> Checked:
    """All preflight checks of a new move, read-only on the catalog and both stamps.

    The checks of the stamps gather every problem they find and raise them together, in one error.
    """
    route, source, target = resolve(catalog, tenant, target_name)
    with stamps.connect(source) as src, stamps.connect(target) as tgt:
        src_rev, tgt_rev = read_revision(src), read_revision(tgt)
        if src_rev != tgt_rev:  # two stamps without Alembic (None) count as the same schema
            raise PreflightError(
                f"schema revisions differ: {source.name} is at {_rev(src_rev)}, {target.name} at {_rev(tgt_rev)}; "
                "run `migrator schema upgrade` first"
            )
        layout = inspect(src, tenancy)
        problems = [*layout.problems]
        root = next((t for t in layout.tables if t.name == tenancy.root_table), None)
        if root is None:
            raise PreflightError(problems_message(problems))
        _check_spelling(src, root, tenant, source.name)
        rows = {table.label: _count(src, table, tenant) for table in layout.tables}
        if rows[root.label] == 0:
            raise PreflightError(f"tenant {tenant} has no row in {root.label} on its stamp {source.name}")
        unmovable, skipped = shapes.unmovable(src, tenancy, layout)
        problems += unmovable
        problems += shapes.foreign_tenant_references(src, layout, tenant)
        differences = shapes.compare_layouts(layout, inspect(tgt, tenancy), source.name, target.name)
        held = [t.label for t in layout.tables if _count(tgt, t, tenant, limit=1)]
        problems += differences
        problems += [f"target {target.name} already holds rows of tenant {tenant} in {label}" for label in held]
        if not (differences or held):  # other tenants' rows only, in tables known to match
            problems += shapes.unique_collisions(src, tgt, layout, tenant, target.name, rows)
        if problems:
            raise PreflightError(problems_message(problems))
        nulls = null_tenant_rows(src, layout)
        for label, count in nulls.items():
            key = layout.table(label).key
            log.warning("table %s has %d rows with NULL %s; they are not moved", label, count, key)
    return Checked(tenant, route, source, target, layout, src_rev, rows, nulls, skipped)


def _rev(revision: str | None) -> str:
    return revision if revision is not None else "no Alembic revision"


def _check_spelling(conn: psycopg.Connection[Any], root: Table, tenant: str, stamp: str) -> None:
    """Refuse a tenant id spelled differently from its stored text form (`042` for 42, an upper-case uuid).

    The rows would match by value, but the fence and capture trigger compare the stored key's text
    with the guarded tenant's text: a different spelling would leave the tenant's writes unfenced.
    """
    query = sql.SQL(
        "SELECT {k}::text, to_jsonb({k}) #>> '{{}}', pg_typeof({k})::text FROM {t} WHERE {f} LIMIT 1"
    ).format(k=sql.Identifier(root.key), t=root.ident, f=tenant_filter(root, tenant))
    try:
        with conn.transaction():
            row = conn.execute(query).fetchone()
    except psycopg.errors.DataError:
        raise PreflightError(f"tenant {tenant} is not a valid value of {root.label}.{root.key} on {stamp}") from None
    if row and row[0] == tenant and row[1] != tenant:
        raise PreflightError(
            f"tenant keys of type {row[2]} are not supported: the fence reads {row[0]} as {row[1]} "
            "(use a key type with one text form, such as bigint, uuid or text)"
        )
    if row and row[0] != tenant:
        raise PreflightError(
            f"tenant {tenant} is stored as {row[0]} in {root.label}.{root.key} on {stamp}; "
            "route and move it by that exact spelling"
        )


def null_tenant_rows(conn: psycopg.Connection[Any], layout: Layout) -> dict[str, int]:
    """Rows whose (nullable) tenant column is NULL, per table: no tenant owns them, so no move takes them."""
    found = {}
    for table in layout.tables:
        if not any(c.name == table.key and c.nullable for c in table.columns):
            continue
        row = conn.execute(
            sql.SQL("SELECT count(*) FROM {} WHERE {} IS NULL").format(table.ident, sql.Identifier(table.key))
        ).fetchone()
        if row and row[0]:
            found[table.label] = int(row[0])
    return found


def _count(conn: psycopg.Connection[Any], table: Table, tenant: str, limit: int | None = None) -> int:
    inner = sql.SQL("SELECT 1 FROM {} WHERE {}").format(table.ident, tenant_filter(table, tenant))
    if limit is not None:
        inner = sql.SQL("{} LIMIT {}").format(inner, sql.Literal(limit))
    row = conn.execute(sql.SQL("SELECT count(*) FROM ({}) s").format(inner)).fetchone()
    return int(row[0]) if row else 0
