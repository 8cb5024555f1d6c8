"""The queue's tasks, thin schedulers over the engine's one executor of each unit of work.

`run_entry` runs one plan entry (a cohort's move) on a worker through `plans.execute.execute_entry`,
the executor a local apply uses too. What happens after a failure is decided here, with the
catalog's count of the entry's failures, and handed to procrastinate as a `Requeue` (retry in N
seconds) or not at all: a busy stamp or tenant and a stop at a safe point are waited out without
counting; a transient failure counts, up to the plan's --max-attempts; anything else fails the
entry at once, visibly, and is never retried.

`schema_step` runs one stamp's step of a queued rollout through `rollout.worker.run_stamp_step`,
the executor of a local rollout's waves, within --connections-per-server slots of the stamp's
server. The step that ends a wave (the canary's, or the last of a wave to finish) either stops the
rollout (a failure) or queues `schema_gate`, due after --bake, which runs --check
(`rollout.ripple.run_check`, as a local rollout does) and releases the next wave's steps when it
passes (see `enqueue.enqueue_upgrade`). The waves themselves are the rollout plan's, recorded with
each stamp's row.

`requeue_stalled` is procrastinate's recipe for jobs whose worker died (kill -9, a lost machine):
every few seconds one worker sends back to the queue the running jobs of workers whose heartbeat
stopped. The move resumes from its catalog state on whichever worker claims it.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any, NoReturn

import procrastinate

from migrator.catalog import UNFINISHED_STEPS, EntryStatus, StepResult
from migrator.catalog.locks import stamp_slot
from migrator.catalog.models import CLAIMABLE_STEPS
from migrator.catalog.plans import Ledger, LedgerEntry
from migrator.catalog.schema_runs import RunLog
from migrator.context import Context
from migrator.db import dsn as dsnlib
from migrator.errors import Interrupted, LockBusy, MigratorError
from migrator.move import MoveOptions
from migrator.move.throttle import ThrottleOptions
from migrator.plans.apply import classify_entry
from migrator.plans.execute import EntryRun, Failure, Todo, execute_entry
from migrator.plans.planners import PlannedMove
from migrator.progress import Silent
from migrator.queue.app import (
    BUSY_RETRY_S,
    HOUSEKEEPING_QUEUE,
    REQUEUE_STALLED,
    RUN_ENTRY,
    SCHEMA_GATE,
    SCHEMA_STEP,
    QueuedRun,
    Requeue,
    Retries,
    WorkerState,
    catalog_slot,
    defer,
    gate_lock,
    step_lock,
)
from migrator.rollout.history import History
from migrator.rollout.ripple import check_env, run_check
from migrator.rollout.runner import fenced_moves, wave_name
from migrator.rollout.worker import ALEMBIC_IN_PROCESS, Job, run_stamp_step

log = logging.getLogger("migrator.queue")


def make_app(catalog_url: str, **pool: Any) -> procrastinate.App:
    """The procrastinate app on the catalog's database, with migrator's tasks registered."""
    connector = procrastinate.PsycopgConnector(
        conninfo=dsnlib.normalize(catalog_url), kwargs={"application_name": "migrator-queue"}, **pool
    )
    app = procrastinate.App(connector=connector)
    app.task(name=RUN_ENTRY, pass_context=True, retry=Retries())(run_entry)
    app.task(name=SCHEMA_STEP, pass_context=True, retry=Retries())(schema_step)
    app.task(name=SCHEMA_GATE, pass_context=True, retry=Retries())(schema_gate)
    stalled = app.task(
        name=REQUEUE_STALLED, pass_context=True, queue=HOUSEKEEPING_QUEUE, queueing_lock=REQUEUE_STALLED
    )(requeue_stalled)
    app.periodic(cron="* * * * * */3")(stalled)  # every 3 seconds (the 6th field is seconds)
    return app


# -- a plan entry ------------------------------------------------------------------------------------


def run_entry(
    context: procrastinate.JobContext,
    *,
    plan_id: int,
    position: int,
    per_stamp: int,
    max_attempts: int,
    **move: Any,
) -> str:
    """Run (or resume) one plan entry's move; returns how it ended, for the queue's own record.

    `move` holds the job's move options as `apply --queue` deferred them (`_move_options`)."""
    state: WorkerState = context.additional_context["migrator"]
    ctx = state.ctx
    ledger = Ledger(ctx.catalog)
    entry = ledger.entries(plan_id, position)[0]
    if entry.status in (EntryStatus.DONE, EntryStatus.FAILED):
        return f"already {entry.status}"  # delivered twice (re-enqueued while it ran): nothing to do
    if state.stop.is_set():
        raise Requeue("worker stopping", 0)
    busy = f"{per_stamp} move(s) into {entry.target} already running (--per-stamp {per_stamp})"
    with catalog_slot(ctx, stamp_slot(entry.target), per_stamp, busy, BUSY_RETRY_S):  # for the whole move
        planned = PlannedMove(tuple(entry.tenants), entry.source, entry.target, entry.rows, 0)
        try:
            with ctx.catalog.lock_tenants(planned.tenants):  # classified while no one else moves them
                classified, problem = classify_entry(ctx.catalog, position, planned, None)
        except LockBusy as exc:
            raise Requeue(str(exc), BUSY_RETRY_S) from None
        if problem is not None:  # the plan went stale since it was queued: no retry cures that
            _fail(ledger, plan_id, entry, f"stale plan entry: {problem}")
        if classified.todo == Todo.DONE:
            ledger.mark(plan_id, position, EntryStatus.DONE)
            ledger.settle(plan_id)
            return classified.note
        what = f"plan {plan_id} #{position}: {planned.who} {entry.source} -> {entry.target}"
        state.say(f"start   {what}" + (f" ({classified.note})" if classified.resume else ""))
        options = _move_options(move, state.throttle)
        done = execute_entry(ctx, plan_id, classified, options, Silent(), stop=state.stop)
        if done.status == EntryStatus.FAILED:
            _after_failure(state, ledger, plan_id, entry, done, max_attempts, what)
    state.say(f"done    {what} (move {done.move_id})")
    ledger.settle(plan_id)
    return f"move {done.move_id} flipped"


