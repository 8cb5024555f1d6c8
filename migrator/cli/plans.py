"""Stamp lifecycle, plan and apply commands: `stamp set-state|update`, `plan drain|rebalance|isolate|show`, `apply`."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from migrator.cli import render
from migrator.cli.base import (
    JSON,
    NO_REVERT_WINDOW,
    RUN_FLAGS,
    EngineChoice,
    Queued,
    bundle,
    cli,
    confirm,
    context_of,
    emit,
    engine_option,
    queued,
)
from migrator.cli.core import KIND, NO_CHECK, stamp_group
from migrator.cli.throttle import MoveFlags, move_flags
from migrator.errors import BadInput, MigratorError

if TYPE_CHECKING:  # the engine is imported inside each command, which keeps `migrator --help` fast
    from migrator.move.throttle import ThrottleOptions
    from migrator.plans.apply import ApplyOptions, ApplyResult, Entry, Prepared
    from migrator.plans.planners import Cohorts, Plan

OUTPUT = click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Where to write the plan (default under plans/).",
)
FORCE = click.option("--force", is_flag=True, help="Overwrite the output file if it exists.")
BY_REGION = click.option(
    "--queue-by-region",
    "by_region",
    is_flag=True,
    help="Name each entry's workers' queue after its target's region (for `apply --queue`: copied near the data).",
)


def _cohort_defaults() -> Cohorts:
    from migrator.plans.planners import Cohorts

    return Cohorts()


@dataclass(frozen=True)
class PlanOutput:
    """How a planner command writes its plan file (--queue-by-region, -o, --force, --json)."""

    by_region: bool
    output: Path | None
    force: bool
    as_json: bool

    def write(self, plan: Plan, default: Path) -> None:
        """Write the plan (to -o, else `default` under plans/), show it and say what to run next."""
        from migrator.plans.planners import write_plan

        path = write_plan(plan, self.output or default, self.force)
        emit(
            self.as_json,
            {"path": str(path), **_plan_dict(plan)},
            f"{_plan_text(plan)}\n\nwrote {path}; review it, then run `migrator apply {path}`",
        )


def _cohorts(cohort_rows: int, cohort_tenants: int) -> Cohorts:
    from migrator.plans.planners import Cohorts

    return Cohorts(cohort_rows, cohort_tenants)


WRITES_PLAN = bundle("out", PlanOutput, BY_REGION, OUTPUT, FORCE, JSON)  # how every planner writes its plan file
COHORTS = bundle(
    "cohorts",
    _cohorts,
    engine_option(
        "--cohort-rows",
        lambda: _cohort_defaults().rows,
        "Small tenants moving between two stamps go in cohorts of at most this many rows (larger ones alone).",
    ),
    engine_option(
        "--cohort-tenants",
        lambda: _cohort_defaults().tenants,
        "At most this many tenants per cohort (1: every tenant is its own move).",
    ),
)


def _stamp_states() -> list[str]:
    from migrator.catalog import StampState

    return [s.value for s in StampState]


# -- stamps -----------------------------------------------------------------------------------------------


@stamp_group.command("set-state")
@click.argument("name")
@click.argument("state", type=EngineChoice(_stamp_states))
@click.pass_context
def stamp_set_state(ctx: click.Context, name: str, state: str) -> None:
    """Mark a stamp active, draining (receives no tenants) or retired (refused while it holds any)."""
    from migrator.plans.capacity import set_stamp_state

    stamp = set_stamp_state(context_of(ctx), name, state)
    click.echo(f"stamp {stamp.name} is {stamp.state}")


@stamp_group.command("update")
@click.argument("name")
@click.option("--capacity-rows", type=click.IntRange(min=1), default=None, help="How many tenant rows it may hold.")
@click.option("--capacity-bytes", type=click.IntRange(min=1), default=None, help="How many bytes of tenant rows.")
@click.option("--region", default=None, help="Region label, for placement and reports.")
@click.option("--dsn", default=None, help="A new DSN (libpq URL, keyword string or service name); checked to connect.")
@KIND
@NO_CHECK
@click.pass_context
def stamp_update(
    ctx: click.Context,
    name: str,
    capacity_rows: int | None,
    capacity_bytes: int | None,
    region: str | None,
    dsn: str | None,
    kind: str | None,
    no_check: bool,
) -> None:
    """Change a stamp's capacity (used by `plan drain` and `plan rebalance`), region, DSN or kind."""
    from migrator.plans.capacity import update_stamp

    stamp = update_stamp(
        context_of(ctx), name, capacity_rows, capacity_bytes, region, dsn, check=not no_check, kind=kind
    )
    click.echo(
        f"stamp {stamp.name}: capacity {stamp.capacity_rows or 'unlimited'} rows, "
        f"{stamp.capacity_bytes or 'unlimited'} bytes, region {stamp.region or '-'}, {stamp.kind}, "
        f"dsn {stamp.masked_dsn}"
    )


