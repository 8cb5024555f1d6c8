"""Move, verify, cleanup and doctor commands."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import click

from migrator.cli import render
from migrator.cli.base import (
    ALLOW_TRIGGERS,
    JOBS,
    JSON,
    NO_PROGRESS,
    NO_REVERT_WINDOW,
    RUN_FLAGS,
    YES,
    DefaultGroup,
    F,
    cli,
    confirm,
    context_of,
    emit,
    engine_option,
    options,
    route_dict,
)
from migrator.cli.throttle import MoveFlags, move_flags, throttle_flags
from migrator.errors import BadInput, CheckFailed, Interrupted, VerifyMismatch

if TYPE_CHECKING:
    from migrator.move import CutoverOptions, MoveOptions
    from migrator.move.throttle import ThrottleOptions


def _move_defaults() -> MoveOptions:
    """The engine's defaults for `move` (imported here: the engine loads Alembic, `--help` must not)."""
    from migrator.move import MoveOptions

    return MoveOptions()


def _cutover_defaults() -> CutoverOptions:
    return _move_defaults().cutover


def cutover_flags(command: F) -> F:
    """The online cutover's flags (`move`, `move revert`), passed on as one `cutover: CutoverOptions`."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from dataclasses import replace

        cutover = replace(
            _cutover_defaults(),
            cutover_backlog=kwargs.pop("cutover_backlog"),
            catchup_timeout_s=kwargs.pop("catchup_timeout"),
            max_freeze_ms=kwargs.pop("max_freeze_ms"),
        )
        return command(*args, cutover=cutover, **kwargs)

    return options(
        engine_option(
            "--cutover-backlog",
            lambda: _cutover_defaults().cutover_backlog,
            "Online: enter the cutover once at most this many captured changes are pending.",
            click.IntRange(min=0),
        ),
        engine_option(
            "--catchup-timeout",
            lambda: _cutover_defaults().catchup_timeout_s,
            "Online: seconds catch-up may take to reach the backlog before the move stops, resumable.",
            click.FloatRange(min=1),
        ),
        engine_option(
            "--max-freeze-ms",
            lambda: _cutover_defaults().max_freeze_ms,
            "Online: longest write freeze allowed; a longer cutover unfences, backs off and retries.",
            click.FloatRange(min=1),
        ),
    )(wrapper)  # type: ignore[return-value]


# -- moves ------------------------------------------------------------------------------------------------


@cli.group("move", cls=DefaultGroup)
def move_group() -> None:
    """Move tenants to another stamp; show, abort or revert a move."""


def _read_tenants(path: str | None, listed: tuple[str, ...]) -> tuple[str, ...]:
    """The tenants named on the command line, then those of --tenants-file (one per line; blank
    lines and `#` comments skipped)."""
    from_file: list[str] = []
    if path is not None:
        with open(path, encoding="utf-8") as lines:
            from_file = [line.split("#", 1)[0].strip() for line in lines]
    return (*listed, *(t for t in from_file if t))


@move_group.command("run", hidden=True)  # `migrator move TENANT...`: the group's help shows its options
@click.argument("tenants", nargs=-1)
@click.option(
    "--tenants-file",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="File of tenants to move with those named, one per line: all of them move as one cohort.",
)
@click.option("--move", "move_id", type=int, default=None, help="Resume this unfinished move (a cohort) by its id.")
@click.option("--to", "target", default=None, help="Target stamp.")
@click.option("--rate-limit", type=click.FloatRange(min=1), default=None, help="Copy at most this many rows/s.")
@click.option("--dry-run", is_flag=True, help="Run the preflight checks and show the plan; change nothing.")
@click.option("--offline", is_flag=True, help="Fence the tenant for the whole copy instead of only the cutover.")
@cutover_flags
@NO_REVERT_WINDOW
@move_flags
@RUN_FLAGS
@click.pass_context
def move_run(
    ctx: click.Context,
    tenants: tuple[str, ...],
    tenants_file: str | None,
    move_id: int | None,
    target: str | None,
    rate_limit: float | None,
    dry_run: bool,
    offline: bool,
    cutover: CutoverOptions,
    no_revert_window: bool,
    flags: MoveFlags,
    yes: bool,
    no_progress: bool,
    as_json: bool,
) -> None:
    """Move TENANTS to another stamp (online by default), several as one cohort: all their routes flip
    together or none does. Re-running it (or `--move ID`) resumes an interrupted move."""
    from dataclasses import replace

    from migrator.catalog import name_tenants
    from migrator.interrupts import stop_on_signals
    from migrator.move import move_tenants, resume_move
    from migrator.move.stopped import stopped_move

    cohort = _read_tenants(tenants_file, tenants)
    if move_id is not None and cohort:
        raise click.UsageError("--move resumes the move's own tenants; name no tenant with it")
    if move_id is None and not cohort:
        raise click.UsageError("Missing argument 'TENANTS...' (or --tenants-file FILE, or --move ID to resume)")
    if move_id is None and not target:
        raise click.UsageError("Missing option '--to'.")
    context = context_of(ctx)
    if not (yes or dry_run):
        if move_id is not None:
            confirm(f"Resume move {move_id}?")
        else:
            homes = sorted({r.stamp for r in context.catalog.routes_of(cohort)}) or ["(unknown)"]
            confirm(f"Move {name_tenants(cohort)} from {', '.join(homes)} to {target}?")
    options = replace(
        _move_defaults(),
        batch_rows=flags.batch_rows,
        jobs=flags.jobs,
        rate_limit=rate_limit,
        dry_run=dry_run,
        online=not offline,
        allow_triggers=flags.allow_triggers,
        override_reason=flags.override_reason,
        revert_window=not no_revert_window,
        cutover=cutover,
        throttle=flags.throttle,
    )
    with stop_on_signals() as stop:  # Ctrl-C, SIGTERM: the move ends at its next safe point
        try:
            with context.metrics.serve(flags.metrics_port), render.progress(not (as_json or no_progress)) as progress:
                if move_id is not None:
                    outcome = resume_move(context, move_id, options, progress, stop.event)
                else:
                    assert target is not None
                    outcome = move_tenants(context, cohort, target, options, progress, stop.event)
        except Interrupted as exc:
            if not stop.asked or exc.move_id is None:
                raise
            raise stopped_move(context, exc.move_id, stop) from None
    who = name_tenants(outcome.tenants)
    if dry_run:
        text = (
            f"dry run: {who} {outcome.source} -> {outcome.target}: preflight passed; would copy\n"
            + render.table(
                ["table", "rows", "found by"],
                [(name, rows, outcome.reached.get(name)) for name, rows in sorted(outcome.tables.items())],
            )
            + (f"\nglobal (left alone): {', '.join(outcome.global_tables)}" if outcome.global_tables else "")
            + "".join(
                f"\nlooks like a reference but is no foreign key: {s}; declare it in [tenancy.references] if it is one"
                for s in outcome.suspects
            )
            + "".join(f"\nskipped: {what} (not a table; no rows of its own)" for what in outcome.skipped)
        )
        emit(
            as_json,
            {
                "dry_run": True,
                "tenants": list(outcome.tenants),
                "source": outcome.source,
                "target": outcome.target,
                "tables": outcome.tables,
                "reached": outcome.reached,
                "global_tables": list(outcome.global_tables),
                "suspects": list(outcome.suspects),
                "not_moved": outcome.not_moved,
                "skipped": list(outcome.skipped),
                "resuming_move": outcome.move.id if outcome.move else None,
            },
            text,
        )
        return
    assert outcome.move is not None and outcome.routes
    first = outcome.routes[0]
    emit(
        as_json,
        {
            "move": outcome.move,
            **({"route": route_dict(first)} if len(outcome.routes) == 1 else {}),
            "routes": [route_dict(route) for route in outcome.routes],
            "resumed": outcome.resumed,
            "seconds": outcome.timings,
            "freeze_steps_ms": outcome.freeze_steps_ms,
            "not_moved": outcome.not_moved,
            "skipped": list(outcome.skipped),
        },
        f"move {outcome.move.id}: {who} now on {first.stamp} ("
        + (f"route version {first.version}" if len(outcome.routes) == 1 else "every route's version +1")
        + f"), {outcome.move.rows_copied} rows copied and verified",
    )


def _copy_rows(copied: Any) -> list[list[Any]]:
    """A row per table of `move status`, and one per key range of a table copied in parts."""

    def key(bound: list[str] | None, end: str) -> str:
        return ", ".join(bound) if bound else end

    rows: list[list[Any]] = []
    for t in copied.tables:
        rows.append(
            [
                t.table,
                f"{t.rows:,}",
                f"{t.at_start:,}",
                f"{t.written_since:,}" if t.written_since else "",
                "yes" if t.done else "",
            ]
        )
        if len(t.ranges) > 1:
            rows += [
                [f"  ({key(r.lower, 'start')} .. {key(r.upto, 'end')}]", f"{r.rows:,}", "", "", "yes" if r.done else ""]
                for r in t.ranges
            ]
    return rows


def _move_dict(move: Any) -> dict[str, Any]:
    return {f.name: getattr(move, f.name) for f in move.__dataclass_fields__.values()}


@move_group.command("status")
@click.argument("move_id", type=int, required=False)
@JSON
@click.pass_context
def move_status(ctx: click.Context, move_id: int | None, as_json: bool) -> None:
    """Show one move with its per-table progress, or the latest moves."""
    context = context_of(ctx)
    catalog = context.catalog
    if move_id is not None:
        from migrator.move.status import copy_status, window_status

        move = catalog.move(move_id)
        copied = copy_status(context, move)
        window = window_status(context, move)
        data = {**_move_dict(move), "copy": copied, "window": window}
        text = "\n".join(
            [
                f"move {move.id}: {move.who} {move.source} -> {move.target} [{move.mode}] phase {move.phase}",
                *([f"revert of move {move.reverts}"] if move.reverts is not None else []),
                *([window.line(move)] if window else []),
                *([f"tenants: {' '.join(move.tenants)}"] if len(move.tenants) > 1 else []),
                render.counted(copied.rows, copied.at_start, "rows")
                + (f" committed on {move.target}" if copied.source == "target" else " copied, as the catalog recorded")
                + (f", freeze {move.freeze_ms:.0f} ms" if move.freeze_ms else ""),
                *([f"writes on the target: {move.write_mode} ({move.write_mode_reason})"] if move.write_mode else []),
                *([f"error: {move.error}"] if move.error else []),
                *([copied.note] if copied.note else []),
                render.table(["table", "copied", "at start", "written since", "done"], _copy_rows(copied)),
            ]
        )
        emit(as_json, data, text)
        return
    moves = catalog.moves()
    emit(
        as_json,
        [_move_dict(m) for m in moves],
        render.table(
            ["id", "tenants", "source", "target", "phase", "rows", "error"],
            [
                [
                    m.id,
                    render.tenants_cell(m.tenants),
                    m.source,
                    m.target,
                    m.phase,
                    f"{m.rows_copied}/{m.rows_total}",
                    (m.error or "")[:60],
                ]
                for m in moves
            ],  # fmt: skip
        ),
    )


@move_group.command("abort")
@click.argument("move_id", type=int)
@click.option(
    "--batch-rows",
    type=click.IntRange(min=1),
    default=10_000,
    show_default=True,
    help="Rows per delete batch on the target.",
)
@ALLOW_TRIGGERS
@YES
@NO_PROGRESS
@click.pass_context
def move_abort(
    ctx: click.Context, move_id: int, batch_rows: int, allow_triggers: bool, yes: bool, no_progress: bool
) -> None:
    """Abort an unfinished move: delete the partial copy on the target and lift the source's fence."""
    from migrator.move import abort_move

    context = context_of(ctx)
    if not yes:
        revert = context.catalog.move(move_id).reverts is not None  # a revert's abort deletes nothing
        confirm(f"Abort move {move_id}{'' if revert else ' and delete its partial copy'}?")
    with render.progress(not no_progress, "deleted") as progress:
        move = abort_move(context, move_id, batch_rows, progress, allow_triggers=allow_triggers)
    click.echo(
        f"move {move.id} aborted: {move.who} {'stays' if len(move.tenants) == 1 else 'stay'} on {move.source}, writable"
    )


