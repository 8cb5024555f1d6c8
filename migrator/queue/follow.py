"""`plan wait` (`apply --queue --wait`) and `schema upgrade --queue --wait`: one loop follows queued work.

Progress is read from the catalog, not from the queue: a plan or rollout queued by another
operator, or by an earlier command, is followed the same way. While nothing runs and no worker is
alive, the loop says so once (`waiting for a worker`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from migrator.catalog import UNFINISHED_STEPS, EntryStatus, PlanStatus, StepResult
from migrator.catalog.plans import Ledger, LedgerEntry
from migrator.catalog.schema_runs import RunLog
from migrator.context import Context
from migrator.errors import BadInput
from migrator.queue.app import NO_WORKER_GRACE_S, UNCLAIMED_GRACE_S, gate_due, live_workers, unclaimed
from migrator.rollout.ripple import SAY_EVERY_S, format_duration

T = TypeVar("T")


@dataclass(frozen=True)
class Reading(Generic[T]):
    """One look at the followed work: its outcome once it ended (else None), and whether any part runs."""

    ended: T | None
    running: bool


def follow_until(
    ctx: Context,
    read: Callable[[], Reading[T]],
    say: Callable[[str], None],
    poll_s: float = 1.0,
    timeout_s: float | None = None,
    with_workers: Callable[[], None] = lambda: None,
) -> T:
    """Call `read` every `poll_s` until it returns an outcome; `with_workers` runs while workers live."""
    waiting_since, said_waiting = time.monotonic(), False
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        reading = read()
        if reading.ended is not None:
            return reading.ended
        workers = live_workers(ctx)
        if reading.running or workers:
            waiting_since, said_waiting = time.monotonic(), False
        elif not said_waiting and time.monotonic() - waiting_since > NO_WORKER_GRACE_S:
            say("waiting for a worker: none is running (start one with `migrator worker`)")
            said_waiting = True
        if workers:
            with_workers()
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"still running after {timeout_s:.0f} s")
        time.sleep(poll_s)


def follow(
    ctx: Context,
    digest: str,
    say: Callable[[str], None],
    poll_s: float = 1.0,
    timeout_s: float | None = None,
    unclaimed_after_s: float = UNCLAIMED_GRACE_S,
) -> tuple[PlanStatus, list[LedgerEntry]]:
    """`plan wait`: report each entry's changes until the plan is settled; returns how it ended.

    Workers do not say which queues they take, so a queue no live worker serves shows as jobs left
    unclaimed: named once, after `unclaimed_after_s`.
    """
    ledger = Ledger(ctx.catalog)
    found = ledger.plan(digest)
    if found is None:
        raise BadInput(f"plan {digest[:12]} was never applied or queued: nothing to follow")
    plan_id = found[0]
    seen: dict[int, tuple[str, int, str | None]] = {}
    said_unclaimed: set[str] = set()

    def read() -> Reading[tuple[PlanStatus, list[LedgerEntry]]]:
        entries = ledger.entries(plan_id)
        for e in entries:
            now = (e.status, e.failures, e.error)
            if seen.get(e.position) != now:
                if e.position in seen or e.status != EntryStatus.PENDING:
                    say(_line(e))
                seen[e.position] = now
        status = ledger.plan(digest)
        assert status is not None
        ended = (status[1], entries) if status[1] != PlanStatus.RUNNING else None
        return Reading(ended, any(e.status == EntryStatus.RUNNING for e in entries))

    def name_unclaimed() -> None:
        for queue, count in unclaimed(ctx, plan_id, unclaimed_after_s).items():
            if queue not in said_unclaimed:
                say(
                    f"waiting on queue {queue}: {count} move(s) unclaimed for over {unclaimed_after_s:.0f} s; "
                    f"every worker is busy, or none takes {queue} (`migrator worker --queue {queue}`)"
                )
                said_unclaimed.add(queue)

    try:
        return follow_until(ctx, read, say, poll_s, timeout_s, name_unclaimed)
    except TimeoutError:
        raise TimeoutError(f"plan {digest[:12]} still running after {timeout_s:.0f} s") from None


def follow_rollout(
    ctx: Context, run_id: str, say: Callable[[str], None], poll_s: float = 1.0
) -> list[tuple[str, StepResult, str | None]]:
    """`schema upgrade --queue --wait`: report stamps as they fail, and each later wave as its gate releases
    it, until none is waiting, queued or running."""
    runs = RunLog(ctx.catalog, run_id, "upgrade", None)
    reported: set[str] = set()
    waiting: set[str] = set()
    said_gate = 0.0  # when the gate's wait was last said

    def between_waves() -> None:
        """Between two waves: the bake's time left, or the check, every few seconds."""
        nonlocal said_gate
        due = gate_due(ctx, run_id)
        if due is None or time.monotonic() - said_gate < SAY_EVERY_S:
            return
        said_gate = time.monotonic()
        left = f"baking: {format_duration(math.ceil(due))} left" if due > 0 else "its gate runs (the check)"
        say(f"before the next wave, {left}")

    def read() -> Reading[list[tuple[str, StepResult, str | None]]]:
        rows = runs.rows()
        now_waiting = {name for name, result, _ in rows if result == StepResult.WAITING}
        released = sorted(
            name for name, result, _ in rows if name in waiting - now_waiting and result != StepResult.SKIPPED
        )
        if released:
            say(f"released {len(released)} stamp(s), the next wave: {', '.join(released)}")
        waiting.clear()
        waiting.update(now_waiting)
        for name, result, error in rows:
            if result not in UNFINISHED_STEPS and name not in reported:
                reported.add(name)
                if result == StepResult.FAILED:
                    say(f"FAILED  {name}: {error}")
        pending = [r for r in rows if r[1] in UNFINISHED_STEPS]
        if now_waiting and all(r[1] == StepResult.WAITING for r in pending):
            between_waves()
        return Reading(None if pending else rows, any(r[1] == StepResult.RUNNING for r in rows))

    try:
        return follow_until(ctx, read, say, poll_s)
    finally:
        runs.close()


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
