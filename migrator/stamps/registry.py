"""What the catalog knows of the fleet: registering a stamp (its DSN proven to connect first) and
registering the tenants stamps already hold, many routes at once, from a stamp or from a CSV file."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from migrator import stamps
from migrator.catalog import Stamp, StampState
from migrator.catalog.policy import Placement, violations
from migrator.context import Context
from migrator.errors import BadInput, MigratorError
from migrator.stamps import keyspace


def check_connection(name: str, dsn: str, refused: str) -> None:
    """Refuse a DSN that cannot connect before the catalog records it (exit 2, password masked).

    `refused` says what did not happen ("not added", "not changed"), for the one-line error.
    """
    try:
        with stamps.connect(Stamp(name, dsn, None, None, None, StampState.ACTIVE)):
            pass
    except MigratorError as exc:  # names the stamp and its masked DSN, with the driver's reason
        raise BadInput(f"{exc}; {refused} (fix the DSN, or give --no-check to skip this check)") from None


def add_stamp(
    ctx: Context,
    name: str,
    dsn: str,
    region: str | None = None,
    capacity_rows: int | None = None,
    capacity_bytes: int | None = None,
    *,
    check: bool = True,
    kind: str = "shared",
) -> Stamp:
    """`migrator stamp add`: register a stamp; with `check` (the default) only if its DSN connects.
    `kind` (--kind) is `shared` or `dedicated` (one tenant at most, see `migrator.catalog.policy`).

    On a strided fleet it gets the next block of ids, its sequences restarted there (`keys stride`).
    """
    if any(known.name == name for known in ctx.catalog.stamps()):
        raise BadInput(f"stamp {name!r} already exists; change it with `migrator stamp update {name}`")
    if check:
        check_connection(name, dsn, "not added")
    joins_blocks = keyspace.strided(ctx)
    if joins_blocks and check:
        keyspace.check_new_stamp(ctx, Stamp(name, dsn, region, capacity_rows, capacity_bytes, StampState.ACTIVE))
    stamp = ctx.catalog.add_stamp(name, dsn, region, capacity_rows, capacity_bytes, kind)
    return keyspace.place_new_stamp(ctx, stamp, reachable=check) if joins_blocks else stamp


# -- routes of tenants the stamps already hold (`migrator route import`) ------------------------------------


@dataclass(frozen=True)
class RouteImport:
    """What `route import` did: where the routes came from, which were new, which were already there."""

    source: str
    new: list[str]
    existing: list[str]


@dataclass(frozen=True)
class StampResidency:
    """The residency `route import --stamp` gives each tenant: the same regions for all (--residency), or
    each tenant's own, read from a column of the root table (--residency-column); neither: anywhere."""

    regions: tuple[str, ...] = ()
    column: str | None = None


def import_routes_from_stamp(ctx: Context, name: str, residency: StampResidency | None = None) -> RouteImport:
    """Route to stamp `name` every tenant in its root table (`[tenancy] root_table`, `root_column`), each
    with its residency (`StampResidency`), so a stamp's tenants are onboarded with their policy in one step.

    One catalog transaction; refused (nothing written) if any of them is routed to another stamp, or if
    the stamp lies outside a tenant's residency.
    """
    stamp = ctx.catalog.stamp(name)
    residency = residency or StampResidency()
    lines = [(tenant, name, regions or residency.regions) for tenant, regions in _root_tenants(ctx, stamp, residency)]
    lines.sort(key=lambda line: (len(line[0]), line[0]))
    return _import(ctx, f"stamp {name}", lines)


def _root_tenants(ctx: Context, stamp: Stamp, residency: StampResidency) -> list[tuple[str, tuple[str, ...]]]:
    """Every tenant of the stamp's root table, with the regions of its residency column (if one is named)."""
    tenancy = ctx.config.tenancy
    column = sql.Identifier(residency.column) if residency.column else sql.NULL
    query = sql.SQL("SELECT DISTINCT {col}::text, {residency}::text FROM {table} WHERE {col} IS NOT NULL").format(
        col=sql.Identifier(tenancy.root_column),
        residency=column,
        table=sql.Identifier(tenancy.db_schema, tenancy.root_table),
    )
    table = f"{tenancy.db_schema}.{tenancy.root_table}"
    with stamps.connect(stamp) as conn:
        try:
            rows = conn.execute(query).fetchall()
        except (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedColumn, psycopg.errors.InvalidSchemaName):
            if residency.column and _has_column(conn, tenancy.db_schema, tenancy.root_table, tenancy.root_column):
                raise BadInput(
                    f"stamp {stamp.name}: table {table} has no column {residency.column} (--residency-column)"
                ) from None
            raise BadInput(
                f"stamp {stamp.name} has no table {table} with a column {tenancy.root_column} "
                "([tenancy] root_table and root_column of migrator.toml)"
            ) from None
    found: dict[str, tuple[str, ...]] = {}
    for tenant, cell in rows:
        regions = _regions(cell or "", ",|")
        if found.setdefault(tenant, regions) != regions:
            raise BadInput(
                f"stamp {stamp.name}: tenant {tenant} has two residencies in {table}.{residency.column} "
                f"({'|'.join(found[tenant]) or 'empty'} and {'|'.join(regions) or 'empty'}); nothing imported"
            )
    return list(found.items())


