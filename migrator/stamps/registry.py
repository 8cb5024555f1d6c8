"""What the catalog knows of the fleet: registering a stamp (its DSN proven to connect first) and
registering the tenants stamps already hold, many routes at once, from a stamp or from a CSV file."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

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


def import_routes_from_stamp(ctx: Context, name: str) -> RouteImport:
    """Route to stamp `name` every tenant in its root table (`[tenancy] root_table`, `root_column`).

    One catalog transaction; refused (nothing written) if any of them is routed to another stamp.
    """
    stamp = ctx.catalog.stamp(name)
    tenancy = ctx.config.tenancy
    query = sql.SQL("SELECT DISTINCT {col}::text FROM {table} WHERE {col} IS NOT NULL").format(
        col=sql.Identifier(tenancy.root_column), table=sql.Identifier(tenancy.db_schema, tenancy.root_table)
    )
    with stamps.connect(stamp) as conn:
        try:
            tenants = [row[0] for row in conn.execute(query)]
        except (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedColumn, psycopg.errors.InvalidSchemaName):
            raise BadInput(
                f"stamp {name} has no table {tenancy.db_schema}.{tenancy.root_table} with a column "
                f"{tenancy.root_column} ([tenancy] root_table and root_column of migrator.toml)"
            ) from None
    tenants.sort(key=lambda t: (len(t), t))
    new, existing = ctx.catalog.import_routes([(tenant, name) for tenant in tenants])
    return RouteImport(f"stamp {name}", new, existing)


def import_routes_from_file(ctx: Context, path: Path) -> RouteImport:
    """Register the `tenant,stamp[,residency]` lines of a CSV file (header line optional) in one catalog
    transaction, with each residency given (`eu`, or `eu|eu-west`; empty: anywhere), so an existing
    fleet is onboarded with its policy in one step.

    Refused (nothing written) for a malformed line, a tenant given two stamps, an unknown stamp, a
    tenant already routed to another stamp, or one whose stamp lies outside its residency.
    """
    lines = read_routes_csv(path)
    routes = [(tenant, stamp) for tenant, stamp, _ in lines]
    residency = {tenant: regions for tenant, _, regions in lines if regions}
    regions = {s.name: s for s in ctx.catalog.stamps()}
    outside = [
        line
        for tenant, stamp, allowed in lines
        if allowed and stamp in regions
        for line in violations(Placement(tenant, allowed), regions[stamp], ())
    ]
    if outside:
        raise BadInput(
            f"{path}: {len(outside)} tenant(s) outside their residency: {'; '.join(outside[:5])}; nothing imported"
        )
    new, existing = ctx.catalog.import_routes(routes, residency)
    return RouteImport(str(path), new, existing)


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


def _regions(cell: str) -> tuple[str, ...]:
    """`eu|eu-west` -> ("eu", "eu-west"); empty: anywhere."""
    return tuple(dict.fromkeys(r.strip() for r in cell.split("|") if r.strip()))