@move_group.command("revert")
@click.argument("move_id", type=int)
@click.option("--dry-run", is_flag=True, help="Check that the move can be reverted; change nothing.")
@cutover_flags
@throttle_flags
@RUN_FLAGS
@click.pass_context
def move_revert(
    ctx: click.Context,
    move_id: int,
    dry_run: bool,
    cutover: CutoverOptions,
    throttle: ThrottleOptions,
    yes: bool,
    no_progress: bool,
    as_json: bool,
) -> None:
    """Take a flipped move back within its revert window: replay the tenants' writes since the flip onto
    their old stamp, then a cutover in reverse. Re-running it resumes an interrupted revert."""
    from dataclasses import replace

    from migrator.interrupts import stop_on_signals
    from migrator.move import revert_move
    from migrator.move.stopped import stopped_move

    context = context_of(ctx)
    if not (yes or dry_run):
        forward = context.catalog.move(move_id)
        confirm(f"Revert move {move_id}: {forward.who} back from {forward.target} to {forward.source}?")
    options = replace(_move_defaults(), dry_run=dry_run, cutover=cutover, throttle=throttle)
    with stop_on_signals() as stop:
        try:
            with render.progress(not (as_json or no_progress)) as progress:
                outcome = revert_move(context, move_id, options, progress, stop.event)
        except Interrupted as exc:
            if not stop.asked or exc.move_id is None:
                raise
            raise stopped_move(context, exc.move_id, stop) from None
    if outcome.move is None:
        emit(
            as_json,
            {"dry_run": True, "move": move_id, "tenants": list(outcome.tenants), "from": outcome.source,
             "to": outcome.target},
            f"dry run: move {move_id} can be reverted: {render.tenants_cell(outcome.tenants)} "
            f"{outcome.source} -> {outcome.target}",
        )  # fmt: skip
        return
    first = outcome.routes[0]
    emit(
        as_json,
        {
            "move": outcome.move,
            "reverts": move_id,
            "routes": [route_dict(route) for route in outcome.routes],
            "resumed": outcome.resumed,
            "seconds": outcome.timings,
            "freeze_steps_ms": outcome.freeze_steps_ms,
        },
        f"move {outcome.move.id}: reverted move {move_id}, {outcome.move.who} back on {first.stamp} ("
        + (f"route version {first.version}" if len(outcome.routes) == 1 else "every route's version +1")
        + (f"), writes were frozen {outcome.move.freeze_ms:.0f} ms" if outcome.move.freeze_ms else ")"),
    )


