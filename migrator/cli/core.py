"""Catalog, stamp, route and tenant commands."""

from __future__ import annotations

import shlex
from pathlib import Path

import click

from migrator import config as configlib
from migrator.cli import render
from migrator.cli.base import JSON, cli, context_of, emit, route_dict
from migrator.errors import CheckFailed

# -- init -------------------------------------------------------------------------------------------------


@cli.command("init")
@click.option(
    "--catalog", "catalog_url", default=None, help="URL of the routing catalog's database (else a placeholder)."
)
@click.option(
    "--from-stamp", default=None, help="DSN of one stamp of the application: guess [tenancy] from its tables."
)
@click.option("--force", is_flag=True, help="Overwrite the file if it exists.")
@click.option(
    "--path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Where to write (default: the --config path, else ./migrator.toml).",
)
@click.pass_context
def init_cmd(
    ctx: click.Context, catalog_url: str | None, from_stamp: str | None, force: bool, path: Path | None
) -> None:
    """Write a commented migrator.toml for an existing application (mode 0600), guessing its tenancy from a stamp."""
    from migrator.stamps.tenancy import init_config

    target = path or ctx.find_root().obj["config"] or Path(configlib.DEFAULT_FILE)
    written = init_config(target, catalog_url, from_stamp, force)
    uses = "" if target == Path(configlib.DEFAULT_FILE) else f" --config {shlex.quote(str(target))}"
    done = f"wrote {written.path}; review it, then run `migrator{uses} catalog init`"
    click.echo(render.mask_text("\n".join([*written.notes, done])))


# -- catalog ----------------------------------------------------------------------------------------------


@cli.group("catalog")
def catalog_group() -> None:
    """The routing catalog database."""


@catalog_group.command("init")
@click.pass_context
def catalog_init(ctx: click.Context) -> None:
    """Create or upgrade the catalog's schema to the newest revision."""
    from migrator.db import alembic as migrations

    context = context_of(ctx)
    migrations.upgrade(context.catalog.url, migrations.catalog_env())
    click.echo(f"catalog at {migrations.current_revision(context.catalog.url)}")


@catalog_group.command("grant-reader")
@click.argument("role")
@click.pass_context
def catalog_grant_reader(ctx: click.Context, role: str) -> None:
    """Let an application ROLE read tenant routes (SELECT on routes only; never stamps, whose DSNs hold passwords)."""
    table = context_of(ctx).catalog.grant_reader(role)
    click.echo(f"granted role {role} read access to {table} only (not stamps, moves or plans)")


# -- stamps -----------------------------------------------------------------------------------------------


@cli.group("stamp")
def stamp_group() -> None:
    """Register and list stamps."""


@stamp_group.command("add")
@click.argument("name")
@click.option("--dsn", required=True, help="libpq URL, keyword string or service name of the stamp's database.")
@click.option("--region", default=None, help="Region label, for placement and reports.")
@click.option("--capacity-rows", type=click.IntRange(min=1), default=None, help="How many tenant rows it may hold.")
@click.option("--capacity-bytes", type=click.IntRange(min=1), default=None, help="How many bytes of tenant data.")
@click.pass_context
def stamp_add(
    ctx: click.Context, name: str, dsn: str, region: str | None, capacity_rows: int | None, capacity_bytes: int | None
) -> None:
    """Register a stamp in the catalog."""
    stamp = context_of(ctx).catalog.add_stamp(name, dsn, region, capacity_rows, capacity_bytes)
    click.echo(f"added stamp {stamp.name} ({stamp.masked_dsn})")


@stamp_group.command("list")
@JSON
@click.pass_context
def stamp_list(ctx: click.Context, as_json: bool) -> None:
    """List stamps with their state and capacity (DSN passwords masked)."""
    stamps = context_of(ctx).catalog.stamps()
    data = [
        {
            "name": s.name,
            "dsn": s.masked_dsn,
            "region": s.region,
            "state": s.state,
            "capacity_rows": s.capacity_rows,
            "capacity_bytes": s.capacity_bytes,
        }
        for s in stamps
    ]
    emit(
        as_json,
        data,
        render.table(
            ["stamp", "state", "region", "capacity rows", "dsn"],
            [[d["name"], d["state"], d["region"], d["capacity_rows"], d["dsn"]] for d in data],
        ),
    )