# -- plans ------------------------------------------------------------------------------------------------


@cli.group("plan")
def plan_group() -> None:
    """Write reviewable plans (drain, rebalance, isolate) to plans/, and follow them once applied.

    Run a plan with `migrator apply FILE`; `plan status FILE` and `plan wait FILE` show and follow
    its entries as the catalog records them, whoever runs them (a local apply or workers).
    """


@plan_group.command("drain")
@click.argument("stamp")
@click.option("--to", "to", default=None, help="Comma-separated stamps to drain onto (default: every active stamp).")
@COHORTS
@WRITES_PLAN
@click.pass_context
def plan_drain_cmd(
    ctx: click.Context,
    stamp: str,
    to: str | None,
    cohorts: Cohorts,
    out: PlanOutput,
) -> None:
    """Plan moving every tenant off STAMP, largest first, onto the active stamp with most free capacity;
    small tenants go together in cohorts (one move each)."""
    from migrator.plans.planners import plan_drain

    targets = [name.strip() for name in to.split(",") if name.strip()] if to else None
    plan = plan_drain(context_of(ctx), stamp, targets, cohorts, out.by_region)
    out.write(plan, Path("plans") / f"drain-{stamp.replace('/', '-')}.yaml")


@plan_group.command("rebalance")
@click.option(
    "--threshold",
    type=click.FloatRange(min=0, max=1),
    default=0.1,
    show_default=True,
    help="Every active stamp must end within this of the fleet's utilisation (rows / capacity_rows).",
)
@click.option("--max-moves", type=click.IntRange(min=1), default=None, help="Move at most this many tenants.")
@COHORTS
@WRITES_PLAN
@click.pass_context
def plan_rebalance_cmd(
    ctx: click.Context,
    threshold: float,
    max_moves: int | None,
    cohorts: Cohorts,
    out: PlanOutput,
) -> None:
    """Plan the fewest tenant moves (greedy) that bring every active stamp near the fleet's mean
    utilisation; small tenants going the same way go together in cohorts."""
    from migrator.plans.planners import plan_rebalance

    plan = plan_rebalance(context_of(ctx), threshold, max_moves, cohorts, out.by_region)
    out.write(plan, Path("plans") / f"rebalance-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}.yaml")


@plan_group.command("isolate")
@click.argument("tenant")
@click.option("--to", "target", required=True, help="The empty stamp that becomes the tenant's own.")
@WRITES_PLAN
@click.pass_context
def plan_isolate_cmd(ctx: click.Context, tenant: str, target: str, out: PlanOutput) -> None:
    """Plan moving one (heavy) tenant to a dedicated stamp that holds no tenant yet."""
    from migrator.plans.planners import plan_isolate

    plan = plan_isolate(context_of(ctx), tenant, target, out.by_region)
    out.write(plan, Path("plans") / f"isolate-{tenant.replace('/', '-')}.yaml")


PLAN_FILE = click.argument("file", type=click.Path(dir_okay=False, path_type=Path))


def _recorded_command(name: str, follow: bool, summary: str) -> None:
    """`plan status` and `plan wait`: the plan's entries as the catalog records them, once or followed."""

    @plan_group.command(name, help=summary)
    @PLAN_FILE
    @JSON
    @click.pass_context
    def command(ctx: click.Context, file: Path, as_json: bool) -> None:
        from migrator.plans.apply import plan_digest

        _recorded_plan(context_of(ctx), plan_digest(file), file, follow=follow, as_json=as_json)


_recorded_command(
    "status", False, "Show an applied or queued plan's entries as the catalog records them: status, move, failures, "
    "queue, error."
)  # fmt: skip
_recorded_command(
    "wait", True, "Follow an applied or queued plan until it ends, a line per change; exit 1 if a move failed."
)