# -- verify, cleanup ---------------------------------------------------------------------------------------


@cli.command("verify")
@click.argument("tenant")
@click.option("--source", required=True, help="Stamp holding the reference copy.")
@click.option("--target", required=True, help="Stamp to compare against it.")
@JOBS
@JSON
@click.pass_context
def verify_cmd(ctx: click.Context, tenant: str, source: str, target: str, jobs: int, as_json: bool) -> None:
    """Compare a tenant's rows on two stamps (counts and checksums per table); exit 1 if they differ."""
    from migrator.move import verify_between

    report = verify_between(context_of(ctx), (tenant,), source, target, jobs)
    data = {
        "tenant": tenant,
        "equal": report.equal,
        "tables": [
            {
                "table": t.table,
                "equal": t.equal,
                "source_rows": t.source.rows,
                "target_rows": t.target.rows,
                "source_checksum": t.source.digest,
                "target_checksum": t.target.digest,
                "missing": t.missing,
                "extra": t.extra,
                "changed": t.changed,
            }
            for t in report.tables
        ],
    }
    text = render.table(
        ["table", "source rows", "target rows", "source sum", "target sum", "equal"],
        [
            [t.table, t.source.rows, t.target.rows, t.source.digest, t.target.digest, "yes" if t.equal else "NO"]
            for t in report.tables
        ],
    )
    emit(as_json, data, text + "\n" + report.summary())
    if not report.equal:
        raise VerifyMismatch(report.summary())


