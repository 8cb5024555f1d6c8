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
) -> Stamp:
    """`migrator stamp add`: register a stamp; with `check` (the default) only if its DSN connects.

    On a strided fleet it gets the next block of ids, its sequences restarted there (`keys stride`).
    """
    if any(known.name == name for known in ctx.catalog.stamps()):
        raise BadInput(f"stamp {name!r} already exists; change it with `migrator stamp update {name}`")
    if check:
        check_connection(name, dsn, "not added")
    joins_blocks = keyspace.strided(ctx)
    if joins_blocks and check:
        keyspace.check_new_stamp(ctx, Stamp(name, dsn, region, capacity_rows, capacity_bytes, StampState.ACTIVE))
    stamp = ctx.catalog.add_stamp(name, dsn, region, capacity_rows, capacity_bytes)
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
    """Register the `tenant,stamp` lines of a CSV file (header line optional) in one catalog transaction.

    Refused (nothing written) for a malformed line, a tenant given two stamps, an unknown stamp or a
    tenant already routed to another stamp.
    """
    new, existing = ctx.catalog.import_routes(read_routes_csv(path))
    return RouteImport(str(path), new, existing)


def read_routes_csv(path: Path) -> list[tuple[str, str]]:
    """(tenant, stamp) pairs of a CSV file, each tenant once; spaces around values and blank lines ignored."""
    rows: list[tuple[int, list[str]]] = []
    try:
        with path.open(newline="", encoding="utf-8-sig") as file:  # -sig: the BOM spreadsheets write
            reader = csv.reader(file)
            rows.extend((reader.line_num, row) for row in reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise BadInput(f"cannot read {path}: {exc}") from None
    routes: dict[str, tuple[str, int]] = {}
    for number, row in rows:
        cells = [cell.strip() for cell in row]
        if not any(cells):
            continue
        if not routes and [cell.lower() for cell in cells] == ["tenant", "stamp"]:
            continue
        if len(cells) != 2 or not all(cells):
            raise BadInput(f"{path}, line {number}: expected `tenant,stamp`, found {','.join(row)!r}")
        tenant, stamp = cells
        if tenant in routes and routes[tenant][0] != stamp:
            first_stamp, first_line = routes[tenant]
            raise BadInput(
                f"{path}, line {number}: tenant {tenant} is given stamp {stamp}, but {first_stamp} on line {first_line}"
            )
        routes.setdefault(tenant, (stamp, number))
    if not routes:
        raise BadInput(f"{path} holds no routes (expected lines `tenant,stamp`)")
    return [(tenant, stamp) for tenant, (stamp, _) in routes.items()]
