"""Catalog, stamp, route and tenant commands."""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import click

from migrator import config as configlib
from migrator.cli import render
from migrator.cli.base import JSON, bundle, cli, context_of, emit, route_dict
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

NO_CHECK = click.option("--no-check", is_flag=True, help="Do not check that the DSN connects (record it as given).")
KIND = click.option(
    "--kind",
    type=click.Choice(["shared", "dedicated"]),
    default=None,
    help="shared (many tenants; the default) or dedicated (one tenant at most): placement checks it.",
)


@cli.group("stamp")
def stamp_group() -> None:
    """Register and list stamps."""


@dataclass(frozen=True)
class Placed:
    """Where a new stamp sits and how much it may hold (`stamp add`, `stamp create`)."""

    region: str | None
    capacity_rows: int | None
    capacity_bytes: int | None


PLACED = bundle(
    "placed",
    Placed,
    click.option("--region", default=None, help="Region label, for placement and reports."),
    click.option("--capacity-rows", type=click.IntRange(min=1), default=None, help="How many tenant rows it may hold."),
    click.option("--capacity-bytes", type=click.IntRange(min=1), default=None, help="How many bytes of tenant data."),
)


@stamp_group.command("add")
@click.argument("name")
@click.option("--dsn", required=True, help="libpq URL, keyword string or service name of the stamp's database.")
@PLACED
@KIND
@NO_CHECK
@click.pass_context
def stamp_add(ctx: click.Context, name: str, dsn: str, placed: Placed, kind: str | None, no_check: bool) -> None:
    """Register a stamp in the catalog, once its DSN has connected."""
    from migrator.stamps.registry import add_stamp

    where = (placed.region, placed.capacity_rows, placed.capacity_bytes)
    stamp = add_stamp(context_of(ctx), name, dsn, *where, check=not no_check, kind=kind or "shared")
    click.echo(f"added stamp {stamp.name} ({stamp.masked_dsn})")


@stamp_group.command("create")
@click.argument("name")
@click.option("--dsn", required=True, help="libpq URL, keyword string or service name of the new stamp's database.")
@PLACED
@click.option(
    "--state",
    type=click.Choice(["active", "draining"]),
    default="active",
    show_default=True,
    help="draining: provisioned and registered, but receiving no tenants yet.",
)
@KIND
@click.option(
    "--adopt", is_flag=True, help="Take a database that already holds the application's tables (else refused)."
)
@click.pass_context
def stamp_create(
    ctx: click.Context, name: str, dsn: str, placed: Placed, state: str, kind: str | None, adopt: bool
) -> None:
    """Provision a stamp: bring an empty database to the fleet's revision with the stamps' Alembic
    environment, check it matches the fleet, then register it (one catalog transaction).

    A failure at any step registers nothing and says where the database was left.
    """
    from migrator.catalog import StampState
    from migrator.provision.create import NewStamp, create_stamp

    where = (placed.region, placed.capacity_rows, placed.capacity_bytes)
    new = NewStamp(name, dsn, *where, StampState(state), kind or "shared", adopt)
    created = create_stamp(context_of(ctx), new)
    stamp = created.stamp
    came = f"adopted at {created.from_revision or 'base'}, now" if adopt and created.adopted_tables else "provisioned"
    block = f", key block {stamp.key_block}" if stamp.key_block is not None else ""
    click.echo(
        f"created stamp {stamp.name}: {came} at revision {created.revision}, {stamp.state}, region "
        f"{stamp.region or '-'}, capacity {stamp.capacity_rows or 'unlimited'} rows, {stamp.kind}{block} "
        f"({stamp.masked_dsn})"
    )
    if created.revision != created.head:
        ahead = f"the fleet is at {created.revision}, behind head {created.head}"
        click.echo(f"{ahead}: `migrator schema upgrade` brings the fleet and this stamp along")


