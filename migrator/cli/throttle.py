"""Throttling: the flags every command that copies takes (`throttle_flags`, within `move_flags`, the
bundle of `move` and `apply`), and `migrator throttle`, the fleet's limits that running moves and
workers re-read within seconds."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import click

from migrator.cli import render
from migrator.cli.base import (
    ALLOW_TRIGGERS,
    BATCH_ROWS,
    JOBS,
    JSON,
    METRICS_PORT,
    OVERRIDE_POLICY,
    EngineDefault,
    F,
    cli,
    context_of,
    emit,
    options,
    override_reason,
)

if TYPE_CHECKING:
    from migrator.move.throttle import ThrottleOptions


def _replica_wait_default() -> float | None:
    from migrator.move.throttle import ThrottleOptions

    return ThrottleOptions().replica_wait_s


# The fleet's limits as a move's own flags (each stricter than the fleet's): flag, type, metavar, help.
_LIMIT_OPTIONS = tuple(
    click.option(flag, type=kind, default=None, metavar=metavar, help=text)
    for flag, kind, metavar, text in (
        (
            "--max-replica-lag",
            click.FloatRange(min=0, min_open=True),
            "SECONDS",
            "Pause copying while a standby of the source or target replays more than this far behind.",
        ),
        (
            "--max-slot-lag",
            click.IntRange(min=1),
            "BYTES",
            "Pause copying while a logical replication slot of the source or target retains more WAL.",
        ),
        (
            "--max-active-sessions",
            click.IntRange(min=1),
            "N",
            "Pause copying while more than N other sessions are active on the source or target.",
        ),
        (
            "--critical-load",
            click.IntRange(min=1),
            "N",
            "Stop the move (unfenced, resumable) once N other sessions are active on a stamp.",
        ),
    )
)


def throttle_flags(command: F) -> F:
    """Add the throttle flags to a command; it receives them as one `throttle: ThrottleOptions` argument."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from migrator.catalog import Limits
        from migrator.move.throttle import ThrottleOptions

        limits = Limits(
            kwargs.pop("max_replica_lag"),
            kwargs.pop("max_slot_lag"),
            kwargs.pop("max_active_sessions"),
            kwargs.pop("critical_load"),
        )
        wait, skip = kwargs.pop("replica_wait"), kwargs.pop("no_replica_wait")
        return command(*args, throttle=ThrottleOptions(limits, None if skip else wait), **kwargs)

    bundle = options(
        *_LIMIT_OPTIONS,
        click.option(
            "--replica-wait",
            type=click.FloatRange(min=0),
            default=EngineDefault(_replica_wait_default),
            show_default=True,
            metavar="SECONDS",
            help="Before the flip, wait this long at most for the target's standbys to replay the move.",
        ),
        click.option("--no-replica-wait", is_flag=True, help="Flip without waiting for the target's standbys."),
    )
    return bundle(wrapper)  # type: ignore[arg-type,return-value]


@dataclass(frozen=True)
class MoveFlags:
    """The flags of every command that runs moves here (`move`, `apply`), as one argument `flags`."""

    batch_rows: int
    jobs: int
    allow_triggers: bool
    override_reason: str | None  # --override-policy --reason TEXT (None without the flag)
    metrics_port: int | None
    throttle: ThrottleOptions


def move_flags(command: F) -> F:
    """Add --batch-rows, --jobs, --allow-triggers, --override-policy/--reason, --metrics-port and the
    throttle flags to a command; it receives them as one `flags: MoveFlags` argument."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        flags = MoveFlags(
            batch_rows=kwargs.pop("batch_rows"),
            jobs=kwargs.pop("jobs"),
            allow_triggers=kwargs.pop("allow_triggers"),
            override_reason=override_reason(kwargs.pop("override_policy"), kwargs.pop("reason")),
            metrics_port=kwargs.pop("metrics_port"),
            throttle=kwargs.pop("throttle"),
        )
        return command(*args, flags=flags, **kwargs)

    bundle = options(BATCH_ROWS, JOBS, throttle_flags, ALLOW_TRIGGERS, OVERRIDE_POLICY, METRICS_PORT)
    return bundle(wrapper)  # type: ignore[arg-type,return-value]


@cli.group("throttle")
def throttle_group() -> None:
    """Show or set the fleet's throttle limits, which running moves and workers follow within seconds."""


@throttle_group.command("show")
@JSON
@click.pass_context
def throttle_show(ctx: click.Context, as_json: bool) -> None:
    """Print the fleet's throttle limits (a move's own flags can only make them stricter)."""
    from dataclasses import asdict

    from migrator.move.throttle import describe

    limits = context_of(ctx).catalog.limits()
    emit(as_json, asdict(limits), render.table(["limit", "value"], describe(limits)))


@throttle_group.command("set")
@_LIMIT_OPTIONS[0]
@_LIMIT_OPTIONS[1]
@_LIMIT_OPTIONS[2]
@_LIMIT_OPTIONS[3]
@click.option("--clear", is_flag=True, help="Remove every limit not given with this command.")
@JSON
@click.pass_context
def throttle_set(ctx: click.Context, clear: bool, as_json: bool, **given: Any) -> None:
    """Set the fleet's throttle limits; running moves and workers follow them within seconds."""
    from dataclasses import asdict, replace

    from migrator.catalog import Limits
    from migrator.move.throttle import describe

    catalog = context_of(ctx).catalog
    base = Limits() if clear else catalog.limits()
    fields = {
        "max_replica_lag_s": given["max_replica_lag"],
        "max_slot_lag_bytes": given["max_slot_lag"],
        "max_active_sessions": given["max_active_sessions"],
        "critical_load": given["critical_load"],
    }
    if not clear and all(value is None for value in fields.values()):
        raise click.UsageError("give a limit to set (or --clear to remove them)")
    limits = catalog.set_limits(replace(base, **{k: v for k, v in fields.items() if v is not None}))
    emit(as_json, asdict(limits), render.table(["limit", "value"], describe(limits)))
