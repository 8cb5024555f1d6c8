"""What is about the queue itself: task names and queues, the retry decision handed to procrastinate,
what a worker's tasks run with, the catalog slots a job waits for, and reading procrastinate's tables
(is the queue there, which workers live, which jobs no one claimed).

It imports no other module of `migrator.queue`: the tasks (`tasks`), sending work (`enqueue`),
following it (`follow`) and the worker process (`worker`) all build on it.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from procrastinate.exceptions import AlreadyEnqueued
from procrastinate.retry import BaseRetryStrategy, RetryDecision

from migrator.catalog.locks import take_slot
from migrator.context import Context
from migrator.errors import BadInput
from migrator.move.throttle import ThrottleOptions

DEFAULT_QUEUE = "migrator"
HOUSEKEEPING_QUEUE = "migrator-housekeeping"  # every worker listens to it, whatever its --queue
RUN_ENTRY = "migrator.run_entry"
SCHEMA_STEP = "migrator.schema_step"
SCHEMA_GATE = "migrator.schema_gate"
REQUEUE_STALLED = "migrator.requeue_stalled"
BUSY_RETRY_S = 2
NO_WORKER_GRACE_S = 3.0  # `--wait` says "waiting for a worker" when no worker is alive after this
UNCLAIMED_GRACE_S = 30.0  # `plan wait` names a queue whose due jobs no live worker claimed for this long


class Requeue(Exception):
    """The job goes back to the queue, to be claimed again (by any worker) after `after` seconds."""

    def __init__(self, message: str, after: float) -> None:
        super().__init__(message)
        self.after = after


class Retries(BaseRetryStrategy):
    """Retry exactly what a task asked to retry (`Requeue`); procrastinate's attempt count plays no part."""

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
    throttle: ThrottleOptions = field(default_factory=ThrottleOptions)  # `migrator worker`'s throttle flags


@contextlib.contextmanager
def catalog_slot(ctx: Context, name: str, size: int, busy: str, retry_after: float) -> Iterator[None]:
    """One of the `size` slots `name` (`catalog.locks.take_slot`) for the block; when every one is
    taken the job is requeued (`busy` says why)."""
    conn = take_slot(ctx.catalog.url, name, size)
    if conn is None:
        raise Requeue(busy, retry_after)
    with conn:
        yield


def defer(app: Any, task: str, queue: str, lock: str, args: dict[str, Any], after_s: float = 0) -> bool:
    """Queue one job of `task` under the queueing lock `lock`, due in `after_s` seconds; False when that
    job already waits."""
    when = {"schedule_in": {"seconds": after_s}} if after_s > 0 else {}
    try:
        app.tasks[task].configure(queue=queue, queueing_lock=lock, **when).defer(**args)
    except AlreadyEnqueued:
        return False
    return True


def step_lock(run_id: str, stamp: str) -> str:
    """The queueing lock of a rollout's step: a step sent again while it waits is not queued twice."""
    return f"migrator.schema:{run_id}:{stamp}"


def gate_lock(run_id: str, wave: int) -> str:
    """The queueing lock of the gate after a rollout's wave (several steps may each see the wave end)."""
    return f"migrator.schema-gate:{run_id}:{wave}"


@dataclass(frozen=True)
class QueuedRun:
    """What every job of a queued rollout carries (as JSON: `vars`): its run, budget and gate."""

    run_id: str
    queue: str
    per_server: int
    continue_on_error: bool
    canary: str | None  # its wave (0) stops the rollout when it fails, whatever --continue-on-error
    bake_s: float = 0.0
    check: str | None = None


def check_queue(ctx: Context) -> None:
    """Refuse before recording anything when the queue's tables are missing or out of the role's reach."""
    with ctx.catalog.transaction() as conn:
        row = conn.execute(
            "SELECT CASE WHEN to_regclass('procrastinate_jobs') IS NULL THEN false"
            " ELSE has_table_privilege('procrastinate_jobs', 'INSERT') END"
        ).fetchone()
    if not (row and row[0]):
        raise BadInput(
            "the catalog has no job queue this role may use: run `migrator catalog init` (as the catalog's owner) "
            "and grant the queue's tables (README, 'Privileges a move needs')"
        )


def live_workers(ctx: Context, within_s: float = 30.0) -> int:
    """Workers whose heartbeat is at most `within_s` old (procrastinate's `procrastinate_workers`)."""
    with ctx.catalog.transaction() as conn:
        row = conn.execute(
            "SELECT count(*) FROM procrastinate_workers WHERE last_heartbeat > now() - make_interval(secs => %s)",
            (within_s,),
        ).fetchone()
    return int(row[0]) if row else 0


def unclaimed(ctx: Context, plan_id: int, older_than_s: float) -> dict[str, int]:
    """The plan's jobs due for `older_than_s` (since queued, retried or due) that no worker took, by queue."""
    with ctx.catalog.transaction() as conn:
        rows = conn.execute(
            "SELECT j.queue_name, count(*) FROM procrastinate_jobs j"
            " WHERE j.status = 'todo' AND j.task_name = %s AND (j.args->>'plan_id')::bigint = %s"
            " AND greatest(j.scheduled_at, (SELECT max(e.at) FROM procrastinate_events e WHERE e.job_id = j.id))"
            "  < now() - make_interval(secs => %s)"
            " GROUP BY 1 ORDER BY 1",
            (RUN_ENTRY, plan_id, older_than_s),
        ).fetchall()
    return {str(queue): int(count) for queue, count in rows}


def gate_due(ctx: Context, run_id: str) -> float | None:
    """Seconds until the rollout's pending gate is due (0 or less: due, or a worker runs it); None: no gate
    waits (procrastinate's `procrastinate_jobs`)."""
    with ctx.catalog.transaction() as conn:
        row = conn.execute(
            "SELECT extract(epoch FROM min(coalesce(scheduled_at, now())) - now()) FROM procrastinate_jobs"
            " WHERE task_name = %s AND status IN ('todo', 'doing') AND args->'run'->>'run_id' = %s",
            (SCHEMA_GATE, run_id),
        ).fetchone()
    return None if row is None or row[0] is None else float(row[0])