@stamp_group.command("remove")
@click.argument("name")
@click.pass_context
def stamp_remove(ctx: click.Context, name: str) -> None:
    """Delete a stamp no route, move or plan refers to (a mistaken registration); retire used ones instead."""
    context_of(ctx).catalog.remove_stamp(name)
    click.echo(f"removed stamp {name}")


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
            "kind": s.kind,
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
            ["stamp", "state", "region", "kind", "capacity rows", "dsn"],
            [[d["name"], d["state"], d["region"], d["kind"], d["capacity_rows"], d["dsn"]] for d in data],
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


@route_group.command("import")
@click.argument("file", required=False, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--stamp", default=None, help="Register every tenant of this stamp's root table ([tenancy] root_table).")
@click.option(
    "--residency",
    default=None,
    metavar="R[,R]",
    help="With --stamp: the regions every one of its tenants may live in (as `tenant set --residency`).",
)
@click.option(
    "--residency-column",
    default=None,
    metavar="COLUMN",
    help="With --stamp: each tenant's residency from this column of the root table (`eu`, `eu,us`; empty: anywhere).",
)
@JSON
@click.pass_context
def route_import(
    ctx: click.Context,
    file: Path | None,
    stamp: str | None,
    residency: str | None,
    residency_column: str | None,
    as_json: bool,
) -> None:
    """Register the tenants stamps already hold, with their residency: a CSV FILE of `tenant,stamp[,residency]`
    lines (header optional; residency `eu` or `eu|eu-west`, empty for anywhere) or every tenant of --stamp NAME
    (--residency for all, or --residency-column). One catalog transaction: refused whole if a stamp is unknown,
    a tenant is routed elsewhere or lives outside its residency; re-running it changes nothing."""
    from migrator.stamps import registry

    if file is not None and stamp is None:
        if residency is not None or residency_column is not None:
            raise click.UsageError("a CSV FILE gives each tenant's residency in its third column; --residency and "
                                   "--residency-column go with --stamp")  # fmt: skip
        done = registry.import_routes_from_file(context_of(ctx), file)
    elif stamp is not None and file is None:
        if residency is not None and residency_column is not None:
            raise click.UsageError("give --residency (every tenant) or --residency-column (each its own), not both")
        regions = tuple(dict.fromkeys(r.strip() for r in (residency or "").split(",") if r.strip()))
        if residency is not None and not regions:
            raise click.UsageError("--residency needs a region, or several separated by commas")
        chosen = registry.StampResidency(regions, residency_column)
        done = registry.import_routes_from_stamp(context_of(ctx), stamp, chosen)
    else:
        raise click.UsageError("give a CSV FILE of `tenant,stamp` lines or --stamp NAME, one of the two")
    emit(
        as_json,
        {"source": done.source, "new": done.new, "existing": done.existing},
        f"routes from {done.source}: {len(done.new)} new, {len(done.existing)} already there",
    )


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


@route_group.command("export")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["json", "csv", "nginx-map"]),
    default="json",
    show_default=True,
    help="JSON object tenant -> {stamp, version, state}, CSV, or an nginx `map $tenant $stamp` block.",
)
@click.option(
    "-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write here (atomically)."
)
@click.pass_context
def route_export(ctx: click.Context, fmt: str, output: Path | None) -> None:
    """Write the whole routing table for an edge router (to stdout, or atomically to a file)."""
    from migrator.catalog.export import ExportFormat, render_routes, write_atomically

    routes = context_of(ctx).catalog.routes()
    text = render_routes(routes, ExportFormat(fmt))
    if output is None:
        click.echo(text, nl=False)
        return
    write_atomically(output, text)
    click.echo(f"wrote {len(routes)} routes to {output}", err=True)


