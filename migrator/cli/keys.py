"""`migrator keys`: the fleet's sequence-backed keys, their collisions, and each stamp's block of ids."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from migrator.cli import render
from migrator.cli.base import JSON, YES, cli, confirm, context_of, emit, engine_option

if TYPE_CHECKING:  # the engine is imported when the command runs, which keeps `migrator --help` fast
    from migrator.stamps.keyspace import KeyReport, Stride


def _per_server() -> int:
    from migrator.stamps.fanout import PER_SERVER

    return PER_SERVER


PER_SERVER = engine_option(
    "--connections-per-server", _per_server, "Sessions on one PostgreSQL server at once while surveying."
)


@cli.group("keys")
def keys_group() -> None:
    """Show where the stamps' sequence-backed ids collide, and give each stamp its own block of new ids."""


@keys_group.command("check")
@PER_SERVER
@JSON
@click.pass_context
def keys_check(ctx: click.Context, connections_per_server: int, as_json: bool) -> None:
    """Show each stamp's ids in use per sequence-backed key; exit 3 when some tenant's ids collide elsewhere."""
    from migrator.errors import KeysCollide
    from migrator.stamps.keyspace import check

    report = check(context_of(ctx), connections_per_server)
    emit(as_json, _check_data(report), _check_text(report))
    if report.collisions:
        raise KeysCollide()


def _check_data(report: KeyReport) -> dict[str, Any]:
    return {
        "strided": report.strided,
        "stamps": [
            {
                "stamp": s.stamp.name,
                "block": s.stamp.key_block,
                "error": s.error,
                "keys": [
                    {
                        "key": k.label,
                        "sequence": k.sequence,
                        "type": k.type,
                        "unique": k.unique,
                        "lowest": k.lowest,
                        "highest": k.highest,
                        "next_value": k.next_value,
                    }
                    for k in s.keys
                ],
            }
            for s in report.stamps
        ],
        "overlaps": [vars(o) for o in report.overlaps],
        "collisions": [vars(c) for c in report.collisions],
        "narrow": [{"key": k.label, "type": k.type, "widen": k.widen_hint()} for k in report.narrow],
    }


def _check_text(report: KeyReport) -> str:
    from migrator.stamps.sequences import block_of

    rows = []
    for found in report.stamps:
        if found.error:
            rows.append([found.stamp.name, found.stamp.key_block or "-", "", "", "", "", f"UNREACHABLE: {found.error}"])
        for k in found.keys:
            in_use = f"{k.lowest}..{k.highest}" if k.lowest is not None else ("empty" if k.unique else "-")
            note = "cannot collide (no unique index on it alone)" if not k.unique else ""
            if k.narrow:
                note = f"{k.type}: too narrow to stride"
            elif found.stamp.key_block not in (None, block_of(k.next_value)):
                note = "sequence outside the stamp's block"
            rows.append([found.stamp.name, found.stamp.key_block or "-", k.label, k.type, in_use, k.next_value, note])
    parts = [render.table(["stamp", "block", "key", "type", "ids in use", "next id", "note"], rows)]
    if report.overlaps:
        parts.append(
            render.table(
                ["key", "stamps", "ids in both ranges", "colliding rows"],
                [[o.key, f"{o.first} / {o.second}", f"{o.low}..{o.high}", o.colliding] for o in report.overlaps],
            )
        )
    if report.collisions:
        parts.append(
            render.table(
                ["tenant", "on", "cannot move to", "key", "rows"],
                [[c.tenant, c.source, c.target, c.key, c.rows] for c in report.collisions],
            )
        )
    for key in report.narrow:
        parts.append(f"{key.label} is {key.type}: too few ids to split across a fleet; widen it: {key.widen_hint()}")
    tenants = len({c.tenant for c in report.collisions})
    strided = "strided (each stamp hands out ids from its own block)" if report.strided else "NOT strided"
    if tenants:
        parts.append(
            f"{tenants} tenants have rows whose ids another stamp's tenants hold; they cannot move there. "
            f"The fleet is {strided}."
            + ("" if report.strided else " `migrator keys stride` keeps new ids from colliding;")
            + " existing ids stay as they are: move such tenants only where they do not collide, or renumber them"
        )
    else:
        parts.append(f"no tenant's ids collide on another stamp; the fleet is {strided}")
    return "\n".join(parts)


@keys_group.command("stride")
@click.option("--dry-run", is_flag=True, help="Show each stamp's block and what would restart; change nothing.")
@YES
@PER_SERVER
@JSON
@click.pass_context
def keys_stride(ctx: click.Context, dry_run: bool, yes: bool, connections_per_server: int, as_json: bool) -> None:
    """Give every stamp a disjoint block of each bigint sequence, so that ids written from now on never collide."""
    from migrator.stamps.keyspace import stride

    context = context_of(ctx)
    if not dry_run and not yes and not as_json:
        planned = stride(context, dry_run=True, per_server=connections_per_server)
        click.echo(_stride_text(planned), err=True)
        confirm(f"restart {planned.restarted} sequences on {len(planned.stamps)} stamps in their blocks?")
    done = stride(context, dry_run=dry_run, per_server=connections_per_server)
    emit(as_json, _stride_data(done), _stride_text(done))


def _stride_data(done: Stride) -> dict[str, Any]:
    return {
        "dry_run": done.dry_run,
        "stamps": [
            {"stamp": s.stamp, "block": s.block, "sequences": [vars(p) for p in s.placements]} for s in done.stamps
        ],
        "narrow": [k.label for k in done.narrow],
    }


def _stride_text(done: Stride) -> str:
    from migrator.stamps.sequences import block_range

    rows = []
    for s in done.stamps:
        low, high = block_range(s.block)
        for p in s.placements:
            action = "stays (inside its block)" if p.restart_at is None else f"restarts at {p.restart_at}"
            if done.dry_run and p.restart_at is not None:
                action = f"would restart at {p.restart_at}"
            rows.append([s.stamp, f"{s.block} ({low}..{high})", p.sequence, ", ".join(p.keys), p.next_value, action])
        if not s.placements:
            rows.append([s.stamp, f"{s.block} ({low}..{high})", "-", "no bigint sequence", "", ""])
    lines = [render.table(["stamp", "block", "sequence", "keys", "next id", ""], rows)]
    lines += [
        f"{label} is int4/int2: not strided (see `migrator keys check`)" for label in {k.label for k in done.narrow}
    ]
    verb = "would restart" if done.dry_run else "restarted"
    lines.append(f"{verb} {done.restarted} sequences; ids written before stay as they are (`migrator keys check`)")
    return "\n".join(lines)