@stamp_group.command("check")
@click.argument("name")
@JSON
@click.pass_context
def stamp_check(ctx: click.Context, name: str, as_json: bool) -> None:
    """Check that the stamp's configured role has every privilege a move to or from it needs; exit 1 if not."""
    from migrator import stamps
    from migrator.stamps import privileges

    context = context_of(ctx)
    stamp = context.catalog.stamp(name)
    with stamps.connect(stamp) as conn:
        result = privileges.check_stamp(conn, context.config.tenancy)
    data = {
        "stamp": stamp.name,
        "role": result.role,
        "database": result.database,
        "ok": result.ok,
        "missing": result.missing,
    }
    if result.ok:
        text = f"stamp {stamp.name}: role {result.role} has every privilege a move needs"
    else:
        text = "\n".join(
            [
                f"stamp {stamp.name}: role {result.role} lacks {len(result.missing)} privileges a move needs",
                *(m.line() for m in result.missing),
            ]
        )
    emit(as_json, data, text)
    if not result.ok:
        raise CheckFailed()


# -- routes -----------------------------------------------------------------------------------------------


@cli.group("route")
def route_group() -> None:
    """The tenant -> stamp routing table."""


@route_group.command("set")
@click.argument("tenant")
@click.argument("stamp")
@click.pass_context
def route_set(ctx: click.Context, tenant: str, stamp: str) -> None:
    """Register a tenant's home stamp (moving it is `migrator move`)."""
    route = context_of(ctx).catalog.set_route(tenant, stamp)
    click.echo(f"tenant {route.tenant} -> {route.stamp} (version {route.version})")


@route_group.command("get")
@click.argument("tenant")
@JSON
@click.pass_context
def route_get(ctx: click.Context, tenant: str, as_json: bool) -> None:
    """Show where a tenant lives."""
    route = context_of(ctx).catalog.route(tenant)
    emit(as_json, route_dict(route), f"tenant {route.tenant} -> {route.stamp} (version {route.version}, {route.state})")


@route_group.command("list")
@click.option("--stamp", default=None, help="Only tenants routed to this stamp.")
@JSON
@click.pass_context
def route_list(ctx: click.Context, stamp: str | None, as_json: bool) -> None:
    """List every route."""
    routes = context_of(ctx).catalog.routes(stamp)
    emit(
        as_json,
        [route_dict(r) for r in routes],
        render.table(
            ["tenant", "stamp", "version", "state"], [[r.tenant, r.stamp, r.version, r.state] for r in routes]
        ),
    )


# -- tenants ----------------------------------------------------------------------------------------------


@cli.group("tenant")
def tenant_group() -> None:
    """Tenants as the stamps hold them."""


@tenant_group.command("list")
@click.option("--stamp", default=None, help="Only this stamp.")
@click.option("--sizes", is_flag=True, help="Also measure bytes (sum of pg_column_size of the rows; scans tables).")
@JSON
@click.pass_context
def tenant_list(ctx: click.Context, stamp: str | None, sizes: bool, as_json: bool) -> None:
    """Tenants with row counts (and with --sizes, bytes) per stamp, and whether the catalog routes them there."""
    from migrator.stamps.inventory import list_tenants
    from migrator.stamps.sizes import human_bytes

    rows = list_tenants(context_of(ctx), stamp, sizes=sizes)
    headers = ["stamp", "tenant", "rows", *(["bytes"] if sizes else []), "routed here"]
    emit(
        as_json,
        rows,
        render.table(
            headers,
            [
                [
                    r["stamp"],
                    r["tenant"],
                    r["rows"],
                    *([human_bytes(r["bytes"])] if sizes else []),
                    "yes" if r["routed"] else "NO",
                ]
                for r in rows
            ],
        ),
    )