def _has_column(conn: psycopg.Connection[Any], schema: str, table: str, column: str) -> bool:
    found = conn.execute(
        "SELECT 1 FROM information_schema.columns WHERE table_schema = %s AND table_name = %s AND column_name = %s",
        (schema, table, column),
    ).fetchone()
    return found is not None


def import_routes_from_file(ctx: Context, path: Path) -> RouteImport:
    """Register the `tenant,stamp[,residency]` lines of a CSV file (header line optional) in one catalog
    transaction, with each residency given (`eu`, or `eu|eu-west`; empty: anywhere), so an existing
    fleet is onboarded with its policy in one step.

    Refused (nothing written) for a malformed line, a tenant given two stamps, an unknown stamp, a
    tenant already routed to another stamp, or one whose stamp lies outside its residency.
    """
    return _import(ctx, str(path), read_routes_csv(path))


def _import(ctx: Context, source: str, lines: list[Line]) -> RouteImport:
    """Register the routes with their residencies in one catalog transaction (its audit records too),
    refused whole, before anything is written, when a tenant's stamp lies outside its residency."""
    stamps_by_name = {s.name: s for s in ctx.catalog.stamps()}
    outside = [
        line
        for tenant, stamp, allowed in lines
        if allowed and stamp in stamps_by_name
        for line in violations(Placement(tenant, allowed), stamps_by_name[stamp], ())
    ]
    if outside:
        raise BadInput(
            f"{source}: {len(outside)} tenant(s) outside their residency: {'; '.join(outside[:5])}; nothing imported"
        )
    residency = {tenant: regions for tenant, _, regions in lines if regions}
    new, existing = ctx.catalog.import_routes([(tenant, stamp) for tenant, stamp, _ in lines], residency)
    return RouteImport(source, new, existing)


Line = tuple[str, str, tuple[str, ...]]  # tenant, stamp, residency (empty: anywhere)


def read_routes_csv(path: Path) -> list[Line]:
    """The (tenant, stamp, residency) lines of a CSV file, each tenant once; spaces around values and
    blank lines ignored."""
    rows: list[tuple[int, list[str]]] = []
    try:
        with path.open(newline="", encoding="utf-8-sig") as file:  # -sig: the BOM spreadsheets write
            reader = csv.reader(file)
            rows.extend((reader.line_num, row) for row in reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise BadInput(f"cannot read {path}: {exc}") from None
    routes: dict[str, tuple[str, int]] = {}
    residency: dict[str, tuple[str, ...]] = {}
    for number, row in rows:
        cells = [cell.strip() for cell in row]
        if not any(cells):
            continue
        if not routes and [cell.lower() for cell in cells] in (["tenant", "stamp"], ["tenant", "stamp", "residency"]):
            continue
        if len(cells) not in (2, 3) or not all(cells[:2]):
            raise BadInput(f"{path}, line {number}: expected `tenant,stamp[,residency]`, found {','.join(row)!r}")
        tenant, stamp = cells[:2]
        residency[tenant] = _regions(cells[2]) if len(cells) == 3 else ()
        if tenant in routes and routes[tenant][0] != stamp:
            first_stamp, first_line = routes[tenant]
            raise BadInput(
                f"{path}, line {number}: tenant {tenant} is given stamp {stamp}, but {first_stamp} on line {first_line}"
            )
        routes.setdefault(tenant, (stamp, number))
    if not routes:
        raise BadInput(f"{path} holds no routes (expected lines `tenant,stamp[,residency]`)")
    return [(tenant, stamp, residency[tenant]) for tenant, (stamp, _) in routes.items()]


def _regions(cell: str, separators: str = "|") -> tuple[str, ...]:
    """`eu|eu-west` -> ("eu", "eu-west") (a residency column may also use commas); empty: anywhere."""
    for separator in separators[1:]:
        cell = cell.replace(separator, separators[0])
    return tuple(dict.fromkeys(r.strip() for r in cell.split(separators[0]) if r.strip()))