def _move_options(job: dict[str, Any], throttle: ThrottleOptions) -> MoveOptions:
    """A queued entry's move options: batch_rows, jobs, allow_triggers, and revert_window (absent from
    jobs queued before the revert window existed: on); the worker's own throttle."""
    return MoveOptions(
        batch_rows=job["batch_rows"],
        jobs=job["jobs"],
        allow_triggers=job["allow_triggers"],
        revert_window=job.get("revert_window", True),
        throttle=throttle,
    )


def _after_failure(
    state: WorkerState, ledger: Ledger, plan_id: int, entry: LedgerEntry, done: EntryRun, max_attempts: int, what: str
) -> NoReturn:
    """Back to the queue (a wait, or a transient failure within --max-attempts), or failed for good."""
    reason, exc = done.reason, done.error
    if done.failure == Failure.WAIT:  # a safe point, or someone else's move of a tenant: not a failure
        ledger.mark(plan_id, entry.position, EntryStatus.PENDING, error=reason)
        state.say(f"requeue {what}: {reason}")
        raise Requeue(str(exc), 0 if isinstance(exc, Interrupted) else BUSY_RETRY_S) from None
    state.say(f"FAILED  {what}: {reason}")
    if done.failure != Failure.TRANSIENT:
        _fail(ledger, plan_id, entry, reason, exc)
    failures = ledger.failed_attempt(plan_id, entry.position, f"attempt {entry.failures + 1}: {reason}")
    if failures >= max_attempts:
        _fail(ledger, plan_id, entry, f"{reason} (failed {failures} times, the limit)", exc)
    log.warning("plan %s entry %s failed (%s), retrying: %s", plan_id, entry.position, failures, reason)
    raise Requeue(reason, min(60, 2**failures)) from exc


def _fail(ledger: Ledger, plan_id: int, entry: LedgerEntry, reason: str, exc: Exception | None = None) -> NoReturn:
    """The entry failed for good: recorded, the plan settled if it was the last; the job fails too."""
    unfinished = next(iter(ledger.catalog.open_moves(tuple(entry.tenants))), None)
    ledger.mark(plan_id, entry.position, EntryStatus.FAILED, unfinished.id if unfinished else None, reason)
    ledger.settle(plan_id)
    raise EntryFailed(reason) from exc