@plan_group.command("show")
@PLAN_FILE
@JSON
def plan_show_cmd(file: Path, as_json: bool) -> None:
    """Show a plan file as tables: its moves and each stamp's utilisation before and after (offline)."""
    from migrator.plans.planners import load_plan

    plan, _ = load_plan(file)
    emit(as_json, _plan_dict(plan), _plan_text(plan))


def _plan_dict(plan: Plan) -> dict[str, Any]:
    from migrator.plans.planners import plan_data

    return plan_data(plan)


def _fraction(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _plan_text(plan: Plan) -> str:
    from migrator.stamps.sizes import human_bytes

    head = [
        f"{plan.kind} plan, created {plan.created}, catalog {plan.catalog}, schema {plan.fleet_schema_revision}",
        f"reason: {plan.reason}",
        *(f"note: {note}" for note in plan.notes),
    ]
    queued = any(m.queue for m in plan.moves)
    moves = render.table(
        ["#", "tenants", "from", "to", "rows", "bytes", *(["queue"] if queued else [])],
        [
            [
                i, render.tenants_cell(m.tenants), m.source, m.target, f"{m.rows:,}", human_bytes(m.bytes),
                *([m.queue or "-"] if queued else []),
            ]
            for i, m in enumerate(plan.moves)
        ],
    )  # fmt: skip
    use = render.table(
        ["stamp", "before", "after", "change", "rows before", "rows after"],
        [
            [
                name,
                _fraction(u.before),
                _fraction(u.after),
                "-" if u.before is None or u.after is None else f"{u.after - u.before:+.1%}",
                "" if u.rows_before is None else f"{u.rows_before:,}",
                "" if u.rows_after is None else f"{u.rows_after:,}",
            ]
            for name, u in plan.utilisation.items()
        ],
    )
    total = f"{len(plan.moves)} moves of {sum(len(m.tenants) for m in plan.moves)} tenants, {plan.rows:,} rows"
    return "\n".join(
        [*head, "", moves if plan.moves else "no moves", total, "", "utilisation (rows / capacity_rows):", use]
    )


# -- apply ------------------------------------------------------------------------------------------------


def _apply_defaults() -> ApplyOptions:
    """The engine's defaults for `apply` (imported here: the engine loads Alembic, `--help` must not)."""
    from migrator.plans.apply import ApplyOptions

    return ApplyOptions()


def _dry_run(as_json: bool, prepared: Prepared) -> None:
    from migrator.plans.execute import Todo

    def action(entry: Entry) -> str:
        return {Todo.RUN: "would move", Todo.RESUME: f"would {entry.note}"}.get(entry.todo, f"skip: {entry.note}")

    data = {
        "dry_run": True,
        "path": prepared.file.path,
        "digest": prepared.file.digest,
        "entries": [
            {
                "position": e.position,
                "tenants": list(e.move.tenants),
                "from": e.move.source,
                "to": e.move.target,
                "rows": e.move.rows,
                "action": action(e),
            }
            for e in prepared.entries
        ],
    }
    text = render.table(
        ["#", "tenants", "from", "to", "rows", "action"],
        [
            [
                e.position,
                render.tenants_cell(e.move.tenants),
                e.move.source,
                e.move.target,
                f"{e.move.rows:,}",
                action(e),
            ]
            for e in prepared.entries
        ],
    )
    emit(as_json, data, f"dry run of {prepared.file.path}: the plan is current\n{text}")


def _summary(result: ApplyResult) -> str:
    from migrator.catalog import EntryStatus

    counts = ", ".join(
        f"{len(result.having(s))} {s}" for s in (EntryStatus.DONE, EntryStatus.FAILED, EntryStatus.SKIPPED)
    )
    return f"{_results_table(result.results)}\nplan {result.file.path}: {result.status} ({counts})"


def _revert_plan(context: Any, file: Path, throttle: ThrottleOptions, *, yes: bool, show: bool, as_json: bool) -> None:
    """`apply --revert`: every move of the plan still inside its revert window, taken back; exit 1 if one failed."""
    from dataclasses import replace

    from migrator.catalog import EntryStatus
    from migrator.interrupts import stop_on_signals
    from migrator.move import MoveOptions
    from migrator.plans.revert import revert_plan

    if not yes:
        confirm(f"Revert every move of {file} still inside its revert window?")
    with stop_on_signals() as stop, render.progress(show, "plan") as progress:
        results = revert_plan(context, file, replace(MoveOptions(), throttle=throttle), progress, stop.event)
    counts = {s: sum(1 for r in results if r.status == s) for s in (EntryStatus.DONE, EntryStatus.FAILED)}
    emit(
        as_json,
        {"path": str(file), "results": results},
        f"{_results_table(results)}\nplan {file}: {counts[EntryStatus.DONE]} reverted, "
        f"{counts[EntryStatus.FAILED]} failed, {len(results) - sum(counts.values())} skipped",
    )
    if counts[EntryStatus.FAILED]:
        raise MigratorError(f"{counts[EntryStatus.FAILED]} reverts failed; fix the cause and re-run it to retry them")


def _results_table(results: Any) -> str:
    """One line per entry of a plan's run: where it went, how it ended, its move."""
    return render.table(
        ["#", "tenants", "from", "to", "status", "move", "seconds", "reason"],
        [
            [
                r.position,
                render.tenants_cell(r.tenants),
                r.source,
                r.target,
                r.status,
                r.move_id,
                f"{r.seconds:.1f}" if r.seconds else "",
                render.mask_text(r.reason),
            ]
            for r in results
        ],
    )


def _recorded_plan(context: Any, digest: str, file: Path, *, follow: bool, as_json: bool) -> None:
    """`plan status` and `plan wait` (`apply --queue --wait`): the plan's entries as the catalog records them."""
    from migrator.catalog import EntryStatus, PlanStatus
    from migrator.catalog.plans import Ledger
    from migrator.queue.app import live_workers
    from migrator.queue.follow import follow as follow_plan

    if follow:
        status, entries = follow_plan(context, digest, render.say)
    else:
        found = Ledger(context.catalog).plan(digest)
        if found is None:
            raise MigratorError(f"plan {file} was never applied or queued")
        status, entries = found[1], Ledger(context.catalog).entries(found[0])
    workers = live_workers(context)
    data = {"path": str(file), "digest": digest, "status": status, "workers": workers, "entries": entries}
    table = render.table(
        ["#", "tenants", "from", "to", "status", "move", "failures", "queue", "error"],
        [
            [
                e.position,
                render.tenants_cell(tuple(e.tenants)),
                e.source,
                e.target,
                e.status,
                e.move_id,
                e.failures or "",
                e.queue,
                render.mask_text(e.error or ""),
            ]
            for e in entries
        ],
    )
    shown = (EntryStatus.DONE, EntryStatus.RUNNING, EntryStatus.PENDING, EntryStatus.FAILED)
    counts = ", ".join(f"{sum(e.status == s for e in entries)} {s}" for s in shown)
    emit(as_json, data, f"{table}\nplan {file}: {status} ({counts}); {workers} worker(s) running")
    if follow and status == PlanStatus.FAILED:
        failed = sum(e.status == EntryStatus.FAILED for e in entries)
        raise MigratorError(f"{failed} of {len(entries)} moves failed; `migrator plan status {file}` shows why")


@cli.command("apply")
@PLAN_FILE
@engine_option(
    "--parallel",
    lambda: _apply_defaults().parallel,
    "Run at most this many moves at once.",
    click.IntRange(min=1, max=64),
)
@engine_option(
    "--per-stamp",
    lambda: _apply_defaults().per_stamp,
    "Run at most this many moves at once into one target stamp, counting every apply and worker.",
)
@click.option("--stop-on-error", is_flag=True, help="Start no more moves once one has failed.")
@click.option("--dry-run", is_flag=True, help="Check the plan is still current and show what would run.")
@queued(
    "the plan's moves (an entry's own `queue:` wins; --per-stamp then holds across all workers)",
    "follow the queued moves until they end (`plan wait`).",
    "--wait follows the moves --queue sends to workers; to follow a plan, `migrator plan wait {file}`",
)
@engine_option(
    "--max-attempts",
    lambda: _apply_defaults().max_attempts,
    "With --queue: how many times workers run a move that fails for a transient reason.",
)
@NO_REVERT_WINDOW
@click.option(
    "--revert",
    is_flag=True,
    help="Take back every move of the plan still inside its revert window (`migrator move revert`), last first.",
)
@move_flags
@RUN_FLAGS
@click.pass_context
def apply_cmd(
    ctx: click.Context,
    file: Path,
    parallel: int,
    per_stamp: int,
    stop_on_error: bool,
    dry_run: bool,
    queue: Queued | None,
    max_attempts: int,
    no_revert_window: bool,
    revert: bool,
    flags: MoveFlags,
    yes: bool,
    no_progress: bool,
    as_json: bool,
) -> None:
    """Carry out a plan file's moves; re-running it resumes where it stopped (Ctrl-C lets running moves end).

    With --queue the moves go to `migrator worker` processes and --wait follows them; `migrator plan
    status FILE` shows a plan's entries and `plan wait FILE` follows them, however they run.
    """
    from dataclasses import replace

    from migrator.catalog import EntryStatus
    from migrator.plans.apply import prepare, run

    context = context_of(ctx)
    if queue is not None and flags.throttle != type(flags.throttle)():
        raise BadInput(
            "queued moves are throttled by the workers that run them (`migrator worker --max-replica-lag ...`) "
            "and the fleet's limits (`migrator throttle set`), not by apply's flags"
        )
    override = flags.override_reason
    if queue is not None and override is not None:
        raise BadInput("--override-policy runs here, not on workers: apply the plan without --queue")
    if revert:
        if queue is not None or dry_run:
            raise BadInput("--revert runs here, one move at a time: give it without --queue and --dry-run")
        _revert_plan(context, file, flags.throttle, yes=yes, show=not (as_json or no_progress), as_json=as_json)
        return
    prepared = prepare(context, file, override is not None)
    if dry_run:
        _dry_run(as_json, prepared)
        return
    todo = prepared.todo
    if not yes:
        rows = sum(e.move.rows for e in todo)
        confirm(f"Apply {file}: {len(todo)} moves ({rows:,} rows), {parallel} at a time?")
    options = replace(
        _apply_defaults(),
        parallel=parallel,
        per_stamp=per_stamp,
        stop_on_error=stop_on_error,
        batch_rows=flags.batch_rows,
        jobs=flags.jobs,
        allow_triggers=flags.allow_triggers,
        override_reason=override,
        revert_window=not no_revert_window,
        max_attempts=max_attempts,
        throttle=flags.throttle,
    )
    if queue is not None:
        from migrator.queue.enqueue import enqueue

        queued = enqueue(context, prepared, options, queue.name)
        made = ", ".join(f"{n} on queue {q}" for q, n in sorted(queued.jobs.items())) or "no new jobs"
        render.say(f"queued plan {file}: {made}" + (f"; {queued.already} already queued" if queued.already else ""))
        if not queued.workers:
            render.say("no worker is running: the moves wait until one starts (`migrator worker`)")
        if queue.wait:
            _recorded_plan(context, prepared.file.digest, file, follow=True, as_json=as_json)
        return
    from migrator.interrupts import stop_on_signals

    with (
        stop_on_signals() as stop,  # Ctrl-C, SIGTERM: no more moves start, running ones stop at a safe point
        context.metrics.serve(flags.metrics_port),
        render.progress(not (as_json or no_progress), "plan") as progress,
    ):
        result = run(context, prepared, options, progress, stop.event)
    data = {
        "path": result.file.path,
        "digest": result.file.digest,
        "status": result.status,
        "interrupted": result.interrupted,
        "results": list(result.results),
    }
    emit(as_json, data, _summary(result))
    failed = result.having(EntryStatus.FAILED)
    if failed:
        raise MigratorError(
            f"{len(failed)} of {len(result.results)} moves failed; fix the cause and re-run "
            f"`migrator apply {file}` to retry them"
        )
    if result.interrupted and stop.asked:
        from migrator.move.stopped import stopped_apply

        moves = [r.move_id for r in result.results if r.stopped and r.move_id is not None]
        raise stopped_apply(context, str(file), moves, result.not_started, stop)
    if result.interrupted or result.not_started:
        raise MigratorError(
            f"interrupted with {result.not_started} moves not started; re-run `migrator apply {file}` "
            "to continue where it stopped"
        )