@route_group.command("watch")
@JSON
@click.pass_context
def route_watch(ctx: click.Context, as_json: bool) -> None:
    """Print each route change as it commits (JSON lines with --json), until stopped; for router sidecars."""
    import json

    from migrator.router import watch_routes

    for change in watch_routes(context_of(ctx).catalog.url):
        if as_json:
            line = json.dumps(
                {
                    "tenant": change.tenant,
                    "stamp": change.stamp,
                    "version": change.version,
                    "state": change.state,
                    "op": change.op,
                },
                sort_keys=True,
            )
        else:
            line = f"tenant {change.tenant} -> {change.stamp} (version {change.version}, {change.state}, {change.op})"
        click.echo(line)
        sys.stdout.flush()


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
    headers = ["stamp", "tenant", "rows", *(["bytes"] if sizes else []), "routed here", "residency", "tier"]
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
                    "|".join(r["residency"]) if r["residency"] else "any",
                    r["tier"],
                ]
                for r in rows
            ],
        ),
    )


def _labels(value: str | None) -> tuple[str, ...] | None:
    """A comma-separated option value as a tuple (None: the option was not given)."""
    return None if value is None else tuple(dict.fromkeys(v.strip() for v in value.split(",") if v.strip()))


@tenant_group.command("set")
@click.argument("tenant")
@click.option("--residency", default=None, help="Regions the tenant's rows may live in (R[,R...]), or `any`.")
@click.option(
    "--tier", type=click.Choice(["shared", "dedicated"]), default=None, help="dedicated: a dedicated stamp of its own."
)
@click.option(
    "--anti-affinity",
    default=None,
    help="Labels (L[,L...]; empty to clear): never on a stamp with a tenant sharing one.",
)
@click.pass_context
def tenant_set(
    ctx: click.Context, tenant: str, residency: str | None, tier: str | None, anti_affinity: str | None
) -> None:
    """Set where a tenant may live: its residency, tier and anti-affinity labels (checked by every move and plan)."""
    from migrator.catalog import policy

    regions = _labels(residency)
    anywhere = regions == ("any",)
    if regions == ():
        raise click.UsageError("--residency needs at least one region, or `any`")
    change = policy.Change(
        None if anywhere else regions, anywhere, policy.Tier(tier) if tier else None, _labels(anti_affinity)
    )
    if change == policy.Change():
        raise click.UsageError("nothing to set: give --residency, --tier or --anti-affinity")
    (placed,) = policy.set_placement(context_of(ctx).catalog, [tenant], change)
    click.echo(
        f"tenant {placed.tenant}: residency {'|'.join(placed.residency) if placed.residency else 'any'}, "
        f"tier {placed.tier}, anti-affinity {','.join(placed.anti_affinity) or '-'}"
    )


# -- audit ------------------------------------------------------------------------------------------------


@cli.command("audit")
@click.option("--tenant", default=None, help="Only records naming this tenant.")
@click.option("--since", type=click.DateTime(), default=None, help="Only records from this date (or time) on.")
@click.option("--cross-region", is_flag=True, help="Only moves whose source and target regions differ.")
@JSON
@click.pass_context
def audit_cmd(
    ctx: click.Context, tenant: str | None, since: datetime | None, cross_region: bool, as_json: bool
) -> None:
    """The audit trail: every route change, policy override and plan apply, who made it, when and why."""
    from dataclasses import asdict

    from migrator.catalog import audit

    found = audit.trail(context_of(ctx).catalog, tenant, since and since.astimezone(), cross_region)
    emit(
        as_json,
        [asdict(r) for r in found],
        render.table(
            ["at", "actor", "role", "action", "tenants", "from", "to", "move", "reason"],
            [
                [
                    r.at.isoformat(timespec="seconds"),
                    r.actor,
                    r.db_role,
                    r.action,
                    ",".join(r.tenants),
                    f"{r.from_stamp} ({r.from_region})" if r.from_stamp else "",
                    f"{r.to_stamp} ({r.to_region})" if r.to_stamp else "",
                    r.move_id or "",
                    r.reason or "",
                ]
                for r in found
            ],
        ),
    )
