"""The fleet commands: stamps as code (`fleet plan`, `fleet apply`) and the local fleet (`fleet up|down|seed`)."""

from __future__ import annotations

import inspect
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from migrator.cli import render
from migrator.cli.base import JSON, cli, context_of, emit, engine_option
from migrator.errors import BadInput

if TYPE_CHECKING:
    from migrator.provision.reconcile import Change, FleetPlan

F = TypeVar("F", bound=Callable[..., Any])


@cli.group("fleet")
def fleet_group() -> None:
    """The fleet as code (plan, apply a file of stamps), and a local fleet of real PostgreSQL servers
    for demos, tests and benchmarks (up, down, seed)."""


# -- stamps as code ---------------------------------------------------------------------------------------

FLEET_FILE = click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
SIGNS = {"create": "+", "update": "~", "drain": "~", "activate": "~", "retire": "-"}


@fleet_group.command("plan")
@FLEET_FILE
@JSON
@click.pass_context
def fleet_plan(ctx: click.Context, file: Path, as_json: bool) -> None:
    """Show what `fleet apply FILE` would create, update, set draining or retire (changes nothing).

    FILE (YAML, or TOML by its suffix) lists the stamps; stamps the catalog has and the file does not
    are listed and left as they are. Exit 2 when the catalog would refuse a change.
    """
    from migrator.provision.reconcile import plan

    found = plan(context_of(ctx), file)
    emit(as_json, _plan_data(found), _plan_text(found))
    if found.refused:
        raise BadInput(f"{len(found.refused)} change(s) refused; `fleet apply` would change nothing")


@fleet_group.command("apply")
@FLEET_FILE
@click.pass_context
def fleet_apply(ctx: click.Context, file: Path) -> None:
    """Make the catalog match FILE: create stamps (as `stamp create` does), change their attributes and states.

    Everything that can be checked is checked before the first change: a refused change (retiring a
    stamp that holds tenants), a DSN that does not connect, a database `stamp create` would refuse.
    """
    from migrator.provision.reconcile import apply

    applied = apply(context_of(ctx), file)
    if not applied.done:
        click.echo("nothing to change")
        return
    click.echo(_plan_text(applied.plan))
    click.echo(f"applied {len(applied.done)} change(s)")


def _line(change: Change) -> str:
    text = f"{SIGNS[change.action]} {change.action} {change.stamp}: {', '.join(change.details)}"
    return text + (f" (refused: {change.refused})" if change.refused else "")


def _plan_text(found: FleetPlan) -> str:
    lines = [_line(c) for c in found.changes]
    if found.not_in_file:
        lines.append(f"  not in {found.source.name}, left as they are: {', '.join(found.not_in_file)}")
    if not found.changes:
        return "\n".join([*lines, "nothing to change"])
    counts = {action: sum(1 for c in found.changes if c.action == action) for action in SIGNS}
    wording = {"create": "to create", "update": "to update", "drain": "to set draining", "activate": "to set active",
               "retire": "to retire"}  # fmt: skip
    summary = ", ".join(f"{n} {wording[action]}" for action, n in counts.items() if n)
    return "\n".join([*lines, f"plan: {summary}"])


def _plan_data(found: FleetPlan) -> dict[str, Any]:
    changes = [
        {"stamp": c.stamp, "action": str(c.action), "details": list(c.details), "refused": c.refused}
        for c in found.changes
    ]
    return {"file": str(found.source), "changes": changes, "not_in_file": list(found.not_in_file)}


# -- local fleet ------------------------------------------------------------------------------------------


def _fleet_dir(what: str) -> Callable[[F], F]:
    """`--dir` of `fleet up` and `fleet down`: the fleet's directory (default .fleet)."""
    return click.option(
        "--dir", "directory", type=click.Path(file_okay=False, path_type=Path), default=Path(".fleet"),
        show_default=True, help=what,
    )  # fmt: skip


def _up_default(name: str) -> Callable[[], Any]:
    """A default of `fleet_up`'s own parameter, defined there once."""

    def read() -> Any:
        from migrator.local.fleet import fleet_up

        return inspect.signature(fleet_up).parameters[name].default

    return read


def _seed_default(name: str) -> Callable[[], Any]:
    """A default of `demo_tenants`' own parameter (the demo's tenants), defined there once."""

    def read() -> Any:
        from migrator.local.seed import demo_tenants

        return inspect.signature(demo_tenants).parameters[name].default

    return read


@fleet_group.command("up")
@_fleet_dir("Where the servers' data and migrator.toml go.")
@engine_option("--stamps", _up_default("stamps"), "How many stamps.", click.IntRange(min=1, max=64))
@engine_option(
    "--servers",
    _up_default("servers"),
    "Spread the stamps over this many PostgreSQL servers.",
    click.IntRange(min=1, max=16),
)
@engine_option(
    "--replicas", _up_default("replicas"),
    "Streaming standbys of each server (for the throttle and the cutover's replica wait).",
    click.IntRange(min=0, max=3),
)  # fmt: skip
def fleet_up(directory: Path, stamps: int, servers: int, replicas: int) -> None:
    """Start local PostgreSQL, create the catalog and N stamps at head, write DIR/migrator.toml.

    On a failure every server it started is stopped again; on success it prints the `export` line to use it.
    """
    from migrator.local.fleet import fleet_up as up

    info = up(directory, stamps, servers, replicas)
    click.echo(f"fleet up: config {info.config_path}")
    click.echo(render.table(["name", "dsn"], [["catalog", info.masked_catalog], *info.masked_stamps]))
    click.echo("\nso that the next commands use this fleet, run:")
    click.echo(f"export MIGRATOR_CONFIG={shlex.quote(str(info.config_path))}")


@fleet_group.command("down")
@_fleet_dir("The directory given to `fleet up`.")
def fleet_down(directory: Path) -> None:
    """Stop the local fleet's servers."""
    from migrator.local.fleet import fleet_down as down

    click.echo(f"stopped {down(directory)} server(s)")


@fleet_group.command("seed")
@click.argument("stamp")
@engine_option(
    "--heavy-rows", _seed_default("heavy_rows"), "Rows of the heavy tenant (the first id).", click.IntRange(min=0)
)
@engine_option("--small", _seed_default("small"), "How many small tenants.", click.IntRange(min=0))
@engine_option("--first-id", _seed_default("first_id"), "Id of the first tenant.")
@click.pass_context
def fleet_seed(ctx: click.Context, stamp: str, heavy_rows: int, small: int, first_id: int) -> None:
    """Fill a stamp with one heavy tenant and many small ones, and route them there."""
    from migrator.local.fleet import seed_stamp

    counts = seed_stamp(context_of(ctx), stamp, heavy_rows, small, first_id)
    click.echo(f"seeded {len(counts)} tenants, {sum(counts.values())} rows on {stamp}")
