"""One plan entry's run, whoever schedules it: a local `apply`'s threads or a `migrator worker`.

`execute_entry` records the entry running, runs (or resumes) its cohort's move, records it done,
and says how a failure should be read: a wait (the move stopped at a safe point, or another
operator's move holds a tenant), a transient failure (a lost connection, a catch-up that did not
converge, a freeze that did not fit: each leaves the move resumable) or a lasting one. What to do
about a failure is the scheduler's: a local apply records it failed at once, a worker may retry it.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field
from enum import StrEnum

from migrator.catalog import EntryStatus, Move
from migrator.catalog.plans import Ledger
from migrator.context import Context
from migrator.db import dsn as dsnlib
from migrator.db.retry import is_transient
from migrator.errors import FreezeTooLong, Interrupted, LockBusy, MigratorError, NotConverging, Unreachable
from migrator.move import MoveOptions, move_tenants
from migrator.plans.planners import PlannedMove
from migrator.progress import Progress


class Todo(StrEnum):
    """What a run has to do with a plan entry, decided by `prepare` (a worker: when it claims it)."""

    RUN = "run"
    RESUME = "resume"  # the entry's tenants have its move unfinished
    DONE = "done"  # in an earlier run of the plan, or the tenants are already on the target


@dataclass(frozen=True)
class Entry:
    """A plan move with its position and what a run has to do with it."""

    position: int
    move: PlannedMove
    todo: Todo
    note: str = ""
    resume: Move | None = field(default=None, compare=False)


class Failure(StrEnum):
    """How a failed run of an entry reads to its scheduler."""

    WAIT = "wait"  # stopped at a safe point, or a tenant busy in someone else's move: not a failure
    TRANSIENT = "transient"  # worth another attempt later; the move is resumable
    LASTING = "lasting"  # no retry cures it


@dataclass(frozen=True)
class EntryRun:
    """How one run of an entry ended: done (with its move), or failed and why (`reason`, one line)."""

    status: EntryStatus  # DONE or FAILED
    move_id: int | None = None  # the move done, or the cohort's unfinished move after a failure
    reason: str = ""
    rows: int = 0
    resumed: bool = False
    seconds: float = 0.0
    failure: Failure | None = None
    error: Exception | None = field(default=None, compare=False, repr=False)


def execute_entry(
    ctx: Context,
    plan_id: int,
    entry: Entry,
    options: MoveOptions,
    progress: Progress,
    stop: threading.Event | None = None,
) -> EntryRun:
    """Run (or resume) the entry's move: recorded running, then done; a failure is returned, not
    raised, and not recorded (see the module docstring)."""
    move, ledger = entry.move, Ledger(ctx.catalog)
    started = time.monotonic()
    ledger.mark(plan_id, entry.position, EntryStatus.RUNNING, entry.resume.id if entry.resume else None)
    try:
        outcome = move_tenants(ctx, move.tenants, move.target, options, progress, stop=stop)
    except Exception as exc:  # one failed move must not stop the scheduler
        unfinished = next(iter(ctx.catalog.open_moves(move.tenants)), None)
        return EntryRun(
            EntryStatus.FAILED,
            unfinished.id if unfinished else None,
            error_line(ctx, exc),
            seconds=time.monotonic() - started,
            failure=failure_of(exc),
            error=exc,
        )
    assert outcome.move is not None
    ledger.mark(plan_id, entry.position, EntryStatus.DONE, outcome.move.id)
    return EntryRun(
        EntryStatus.DONE,
        outcome.move.id,
        rows=outcome.move.rows_copied,
        resumed=outcome.resumed,
        seconds=time.monotonic() - started,
    )


def failure_of(exc: Exception) -> Failure:
    """A stop or a busy tenant waits; a lost connection or unreachable stamp, a catch-up that did not
    converge or a freeze that did not fit is transient; anything else lasts."""
    if isinstance(exc, Interrupted | LockBusy):
        return Failure.WAIT
    if isinstance(exc, Unreachable):
        return Failure.TRANSIENT if exc.transient else Failure.LASTING
    if is_transient(exc) or isinstance(exc, NotConverging | FreezeTooLong):
        return Failure.TRANSIENT
    return Failure.LASTING


def error_line(ctx: Context, exc: Exception) -> str:
    """The error's first line, without any stamp's or the catalog's password."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    if not isinstance(exc, MigratorError):
        first = f"{type(exc).__name__}: {first}"
    with contextlib.suppress(Exception):
        first = dsnlib.scrub(first, ctx.catalog.url, *(s.dsn for s in ctx.catalog.stamps()))
    return first