class EntryFailed(Exception):
    """The job's end for an entry that failed for good (procrastinate records the job as failed)."""


# -- a stamp's step of a queued rollout --------------------------------------------------------------


def schema_step(context: procrastinate.JobContext, *, stamp: str, run: dict[str, Any]) -> str:
    """One stamp's step of a queued rollout, on a worker; returns its result.

    A row moves from queued to running exactly once (`RunLog.claim`), so a step delivered twice
    runs once; a failed step stops the steps not yet started unless --continue-on-error. The step
    that ends its wave decides what comes next (`_wave_ended`).
    """
    state: WorkerState = context.additional_context["migrator"]
    ctx, rollout = state.ctx, QueuedRun(**run)
    runs = RunLog(ctx.catalog, rollout.run_id, "upgrade", None)
    try:
        rows = {name: result for name, result, _ in runs.rows()}
        if rows.get(stamp) not in CLAIMABLE_STEPS:  # running: its worker died
            _wave_ended(context.app, runs, rollout, stamp)  # the job that ended the wave may have died after it
            return f"stamp {stamp} is {rows.get(stamp, 'not in the run')}: nothing to do"
        failed = sorted(name for name, result in rows.items() if result == StepResult.FAILED)
        if failed and not rollout.continue_on_error:
            runs.skip_queued([stamp], f"not tried: stopped after {', '.join(failed)} failed")
            result: StepResult | None = StepResult.SKIPPED
        else:
            result = _run_step(ctx, runs, stamp, rollout.per_server)
        if result is None:
            return "claimed by another worker"
        _wave_ended(context.app, runs, rollout, stamp)
    finally:
        runs.close()
    state.say(f"schema  {stamp}: {result}")
    return result


def _run_step(ctx: Context, runs: RunLog, stamp: str, per_server: int) -> StepResult | None:
    """The stamp's step to the run's target, or a failure when this worker lacks that revision."""
    target = runs.target_of()
    if target is None:
        raise MigratorError(f"rollout {runs.run_id} has no target revision")
    found = History.load(ctx.config.schema_env())
    if not found.known(target):  # a worker deployed with older migrations: the step fails here
        return _finish(runs, stamp, f"revision {target} is not in this worker's {found.location}")
    job = Job.of(ctx, ctx.catalog.stamp(stamp), str(found.location), "upgrade", target)
    return _step(ctx, runs, stamp, per_server, job)


def _wave_ended(app: procrastinate.App, runs: RunLog, rollout: QueuedRun, stamp: str) -> None:
    """If the stamp's wave has ended: a failure stops the rollout (the canary's always, another wave's
    unless --continue-on-error), else the gate of the next wave is queued, due after --bake. Several
    steps may see the same wave end: the gate's queueing lock and `RunLog.release` keep it once."""
    number = runs.wave_of(stamp)
    if number is None:
        return
    wave = runs.wave(number)
    if any(result in UNFINISHED_STEPS for _, result in wave):
        return
    failed = [name for name, result in wave if result == StepResult.FAILED]
    canary = number == 0 and rollout.canary is not None
    if failed and (canary or not rollout.continue_on_error):
        which = "the canary" if canary else wave_name(number, rollout.canary is not None)
        runs.skip_queued(None, f"not tried: stopped after {which} failed on {', '.join(failed)}")
    elif any(result == StepResult.WAITING for _, result in runs.wave(number + 1)):
        args = {"wave": number, "run": asdict(rollout)}
        defer(app, SCHEMA_GATE, rollout.queue, gate_lock(rollout.run_id, number), args, rollout.bake_s)