@cli.command("cleanup")
@click.argument("tenants", nargs=-1)
@click.option("--stamp", default=None, help="The old stamp holding the moved tenants' leftover rows.")
@click.option("--move", "move_id", type=int, default=None, help="Every tenant of this flipped move, on its source.")
@click.option("--batch-rows", type=click.IntRange(min=1), default=10_000, show_default=True, help="Rows per delete.")
@ALLOW_TRIGGERS
@click.option("--dry-run", is_flag=True, help="Prove the leftovers and show what would be deleted, per table.")
@YES
@NO_PROGRESS
@click.pass_context
def cleanup_cmd(
    ctx: click.Context,
    tenants: tuple[str, ...],
    stamp: str | None,
    move_id: int | None,
    batch_rows: int,
    allow_triggers: bool,
    dry_run: bool,
    yes: bool,
    no_progress: bool,
) -> None:
    """Delete moved tenants' leftover rows from their old stamp, and lift the fence there.

    Name the tenants and their old stamp (`TENANT... --stamp S`), or a whole cohort (`--move ID`); rows
    are deleted in batches. Only rows a flipped move copied and
    verified are deleted: anything else refuses the cleanup before the first delete."""
    from migrator.catalog import name_tenants
    from migrator.interrupts import Stopped, stop_on_signals
    from migrator.move import CleanupOptions, cleanup_move, cleanup_tenants

    context = context_of(ctx)
    if (move_id is not None and (tenants or stamp)) or (move_id is None and not (tenants and stamp)):
        raise BadInput("name TENANT... --stamp STAMP, or --move ID (not both)")
    if move_id is not None:
        move = context.catalog.move(move_id)
        tenants, stamp = move.tenants, move.source
    assert stamp is not None
    who = name_tenants(tenants)
    if not (yes or dry_run):
        confirm(f"Delete every row of {who} on {stamp}?")
    with stop_on_signals() as stop:  # Ctrl-C, SIGTERM: the cleanup ends after its current delete batch
        try:
            with render.progress(not (no_progress or dry_run), "deleted") as progress:
                options = CleanupOptions(batch_rows, allow_triggers=allow_triggers, dry_run=dry_run)
                if move_id is not None:
                    _, counts = cleanup_move(context, move_id, options, progress, stop.event)
                else:
                    counts = cleanup_tenants(context, tenants, stamp, options, progress, stop.event)
        except Interrupted:
            if not stop.asked:
                raise
            again = f"--move {move_id}" if move_id is not None else f"{' '.join(tenants)} --stamp {stamp}"
            raise Stopped(
                f"cleanup of {who} on {stamp} stopped by {stop.name} between two delete batches; left in place: the "
                f"rows not yet deleted and the fence on {stamp}; resume: `migrator cleanup {again}`",
                stop.exit_code,
            ) from None
    if dry_run:
        click.echo(
            f"dry run: would delete {sum(counts.values())} rows of {who} from {stamp}, each as copied and verified\n"
            + render.table(["table", "rows"], sorted(counts.items()))
        )
        return
    click.echo(f"deleted {sum(counts.values())} rows of {who} from {stamp}")


@cli.command("doctor")
@click.option("--stamp", default=None, help="Only this stamp.")
@JSON
@click.pass_context
def doctor_cmd(ctx: click.Context, stamp: str | None, as_json: bool) -> None:
    """List migrator's leftovers on stamps (fences, triggers, copy cursors); exit 1 if any."""
    from migrator.move import leftovers

    found = leftovers(context_of(ctx), stamp)
    lines = [f"{name}: {item}" for name, items in found.items() for item in items]
    emit(as_json, found, "\n".join(lines) if lines else "no leftovers")
    if lines:
        raise CheckFailed()
