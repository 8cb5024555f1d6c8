"""`apply FILE --queue`: send a plan's entries to the workers; `apply FILE --wait`: follow them.

Enqueueing runs the same `prepare` as a local apply, so a stale plan is refused before any job
exists. Each entry is one job with a queueing lock named after the plan's digest and position:
running `apply --queue` again while its jobs wait queues nothing twice.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from procrastinate.exceptions import AlreadyEnqueued, ConnectorException

from migrator.context import Context
from migrator.errors import BadInput, MigratorError
from migrator.plans.apply import ApplyOptions, EntryStatus, Ledger, LedgerEntry, PlanStatus, Prepared
from migrator.queue.tasks import DEFAULT_QUEUE, RUN_ENTRY, make_app

DEFAULT_MAX_ATTEMPTS = 3
NO_WORKER_GRACE_S = 3.0  # `--wait` says "waiting for a worker" when no worker is alive after this
UNCLAIMED_GRACE_S = 30.0  # `--wait` names a queue whose due jobs no live worker claimed for this long


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
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
) -> Queued:
    """Record the plan in the catalog and queue a job per remaining entry (see the module docstring)."""
    check_queue(ctx)
    ledger = Ledger(ctx.catalog)
    plan_id = ledger.open(prepared, queue=queue)
    app = make_app(ctx.catalog.url, min_size=1, max_size=1)
    try:
        queued = _defer_all(app, prepared, options, plan_id, queue, max_attempts)
    except ConnectorException as exc:  # the queue's own wrapper: say what the database said, in one line
        ledger.close(plan_id, PlanStatus.STOPPED)
        cause = str(exc.__cause__ or exc).strip().splitlines()[0]
        raise MigratorError(f"cannot queue plan {prepared.path}: {cause}") from None
    ledger.settle(plan_id)  # a plan with nothing left to run is done now
    return Queued(plan_id, queued[0], queued[1], live_workers(ctx))


def _defer_all(
    app: Any, prepared: Prepared, options: ApplyOptions, plan_id: int, queue: str, max_attempts: int
) -> tuple[dict[str, int], int]:
    jobs: dict[str, int] = {}
    already = 0
    with app.open():
        task = app.tasks[RUN_ENTRY]
        for entry in prepared.todo:
            where = entry.move.queue or queue
            try:
                task.configure(queue=where, queueing_lock=f"migrator.plan:{prepared.digest}:{entry.position}").defer(
                    plan_id=plan_id,
                    position=entry.position,
                    per_stamp=options.per_stamp,
                    max_attempts=max_attempts,
                    batch_rows=options.batch_rows,
                    jobs=options.jobs,
                    allow_triggers=options.allow_triggers,
                )
                jobs[where] = jobs.get(where, 0) + 1
            except AlreadyEnqueued:
                already += 1
    return jobs, already


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


def follow(
    ctx: Context,
    digest: str,
    say: Callable[[str], None],
    poll_s: float = 1.0,
    timeout_s: float | None = None,
    unclaimed_after_s: float = UNCLAIMED_GRACE_S,
) -> tuple[PlanStatus, list[LedgerEntry]]:
    """`apply --wait`: report each entry's changes until the plan is settled; returns how it ended.

    Progress is read from the catalog, not from the queue: a plan queued by another operator, or
    by an earlier `apply --queue`, is followed the same way. Workers do not say which queues they
    take, so a queue no live worker serves shows as jobs left unclaimed: named once, after
    `unclaimed_after_s`.
    """
    ledger = Ledger(ctx.catalog)
    found = ledger.plan(digest)
    if found is None:
        raise BadInput(f"plan {digest[:12]} was never applied or queued: nothing to follow")
    plan_id = found[0]
    seen: dict[int, tuple[str, int, str | None]] = {}
    waiting_since = time.monotonic()
    said_waiting = False
    said_unclaimed: set[str] = set()
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        entries = ledger.entries(plan_id)
        for e in entries:
            now = (e.status, e.failures, e.error)
            if seen.get(e.position) != now:
                if e.position in seen or e.status != EntryStatus.PENDING:
                    say(_line(e))
                seen[e.position] = now
        status = ledger.plan(digest)
        assert status is not None
        if status[1] != PlanStatus.RUNNING:
            return status[1], entries
        workers = live_workers(ctx)
        if any(e.status == EntryStatus.RUNNING for e in entries) or workers:
            waiting_since, said_waiting = time.monotonic(), False
        elif not said_waiting and time.monotonic() - waiting_since > NO_WORKER_GRACE_S:
            say("waiting for a worker: none is running (start one with `migrator worker`)")
            said_waiting = True
        if workers:
            for queue, count in unclaimed(ctx, plan_id, unclaimed_after_s).items():
                if queue not in said_unclaimed:
                    say(
                        f"waiting on queue {queue}: {count} move(s) unclaimed for over {unclaimed_after_s:.0f} s; "
                        f"every worker is busy, or none takes {queue} (`migrator worker --queue {queue}`)"
                    )
                    said_unclaimed.add(queue)
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"plan {digest[:12]} still running after {timeout_s:.0f} s")
        time.sleep(poll_s)


def _line(entry: LedgerEntry) -> str:
    who = " ".join(entry.tenants) if len(entry.tenants) <= 5 else f"{len(entry.tenants)} tenants"
    where = f"#{entry.position} {who} {entry.source} -> {entry.target}"
    if entry.status == EntryStatus.DONE:
        return f"done    {where} (move {entry.move_id})"
    if entry.status == EntryStatus.FAILED:
        return f"FAILED  {where}: {entry.error}"
    if entry.status == EntryStatus.RUNNING:
        return f"running {where}" + (f" (move {entry.move_id})" if entry.move_id else "")
    return f"queued  {where}" + (f": {entry.error}" if entry.error else "")
