"""The local fleet commands."""

from __future__ import annotations

import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from migrator.cli import render
from migrator.cli.base import cli, context_of

F = TypeVar("F", bound=Callable[..., Any])

# -- local fleet ------------------------------------------------------------------------------------------


@cli.group("fleet")
def fleet_group() -> None:
    """A local fleet of real PostgreSQL servers for demos, tests and benchmarks."""


def _fleet_dir(what: str) -> Callable[[F], F]:
    """`--dir` of `fleet up` and `fleet down`: the fleet's directory (default .fleet)."""
    return click.option(
        "--dir", "directory", type=click.Path(file_okay=False, path_type=Path), default=Path(".fleet"),
        show_default=True, help=what,
    )  # fmt: skip


@fleet_group.command("up")
@_fleet_dir("Where the servers' data and migrator.toml go.")
@click.option("--stamps", type=click.IntRange(min=1, max=64), default=3, show_default=True, help="How many stamps.")
@click.option(
    "--servers",
    type=click.IntRange(min=1, max=16),
    default=1,
    show_default=True,
    help="Spread the stamps over this many PostgreSQL servers.",
)
@click.option(
    "--replicas",
    type=click.IntRange(min=0, max=3),
    default=0,
    show_default=True,
    help="Streaming standbys of each server (for the throttle and the cutover's replica wait).",
)
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
@click.option(
    "--heavy-rows",
    type=click.IntRange(min=0),
    default=1_000_000,
    show_default=True,
    help="Rows of the heavy tenant (the first id).",
)
@click.option("--small", type=click.IntRange(min=0), default=30, show_default=True, help="How many small tenants.")
@click.option("--first-id", type=click.IntRange(min=1), default=1, show_default=True, help="Id of the first tenant.")
@click.pass_context
def fleet_seed(ctx: click.Context, stamp: str, heavy_rows: int, small: int, first_id: int) -> None:
    """Fill a stamp with one heavy tenant and many small ones, and route them there."""
    from migrator.local.fleet import seed_stamp

    counts = seed_stamp(context_of(ctx), stamp, heavy_rows, small, first_id)
    click.echo(f"seeded {len(counts)} tenants, {sum(counts.values())} rows on {stamp}")
