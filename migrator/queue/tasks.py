"""The queue's tasks and the procrastinate app they are registered on.

`run_entry` runs one plan entry (a cohort's move) on a worker. What happens after a failure is
decided here, with the catalog's count of the entry's failures, and handed to procrastinate as a
`Requeue` (retry in N seconds) or not at all: a busy stamp or tenant and a stop at a safe point
are waited out without counting; a transient error (a lost connection, a catch-up that did not
converge, a freeze that did not fit) counts, up to the plan's --max-attempts; anything else fails
the entry at once, visibly, and is never retried.

`requeue_stalled` is procrastinate's recipe for jobs whose worker died (kill -9, a lost machine):
every few seconds one worker sends back to the queue the running jobs of workers whose heartbeat
stopped. The move resumes from its catalog state on whichever worker claims it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NoReturn

import procrastinate
from procrastinate.retry import BaseRetryStrategy, RetryDecision

from migrator.catalog.locks import stamp_slot, take_slot
from migrator.context import Context
from migrator.db import dsn as dsnlib
from migrator.db.retry import is_transient
from migrator.errors import FreezeTooLong, Interrupted, LockBusy, NotConverging, Unreachable
from migrator.move import MoveOptions, move_tenants
from migrator.plans.apply import EntryStatus, Ledger, LedgerEntry, Todo, classify_entry, error_line
from migrator.plans.planners import PlannedMove
from migrator.progress import Silent

log = logging.getLogger("migrator.queue")

DEFAULT_QUEUE = "migrator"
HOUSEKEEPING_QUEUE = "migrator-housekeeping"  # every worker listens to it, whatever its --queue
RUN_ENTRY = "migrator.run_entry"
SCHEMA_STEP = "migrator.schema_step"
BUSY_RETRY_S = 2


class Requeue(Exception):
    """The entry goes back to the queue, to be claimed again (by any worker) after `after` seconds."""

    def __init__(self, message: str, after: float) -> None:
        super().__init__(message)
        self.after = after


class _Retries(BaseRetryStrategy):
    """Retry exactly what `run_entry` asked to retry; procrastinate's attempt count plays no part."""

    def get_retry_decision(self, *, exception: BaseException, job: Any) -> RetryDecision | None:
        if isinstance(exception, Requeue):
            return RetryDecision(retry_in={"seconds": int(exception.after)})
        return None


@dataclass
class WorkerState:
    """What this worker's tasks run with (procrastinate hands it over as additional context)."""

    ctx: Context
    stop: threading.Event
    stalled_after_s: float
    say: Callable[[str], None] = lambda line: None


def make_app(catalog_url: str, **pool: Any) -> procrastinate.App:
    """The procrastinate app on the catalog's database, with migrator's tasks registered."""
    connector = procrastinate.PsycopgConnector(
        conninfo=dsnlib.normalize(catalog_url), kwargs={"application_name": "migrator-queue"}, **pool
    )
    app = procrastinate.App(connector=connector)
    app.task(name=RUN_ENTRY, pass_context=True, retry=_Retries())(run_entry)
    app.task(name=SCHEMA_STEP, pass_context=True, retry=_Retries())(schema_step)
    stalled = app.task(
        name="migrator.requeue_stalled",
        pass_context=True,
        queue=HOUSEKEEPING_QUEUE,
        queueing_lock="migrator.requeue_stalled",
    )(requeue_stalled)
    app.periodic(cron="* * * * * */3")(stalled)  # every 3 seconds (the 6th field is seconds)
    return app


