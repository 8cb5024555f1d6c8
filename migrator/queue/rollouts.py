"""`schema upgrade --queue`: a fleet rollout as one queued step per stamp, run by workers.

The rollout is planned and checked as a local one (`rollout.runner.plan_upgrade`: fenced stamps
refused, the canary chosen, every stamp's revision read within the same per-server budget) and
each stamp gets a `queued` row in `schema_runs`. Only the canary's step is queued at first; when
it succeeds, its job queues every other stamp's step (when it fails, they are recorded as
skipped). A later failure stops the steps not yet started, unless --continue-on-error. Each step
runs `rollout.worker.run_job` (the stamp's own lock, one transaction per revision) holding one of
--connections-per-server slots of the stamp's server, fleet-wide, so a thousand small stamps on a
few servers never open more than that many sessions on any of them. A row moves from queued to
running exactly once (`RunLog.claim`), so a step delivered twice runs once.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from procrastinate.exceptions import AlreadyEnqueued

from migrator.catalog.schema_runs import RunLog
from migrator.context import Context
from migrator.db import dsn as dsnlib
from migrator.errors import MigratorError
from migrator.queue.enqueue import NO_WORKER_GRACE_S, check_queue, live_workers
from migrator.queue.tasks import BUSY_RETRY_S, DEFAULT_QUEUE, SCHEMA_STEP, catalog_slot, make_app
from migrator.rollout.history import History
from migrator.rollout.runner import FAILED, OK, fenced_moves, plan_upgrade, record_not_run
from migrator.rollout.worker import ALEMBIC_IN_PROCESS, Job, run_job

DEFAULT_CONNECTIONS_PER_SERVER = 4


@dataclass(frozen=True)
class QueuedRollout:
    run_id: str
    target: str | None
    canary: str | None
    steps: int  # stamps queued
    skipped: int  # stamps with nothing to do
    workers: int


def enqueue_upgrade(
    ctx: Context,
    revision: str = "head",
    canary: str | None = None,
    active_only: bool = False,
    continue_on_error: bool = False,
    queue: str = DEFAULT_QUEUE,
    per_server: int = DEFAULT_CONNECTIONS_PER_SERVER,
    confirm: Callable[[Any], None] | None = None,
) -> QueuedRollout:
    """Plan and record the rollout, then queue its canary's step (or every step without a canary)."""
    check_queue(ctx)
    _, plan = plan_upgrade(ctx, revision, canary, active_only, per_server)
    steps = [name for wave in plan.waves for name in wave]
    if confirm is not None and steps:
        confirm(plan)
    log = RunLog(ctx.catalog, plan.run_id, plan.direction, plan.target)
    try:
        skipped = record_not_run(log, plan)
        log.queue([(name, plan.row(name).current) for name in steps])
    finally:
        log.close()
    common = {"run_id": plan.run_id, "per_server": per_server, "continue_on_error": continue_on_error}
    first = [plan.canary] if plan.canary else steps
    rest = [name for name in steps if name != plan.canary] if plan.canary else []
    app = make_app(ctx.catalog.url, min_size=1, max_size=1)
    with app.open():
        _defer(app, queue, [(name, {**common, "queue": queue, "rest": rest}) for name in first])
    return QueuedRollout(plan.run_id, plan.target, plan.canary, len(steps), len(skipped), live_workers(ctx))


def _defer(app: Any, queue: str, steps: list[tuple[str, dict[str, Any]]]) -> None:
    """One job per stamp, each with a queueing lock: a step re-sent while it waits is not queued twice."""
    task = app.tasks[SCHEMA_STEP]
    for stamp, args in steps:
        lock = f"migrator.schema:{args['run_id']}:{stamp}"
        with contextlib.suppress(AlreadyEnqueued):  # a canary's job run again after its worker died
            task.configure(queue=queue, queueing_lock=lock).defer(stamp=stamp, **args)