def schema_gate(context: procrastinate.JobContext, *, wave: int, run: dict[str, Any]) -> str:
    """After a queued rollout's wave (and its bake: the job is due then): run --check, then release
    the next wave's steps, or skip every step not yet started when the check fails.

    One gate of a run at a time (a catalog slot); a gate whose next wave is no longer waiting
    (released or skipped by another delivery) does nothing. A worker stopping mid-check ends the
    check and sends the gate back to the queue.
    """
    state: WorkerState = context.additional_context["migrator"]
    ctx, rollout = state.ctx, QueuedRun(**run)
    runs = RunLog(ctx.catalog, rollout.run_id, "upgrade", None)
    name = wave_name(wave, rollout.canary is not None)
    busy = f"another gate of rollout {rollout.run_id} is running"
    try:
        with catalog_slot(ctx, f"migrator.schema-gate:{rollout.run_id}", 1, busy, BUSY_RETRY_S):
            if not any(result == StepResult.WAITING for _, result in runs.wave(wave + 1)):
                return f"after {name}: the next wave is no longer waiting"
            if rollout.check is not None and not _check(state, runs, rollout, wave):
                return f"after {name}: check failed"
            released = runs.release(wave + 1)
            for stamp in released:
                lock = step_lock(rollout.run_id, stamp)
                defer(context.app, SCHEMA_STEP, rollout.queue, lock, {"stamp": stamp, "run": run})
    finally:
        runs.close()
    after = wave_name(wave + 1, rollout.canary is not None)
    state.say(f"schema  rollout {rollout.run_id[:8]}: {after} released ({', '.join(released)})")
    return f"{after} released"


def _check(state: WorkerState, runs: RunLog, rollout: QueuedRun, wave: int) -> bool:
    """The rollout's --check after `wave`, as a local rollout runs it; a failure skips every step not yet
    started. Raises `Requeue` when the worker stops during it."""
    assert rollout.check is not None
    canary = rollout.canary is not None
    after = "the canary" if wave == 0 and canary else wave_name(wave, canary)
    stamps = [stamp for stamp, _ in runs.wave(wave)]
    env = check_env(rollout.run_id, "upgrade", runs.target_of(), wave, wave_name(wave, canary), stamps)
    state.say(f"schema  rollout {rollout.run_id[:8]}: check after {after}: {rollout.check}")
    check = run_check(rollout.check, env, state.stop, lambda line: state.say(f"schema  {line}"))
    if check.exit_code is None:
        raise Requeue("worker stopping", 0)
    if check.passed:
        return True
    runs.skip_queued(None, f"not tried: {check.stopped(after)}; its last output: {check.output()}")
    state.say(f"schema  rollout {rollout.run_id[:8]}: {check.stopped(after)}")
    return False


def _step(ctx: Context, runs: RunLog, stamp: str, per_server: int, job: Job) -> StepResult | None:
    """Claim the stamp's row and run its step within a slot of its server; None: another worker has it."""
    refused = fenced_moves(ctx, [stamp])
    # Alembic runs one step at a time in a process (its context is module-global): a step waits
    # for it before it takes a server slot, so a waiting step holds none. Advisory locks are per
    # database: only the catalog, shared, can count a server's stamps.
    server = dsnlib.server_of(job.stamp.dsn)
    busy = f"{per_server} connection(s) to {server} in use (--connections-per-server)"
    with ALEMBIC_IN_PROCESS, catalog_slot(ctx, f"migrator.server-slot:{server}", per_server, busy, BUSY_RETRY_S / 4):
        row_id = runs.claim(stamp)
        if row_id is None:
            return None
        if stamp in refused:
            runs.finish(row_id, None, StepResult.FAILED, refused[stamp])
            return StepResult.FAILED
        done = run_stamp_step(job, None)
        if done.detail:
            log.info("stamp %s failed:\n%s", stamp, done.detail)
        runs.finish(row_id, done.from_revision, done.result, done.error)
        return done.result


def _finish(runs: RunLog, stamp: str, error: str) -> StepResult | None:
    """A step that cannot run here, recorded failed; None: another worker has claimed it."""
    row_id = runs.claim(stamp)
    if row_id is None:
        return None
    runs.finish(row_id, None, StepResult.FAILED, error)
    return StepResult.FAILED


# -- housekeeping ------------------------------------------------------------------------------------


async def requeue_stalled(context: procrastinate.JobContext, timestamp: int) -> int:
    """Send back to the queue the running jobs of workers whose heartbeat is older than the limit."""
    state: WorkerState = context.additional_context["migrator"]
    manager = context.app.job_manager
    stalled = await manager.get_stalled_jobs(seconds_since_heartbeat=state.stalled_after_s)
    for job in stalled:
        log.warning("job %s (%s) lost its worker %s: queued again", job.id, job.call_string, job.worker_id)
        await manager.retry_job(job)
    return len(list(stalled))