def run_entry(
    context: procrastinate.JobContext,
    *,
    plan_id: int,
    position: int,
    per_stamp: int,
    max_attempts: int,
    batch_rows: int,
    jobs: int,
    allow_triggers: bool,
) -> str:
    """Run (or resume) one plan entry's move; returns how it ended, for the queue's own record."""
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
        ledger.mark(plan_id, position, EntryStatus.RUNNING, classified.resume.id if classified.resume else None)
        what = f"plan {plan_id} #{position}: {planned.who} {entry.source} -> {entry.target}"
        state.say(f"start   {what}" + (f" ({classified.note})" if classified.resume else ""))
        options = MoveOptions(batch_rows=batch_rows, jobs=jobs, allow_triggers=allow_triggers)
        try:
            outcome = move_tenants(ctx, planned.tenants, entry.target, options, Silent(), stop=state.stop)
        except (Interrupted, LockBusy) as exc:  # a safe point, or someone else's move of a tenant: not a failure
            ledger.mark(plan_id, position, EntryStatus.PENDING, error=error_line(ctx, exc))
            state.say(f"requeue {what}: {error_line(ctx, exc)}")
            raise Requeue(str(exc), 0 if isinstance(exc, Interrupted) else BUSY_RETRY_S) from None
        except Exception as exc:
            reason = error_line(ctx, exc)
            state.say(f"FAILED  {what}: {reason}")
            if not _transient(exc):
                _fail(ledger, plan_id, entry, reason, exc)
            failures = ledger.failed_attempt(plan_id, position, f"attempt {entry.failures + 1}: {reason}")
            if failures >= max_attempts:
                _fail(ledger, plan_id, entry, f"{reason} (failed {failures} times, the limit)", exc)
            log.warning("plan %s entry %s failed (%s), retrying: %s", plan_id, position, failures, reason)
            raise Requeue(reason, min(60, 2**failures)) from exc
    assert outcome.move is not None
    ledger.mark(plan_id, position, EntryStatus.DONE, outcome.move.id)
    state.say(f"done    {what} (move {outcome.move.id})")
    ledger.settle(plan_id)
    return f"move {outcome.move.id} flipped"


def _transient(exc: Exception) -> bool:
    """Worth another attempt later: a lost connection or unreachable stamp, a catch-up that did not
    converge, a freeze that did not fit (each leaves the move resumable)."""
    if isinstance(exc, Unreachable):
        return exc.transient
    return is_transient(exc) or isinstance(exc, NotConverging | FreezeTooLong)


def _fail(ledger: Ledger, plan_id: int, entry: LedgerEntry, reason: str, exc: Exception | None = None) -> NoReturn:
    """The entry failed for good: recorded, the plan settled if it was the last; the job fails too."""
    unfinished = next(iter(ledger.catalog.open_moves(tuple(entry.tenants))), None)
    ledger.mark(plan_id, entry.position, EntryStatus.FAILED, unfinished.id if unfinished else None, reason)
    ledger.settle(plan_id)
    raise EntryFailed(reason) from exc


class EntryFailed(Exception):
    """The job's end for an entry that failed for good (procrastinate records the job as failed)."""


@contextlib.contextmanager
def catalog_slot(ctx: Context, name: str, size: int, busy: str, retry_after: float) -> Iterator[None]:
    """One of the `size` slots `name` (`catalog.locks.take_slot`) for the block; when every one is
    taken the job is requeued (`busy` says why)."""
    conn = take_slot(ctx.catalog.url, name, size)
    if conn is None:
        raise Requeue(busy, retry_after)
    with conn:
        yield


def schema_step(context: procrastinate.JobContext, **args: Any) -> str:
    """One stamp's step of a queued rollout (`migrator.queue.rollouts.run_step`)."""
    from migrator.queue.rollouts import run_step  # imports Alembic's runner: only where a step runs

    state: WorkerState = context.additional_context["migrator"]
    result = run_step(state.ctx, context.app, **args)
    state.say(f"schema  {args['stamp']}: {result}")
    return result


async def requeue_stalled(context: procrastinate.JobContext, timestamp: int) -> int:
    """Send back to the queue the running jobs of workers whose heartbeat is older than the limit."""
    state: WorkerState = context.additional_context["migrator"]
    manager = context.app.job_manager
    stalled = await manager.get_stalled_jobs(seconds_since_heartbeat=state.stalled_after_s)
    for job in stalled:
        log.warning("job %s (%s) lost its worker %s: queued again", job.id, job.call_string, job.worker_id)
        await manager.retry_job(job)
    return len(list(stalled))
