"""Sending work to the workers: a plan's entries (`apply FILE --queue`) and a fleet schema rollout
(`schema upgrade --queue`), each checked as for a local run before any job exists.

A plan runs the same `prepare` as a local apply, so a stale plan is refused first. Each entry is
one job with a queueing lock named after the plan's digest and position: running `apply --queue`
again while its jobs wait queues nothing twice.

A rollout is planned and checked as a local one (`rollout.runner.plan_upgrade`: fenced stamps
refused, the canary chosen, every stamp's revision read within the same per-server budget) and
each stamp gets a row in `schema_runs` with its wave: `queued` for the first wave (the canary),
`waiting` for the later ones. Only the first wave's steps are queued at first; the step that ends
a wave queues the gate (`tasks.schema_gate`, due after --bake), which runs --check and, when it
passes, releases the next wave (when a wave fails or its check does, the later waves are recorded
as skipped). Each step holds one of --connections-per-server slots of the stamp's server,
fleet-wide, so a thousand small stamps on a few servers never open more than that many sessions
on any of them (see `tasks.schema_step`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from procrastinate.exceptions import ConnectorException

from migrator.catalog import PlanStatus, StepResult
from migrator.catalog.plans import Ledger
from migrator.catalog.schema_runs import RunLog
from migrator.context import Context
from migrator.errors import MigratorError
from migrator.plans.apply import ApplyOptions, Prepared, record
from migrator.queue.app import (
    DEFAULT_QUEUE,
    RUN_ENTRY,
    SCHEMA_STEP,
    QueuedRun,
    check_queue,
    defer,
    live_workers,
    step_lock,
)
from migrator.queue.tasks import make_app
from migrator.rollout.runner import RolloutOptions, plan_upgrade, record_not_run


@dataclass(frozen=True)
class Queued:
    """What `apply --queue` did: the jobs it created per queue, and those already waiting."""

    plan_id: int
    jobs: dict[str, int]
    already: int
    workers: int  # live workers now (0: the jobs wait until one starts)


def enqueue(
    ctx: Context,
    prepared: Prepared,
    options: ApplyOptions,
    queue: str = DEFAULT_QUEUE,
) -> Queued:
    """Record the plan in the catalog and queue a job per remaining entry (see the module docstring)."""
    check_queue(ctx)
    ledger = Ledger(ctx.catalog)
    plan_id = ledger.open(record(prepared), queue=queue)
    app = make_app(ctx.catalog.url, min_size=1, max_size=1)
    jobs: dict[str, int] = {}
    already = 0
    args = {
        "plan_id": plan_id,
        "per_stamp": options.per_stamp,
        "max_attempts": options.max_attempts,
        "batch_rows": options.batch_rows,
        "jobs": options.jobs,
        "allow_triggers": options.allow_triggers,
        "revert_window": options.revert_window,
    }
    try:
        with app.open():
            for entry in prepared.todo:
                where = entry.move.queue or queue
                lock = f"migrator.plan:{prepared.file.digest}:{entry.position}"
                if defer(app, RUN_ENTRY, where, lock, {**args, "position": entry.position}):
                    jobs[where] = jobs.get(where, 0) + 1
                else:
                    already += 1
    except ConnectorException as exc:  # the queue's own wrapper: say what the database said, in one line
        ledger.close(plan_id, PlanStatus.STOPPED)
        cause = str(exc.__cause__ or exc).strip().splitlines()[0]
        raise MigratorError(f"cannot queue plan {prepared.file.path}: {cause}") from None
    ledger.settle(plan_id)  # a plan with nothing left to run is done now
    return Queued(plan_id, jobs, already, live_workers(ctx))


@dataclass(frozen=True)
class QueuedRollout:
    run_id: str
    target: str | None
    canary: str | None
    steps: int  # stamps queued
    skipped: int  # stamps with nothing to do
    workers: int
    waves: tuple[int, ...] = ()  # stamps per wave, the canary's first


def enqueue_upgrade(
    ctx: Context,
    options: RolloutOptions,
    queue: str = DEFAULT_QUEUE,
    confirm: Callable[[Any], None] | None = None,
) -> QueuedRollout:
    """Plan and record the rollout with each stamp's wave, then queue the first wave's steps (the canary's)."""
    check_queue(ctx)
    _, plan = plan_upgrade(ctx, options)
    steps = [name for wave in plan.waves for name in wave]
    if confirm is not None and steps:
        confirm(plan)
    runs = RunLog(ctx.catalog, plan.run_id, plan.direction, plan.target)
    try:
        skipped = record_not_run(runs, plan)
        for number, wave in enumerate(plan.waves):
            result = StepResult.QUEUED if number == 0 else StepResult.WAITING
            runs.queue([(name, plan.row(name).current, number) for name in wave], result)
    finally:
        runs.close()
    run = QueuedRun(
        plan.run_id,
        queue,
        options.connections_per_server,
        options.continue_on_error,
        plan.canary,
        plan.gate.bake_s,
        plan.gate.check,
    )
    app = make_app(ctx.catalog.url, min_size=1, max_size=1)
    with app.open():
        for name in plan.waves[0] if plan.waves else ():  # a job sent again after its worker died is not queued twice
            defer(app, SCHEMA_STEP, queue, step_lock(plan.run_id, name), {"stamp": name, "run": asdict(run)})
    sizes = tuple(len(wave) for wave in plan.waves)
    return QueuedRollout(plan.run_id, plan.target, plan.canary, len(steps), len(skipped), live_workers(ctx), sizes)
