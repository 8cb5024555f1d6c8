"""Parallel copy streams: which tables, and which key ranges of a table, copy at the same time.

Up to `jobs` streams run at once, each a source and a target connection copying one part of one
table (`copy.copy_part`, resumable to the row). A large table is cut into parts (`copy.plan_parts`);
tables copy concurrently once every table they reference is complete, because the target checks
each copied row's foreign keys as it arrives. Where the target's sessions run as `replica` those
checks do not fire (the references are proven before the flip, `integrity.dangling`), so every
table may stream at once, except a path table, which waits for the tables its paths start from.
A foreign-key cycle, and a self-referencing table, is one stream.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from migrator.catalog import Cohort
from migrator.db import dsn as dsnlib
from migrator.db.retry import STAMP_STEP
from migrator.move import copy
from migrator.move.run import MoveRun
from migrator.stamps.access import ThreadSessions
from migrator.stamps.discovery import Table

MIN_PART_ROWS = 20_000  # smaller ranges are not worth a stream's two connections

Finished = Callable[[dict[str, copy.Cursor]], None]  # told each completed table's (or cycle's) cursors


@dataclass
class _Unit:
    """What becomes complete together: one table, or the tables of one foreign-key cycle."""

    tables: tuple[Table, ...]
    streams: int = 0  # parts still copying
    lock: threading.Lock = field(default_factory=threading.Lock)  # over `streams`, counted down by each
    rows: dict[str, int] = field(default_factory=dict)  # per table, the rows preflight counted

    @property
    def names(self) -> set[str]:
        return {t.name for t in self.tables}

    @property
    def parents(self) -> set[str]:
        return {p for t in self.tables for p in t.parents} - self.names

    @property
    def path_parents(self) -> set[str]:
        """The tables a path table's rows are found through: on the target (abort's deletes, verify)
        its rows are the tenant's only once their parents are there, so those copy first."""
        return {path.hops[0].parent for t in self.tables for path in t.paths} - self.names


def copy_tables(
    run: MoveRun,
    sources: ThreadSessions,
    targets: ThreadSessions,
    move_id: int,
    tenants: Cohort,
    totals: dict[str, int],
    finished: Finished,
) -> None:
    """Copy every table of the layout not yet complete on the target, --jobs streams at a time, each
    stream on its thread's sessions.

    `finished` is called (in this thread) as each table, or cycle, completes. On an error the
    streams already running finish their batch and the first error is raised; every part's
    committed cursor stays, so running the move again resumes each range where it stood.
    """
    layout, options, jobs = run.layout, run.options, run.options.jobs
    in_any_order = _replica_sessions(targets)  # the copy's sessions will be replica: no FK checks
    cursors = copy.read_cursors(targets, move_id, layout.tables)
    pending: list[_Unit] = []
    done: set[str] = set()
    for table in layout.tables:
        if cursors[table.label].done:
            done.add(table.name)
        elif not table.cycle or table.name == table.cycle[0]:
            pending.append(_Unit(layout.cycle_of(table)))
    stop = threading.Event()
    stream = copy.Stream(
        sources,
        targets,
        tenants,
        move_id,
        options.batch_rows,
        run.metrics.counting_copy(run.progress, run.source.name, run.target.name),
        options.rate_limit / jobs if options.rate_limit else None,
        stop,
        lambda: run.throttle.wait(move_id),
    )
    running: dict[Future[dict[str, copy.Cursor] | None], _Unit] = {}
    with ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="copy") as pool:
        try:
            while pending or running:
                if run.stop.is_set():  # a worker's SIGTERM: the parts end after their batch, none starts
                    stop.set()
                    pending.clear()
                for unit in [u for u in pending if (in_any_order or u.parents <= done) and u.path_parents <= done]:
                    pending.remove(unit)
                    _count_from(run, unit, totals, cursors)
                    unit.rows = {t.label: totals.get(t.label, 0) for t in unit.tables}
                    submits = _streams(stream, unit, totals, jobs)
                    unit.streams = len(submits)
                    running.update((pool.submit(_completing(stream, unit, submit)), unit) for submit in submits)
                if not (running or pending):  # stopped
                    break
                if not running:
                    raise RuntimeError(f"copy order stuck at {[u.names for u in pending]}")  # cannot happen
                complete, _ = wait(running, timeout=0.5, return_when=FIRST_COMPLETED)
                for future in complete:
                    done |= _ended(run, running.pop(future), future, finished)
        finally:  # on an error (or Ctrl-C) the other streams end after their current batch
            stop.set()
            pool.shutdown(cancel_futures=True)
    run.safe_point(move_id)  # stopped: the tables not complete keep their cursors, the copy is not done


@STAMP_STEP.wraps
def _replica_sessions(targets: ThreadSessions) -> bool:
    """Whether the copy's target sessions will write as replica (a read, retried like every copy step)."""
    return dsnlib.may_skip_triggers(targets.session(autocommit=True))


def _completing(
    stream: copy.Stream, unit: _Unit, submit: Callable[[], int]
) -> Callable[[], dict[str, copy.Cursor] | None]:
    """A stream of the unit; the one that ends last, unless the copy is stopping, then completes the
    unit's tables in its own thread (`complete_tables`: their statistics, then their cursors), while
    the other streams go on: in the scheduler's thread, each table's ANALYZE held up every start."""

    def run() -> dict[str, copy.Cursor] | None:
        submit()
        with unit.lock:
            unit.streams -= 1
            last = unit.streams == 0
        if not last or (stream.stop and stream.stop.is_set()):
            return None
        return copy.complete_tables(stream.targets, stream.move_id, unit.tables, unit.rows)

    return run


def _ended(run: MoveRun, unit: _Unit, future: Future[dict[str, copy.Cursor] | None], finished: Finished) -> set[str]:
    """A stream of the unit ended (its error raised here); the unit's tables once its last one completed them."""
    cursors = future.result()
    if cursors is None:
        return set()
    for table in unit.tables:
        run.progress.finish(table.label)
    finished(cursors)
    return unit.names


def _count_from(run: MoveRun, unit: _Unit, totals: dict[str, int], cursors: dict[str, copy.Cursor]) -> None:
    """Each table of the unit starts its counter, from the rows an earlier run copied."""
    for table in unit.tables:
        run.progress.start(table.label, totals.get(table.label, 0), cursors[table.label].rows)


def _streams(stream: copy.Stream, unit: _Unit, totals: dict[str, int], jobs: int) -> list[Callable[[], int]]:
    """One callable per stream of the unit: one per part of a table, one for a whole cycle."""
    sources, targets, tenants, move_id = stream.sources, stream.targets, stream.tenants, stream.move_id
    if len(unit.tables) > 1:
        return [lambda: copy.copy_cycle(sources, targets, unit.tables, tenants, move_id, stream.progress)]
    table = unit.tables[0]
    rows = totals.get(table.label, 0)
    pieces = max(1, min(jobs, rows // MIN_PART_ROWS))
    parts = copy.plan_parts(sources, targets, table, tenants, move_id, pieces, rows)

    def part(index: int) -> Callable[[], int]:
        return lambda: copy.copy_part(stream, table, index)

    return [part(p.index) for p in parts if not p.done]