def run_step(
    ctx: Context,
    app: Any,
    *,
    run_id: str,
    stamp: str,
    per_server: int,
    continue_on_error: bool,
    queue: str,
    rest: list[str],
) -> str:
    """One stamp's step of a queued rollout, on a worker (see the module docstring); returns its result."""
    log = RunLog(ctx.catalog, run_id, "upgrade", None)
    try:
        rows = {name: (result, error) for name, result, error in log.rows()}
        if rows.get(stamp, ("", None))[0] not in ("queued", "running"):  # running: its worker died
            return f"stamp {stamp} is {rows.get(stamp, ('not in the run', None))[0]}: nothing to do"
        failed = sorted(name for name, (result, _) in rows.items() if result == FAILED)
        if failed and not continue_on_error:
            log.skip_queued([stamp], f"not tried: stopped after {', '.join(failed)} failed")
            return "skipped"
        target = _target(ctx, run_id)
        found = History.load(ctx.config.schema_env())
        if not found.known(target):
            return _finish(log, stamp, None, FAILED, f"revision {target} is not in this worker's {found.location}")
        record = ctx.catalog.stamp(stamp)
        refused = fenced_moves(ctx, [stamp])
        error: str | None
        # Alembic runs one step at a time in a process (its context is module-global): a step
        # waits for it before it takes a server slot, so a waiting step holds none. Advisory locks
        # are per database: only the catalog, shared, can count a server's stamps.
        server = dsnlib.server_of(record.dsn)
        busy = f"{per_server} connection(s) to {server} in use (--connections-per-server)"
        slot = catalog_slot(ctx, f"migrator.server-slot:{server}", per_server, busy, BUSY_RETRY_S / 4)
        with ALEMBIC_IN_PROCESS, slot:
            row_id = log.claim(stamp)
            if row_id is None:
                return "claimed by another worker"
            if stamp in refused:
                log.finish(row_id, None, FAILED, refused[stamp])
                result, error = FAILED, refused[stamp]
            else:
                job = run_job(Job(record, str(found.location), "upgrade", target))
                result, error = (OK if job.ok else FAILED), job.error
                log.finish(row_id, job.from_revision, result, error)
        if rest:  # the canary's job: the rest of the fleet now, or never
            if result == OK:
                common = {"run_id": run_id, "per_server": per_server, "continue_on_error": continue_on_error}
                _defer(app, queue, [(name, {**common, "queue": queue, "rest": []}) for name in rest])
            else:
                log.skip_queued(rest, f"not tried: stopped after the canary failed on {stamp}")
        return result
    finally:
        log.close()


def _finish(log: RunLog, stamp: str, before: str | None, result: str, error: str) -> str:
    row_id = log.claim(stamp)
    if row_id is not None:
        log.finish(row_id, before, result, error)
    return result


def _target(ctx: Context, run_id: str) -> str:
    with ctx.catalog.transaction() as conn:
        row = conn.execute("SELECT to_revision FROM schema_runs WHERE run_id = %s LIMIT 1", (run_id,)).fetchone()
    if row is None or row[0] is None:
        raise MigratorError(f"rollout {run_id} has no target revision")
    return str(row[0])


def follow_rollout(
    ctx: Context, run_id: str, say: Callable[[str], None], poll_s: float = 1.0
) -> list[tuple[str, str, str | None]]:
    """`schema upgrade --queue --wait`: report stamps as they finish until none is queued or running."""
    log = RunLog(ctx.catalog, run_id, "upgrade", None)
    reported: set[str] = set()
    idle_since, said = time.monotonic(), False
    try:
        while True:
            rows = log.rows()
            for name, result, error in rows:
                if result not in ("queued", "running") and name not in reported:
                    reported.add(name)
                    if result == FAILED:
                        say(f"FAILED  {name}: {error}")
            pending = [r for r in rows if r[1] in ("queued", "running")]
            if not pending:
                return rows
            if any(r[1] == "running" for r in rows) or live_workers(ctx):
                idle_since, said = time.monotonic(), False
            elif not said and time.monotonic() - idle_since > NO_WORKER_GRACE_S:
                say("waiting for a worker: none is running (start one with `migrator worker`)")
                said = True
            time.sleep(poll_s)
    finally:
        log.close()
