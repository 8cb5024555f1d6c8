"""Carrying out a plan: its moves (each a cohort of tenants) through `move_tenants`, in parallel,
recorded so a re-run resumes.

`prepare` reads the file and refuses a stale plan before anything runs (tenants no longer where
planned, targets no longer active or too full). `run` starts at most --parallel moves at once,
at most --per-stamp per target stamp (slots in the catalog, counted by every apply and worker of
the fleet), never two for one tenant, and records each entry's status
in the catalog tables `plans` / `plan_moves`, keyed by the sha256 of the file's bytes. Running
the same file again skips finished entries and resumes the rest (`move_tenants` resumes a
cohort's unfinished move by itself). Ctrl-C stops starting moves and lets running ones finish.
"""

from __future__ import annotations

import contextlib
import hashlib
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

import psycopg
from psycopg.rows import class_row

from migrator.catalog import Catalog, Move, Stamp
from migrator.catalog.locks import stamp_slot, take_slot
from migrator.context import Context
from migrator.db import dsn as dsnlib
from migrator.db.locks import lock_key, try_lock
from migrator.errors import BadInput, LockBusy, MigratorError
from migrator.move import MoveOptions, move_tenants
from migrator.move.run import default_jobs
from migrator.plans.capacity import measure_fleet, shift
from migrator.plans.planners import Plan, PlannedMove, check_stamps, load_plan
from migrator.progress import Silent

SLOT_POLL_S = 0.5  # how often the slots of a target held by other applies or workers are tried again


@dataclass(frozen=True)
class ApplyOptions:
    """Flags of `migrator apply`: --parallel, --per-stamp, --stop-on-error, --batch-rows, --jobs,
    --allow-triggers."""

    parallel: int = 1
    per_stamp: int = 1
    stop_on_error: bool = False
    batch_rows: int = 50_000
    jobs: int = field(default_factory=default_jobs)  # each move's streams, see MoveOptions
    allow_triggers: bool = False  # each move's, see MoveOptions


class Todo(StrEnum):
    """What a run has to do with a plan entry, decided by `prepare`."""

    RUN = "run"
    RESUME = "resume"  # the entry's tenants have its move unfinished
    DONE = "done"  # in an earlier run of the plan, or the tenants are already on the target


class EntryStatus(StrEnum):
    """An entry's status, as `plan_moves.status` records it and each entry's result reports it."""

    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"  # in a result: done before this run, or not started (`ApplyResult.not_started`)


class PlanStatus(StrEnum):
    """A plan's status (`plans.status`): running, then how its last run ended."""

    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    STOPPED = "stopped"  # interrupted or --stop-on-error before every entry started


@dataclass(frozen=True)
class Entry:
    """A plan move with its position and what a run has to do with it."""

    position: int
    move: PlannedMove
    todo: Todo
    note: str = ""
    resume: Move | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Prepared:
    """A validated plan ready to run: its entries and the identity of the file (path, digest)."""

    path: str
    digest: str
    plan: Plan
    entries: tuple[Entry, ...]

    @property
    def todo(self) -> list[Entry]:
        return [e for e in self.entries if e.todo != Todo.DONE]


@dataclass(frozen=True)
class EntryResult:
    """How one entry ended in this run: done, failed or skipped, and why."""

    position: int
    tenants: tuple[str, ...]
    source: str
    target: str
    status: EntryStatus
    reason: str = ""
    move_id: int | None = None
    rows: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class ApplyResult:
    path: str
    digest: str
    status: PlanStatus
    results: tuple[EntryResult, ...]
    interrupted: bool = False
    not_started: int = 0  # entries skipped because the run stopped before starting them

    def having(self, status: str) -> list[EntryResult]:
        return [r for r in self.results if r.status == status]


class ApplyProgress(Protocol):
    """How `apply` reports, from any thread (the CLI draws an overall tqdm bar and one line per event)."""

    def begin(self, prepared: Prepared) -> None:
        """The plan's remaining entries are about to run."""

    def started(self, entry: Entry) -> None:
        """An entry's move (or its resume) started."""

    def rows(self, count: int) -> None:
        """`count` more rows were copied by any of the running moves."""

    def finished(self, result: EntryResult) -> None:
        """An entry's move ended, done or failed."""

    def note(self, message: str) -> None:
        """Something the operator should read (an interruption)."""


class SilentApply:
    """The apply reporter of `--json` runs and benchmarks: says nothing until the result."""

    def begin(self, prepared: Prepared) -> None:
        pass

    def started(self, entry: Entry) -> None:
        pass

    def rows(self, count: int) -> None:
        pass

    def finished(self, result: EntryResult) -> None:
        pass

    def note(self, message: str) -> None:
        pass


# -- prepare: parse, validate, refuse stale plans -------------------------------------------------------


def plan_digest(path: Path) -> str:
    """The key of a plan's run in the catalog: the sha256 of the file's bytes."""
    _, content = load_plan(path)
    return hashlib.sha256(content).hexdigest()


def prepare(ctx: Context, path: Path) -> Prepared:
    """Parse the plan and check it still holds against the catalog and the stamps; changes nothing."""
    plan, content = load_plan(path)
    where = str(path)
    known = check_stamps(plan, ctx.catalog, where)
    digest = hashlib.sha256(content).hexdigest()
    recorded = Ledger(ctx.catalog).statuses(digest)
    entries, stale = [], []
    for position, move in enumerate(plan.moves):
        entry, problem = classify_entry(ctx.catalog, position, move, recorded.get(position))
        if problem is None and entry.todo != Todo.DONE and known[move.target].state != "active":
            problem = f"target {move.target} is {known[move.target].state}"
        if problem:
            stale.append(f"moves[{position}] (line {move.line}) {problem}")
        entries.append(entry)
    if not stale:
        stale = _capacity_problems(ctx, entries, known)
    if stale:
        raise BadInput(f"stale plan {where}: {'; '.join(stale)}; make a new plan")
    return Prepared(where, digest, plan, tuple(entries))


def classify_entry(
    catalog: Catalog, position: int, move: PlannedMove, recorded: EntryStatus | None
) -> tuple[Entry, str | None]:
    """What a run must do with one entry (a cohort), or why the entry no longer holds (naming a tenant)."""
    if recorded == EntryStatus.DONE:
        return Entry(position, move, Todo.DONE, "done in an earlier run of this plan"), None
    routes = {r.tenant: r for r in catalog.routes_of(move.tenants)}
    gone = [t for t in move.tenants if t not in routes]
    if gone:
        return Entry(position, move, Todo.RUN), f"tenant {gone[0]}: no longer in the catalog"
    for unfinished in catalog.open_moves(move.tenants):
        same = (set(unfinished.tenants), unfinished.source, unfinished.target) == (
            set(move.tenants),
            move.source,
            move.target,
        )
        if same:
            return Entry(
                position, move, Todo.RESUME, f"resume move {unfinished.id} at {unfinished.phase}", unfinished
            ), None
        held = next(t for t in move.tenants if t in unfinished.tenants)
        return Entry(position, move, Todo.RUN), (
            f"tenant {held}: has an unfinished move {unfinished.id} {unfinished.source} -> {unfinished.target}"
        )
    if all(routes[t].stamp == move.target for t in move.tenants):
        return Entry(position, move, Todo.DONE, f"already on {move.target}"), None
    for tenant in move.tenants:
        if routes[tenant].stamp != move.source:
            return Entry(position, move, Todo.RUN), (
                f"tenant {tenant}: is routed to {routes[tenant].stamp}, the plan moves it from {move.source}"
            )
    return Entry(position, move, Todo.RUN), None


def _capacity_problems(ctx: Context, entries: list[Entry], known: dict[str, Stamp]) -> list[str]:
    """Each target's use after the remaining moves, measured now, must fit its capacity."""
    todo = [e for e in entries if e.todo != Todo.DONE]
    if not todo:
        return []
    names = sorted({e.move.source for e in todo} | {e.move.target for e in todo})
    sizes = measure_fleet(ctx, [known[n] for n in names])
    usage = dict(sizes.usage)
    for entry in todo:
        measured = [sizes.tenants[t] for t in entry.move.tenants if t in sizes.tenants]
        rows, size = (
            (sum(t.rows for t in measured), sum(t.bytes for t in measured))
            if len(measured) == len(entry.move.tenants)
            else (entry.move.rows, entry.move.bytes)
        )
        shift(usage, entry.move.source, entry.move.target, rows, size)
    return [
        f"capacity: {name} would hold {o.used:,} {o.unit}, capacity {o.capacity:,} ({o.short:,} {o.unit} short)"
        for name in sorted({e.move.target for e in todo})
        for o in usage[name].overruns()
    ]


# -- the ledger: plans / plan_moves in the catalog -------------------------------------------------------


class Ledger:
    """A plan's progress in the catalog, keyed by the sha256 digest of the plan file's bytes."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    def statuses(self, digest: str) -> dict[int, EntryStatus]:
        with self.catalog.transaction() as conn:
            rows = conn.execute(
                "SELECT m.position, m.status FROM plan_moves m JOIN plans p ON p.id = m.plan_id WHERE p.digest = %s",
                (digest,),
            ).fetchall()
        return {int(position): EntryStatus(status) for position, status in rows}

    def open(self, prepared: Prepared, queue: str | None = None) -> int:
        """Record the plan and its entries (once; a re-run keeps their status) and mark it running.

        With `queue` (`apply --queue`), each entry records the workers' queue it is sent to: its own
        `queue:` from the file, else `queue`.
        """
        with self.catalog.transaction() as conn:
            row = conn.execute(
                "INSERT INTO plans (digest, path, kind) VALUES (%s, %s, %s) ON CONFLICT (digest)"
                " DO UPDATE SET status = %s, path = EXCLUDED.path, updated_at = now() RETURNING id",
                (prepared.digest, prepared.path, prepared.plan.kind, PlanStatus.RUNNING),
            ).fetchone()
            assert row is not None
            plan_id = int(row[0])
            with conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO plan_moves (plan_id, position, tenant, tenants, source, target, size_rows,"
                    " size_bytes, queue) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (plan_id, position)"
                    " DO UPDATE SET tenants = EXCLUDED.tenants, queue = EXCLUDED.queue",
                    [
                        (
                            plan_id,
                            e.position,
                            e.move.tenants[0],
                            list(e.move.tenants),
                            e.move.source,
                            e.move.target,
                            e.move.rows,
                            e.move.bytes,
                            queue and (e.move.queue or queue),
                        )  # fmt: skip
                        for e in prepared.entries
                    ],
                )
            for entry in prepared.entries:
                if entry.todo == Todo.DONE:
                    conn.execute(
                        "UPDATE plan_moves SET status = %(done)s, error = NULL, updated_at = now()"
                        " WHERE plan_id = %(plan)s AND position = %(position)s AND status <> %(done)s",
                        {"done": EntryStatus.DONE, "plan": plan_id, "position": entry.position},
                    )
        return plan_id

    def mark(
        self, plan_id: int, position: int, status: EntryStatus, move_id: int | None = None, error: str | None = None
    ) -> None:
        with self.catalog.transaction() as conn:
            conn.execute(
                "UPDATE plan_moves SET status = %s, move_id = coalesce(%s, move_id), error = %s, updated_at = now()"
                " WHERE plan_id = %s AND position = %s",
                (status, move_id, None if error is None else error[:2000], plan_id, position),
            )

    def close(self, plan_id: int, status: PlanStatus) -> None:
        with self.catalog.transaction() as conn:
            conn.execute("UPDATE plans SET status = %s, updated_at = now() WHERE id = %s", (status, plan_id))

    def entries(self, plan_id: int, position: int | None = None) -> list[LedgerEntry]:
        """The recorded entries of a plan (or one of them), as workers and `apply --status` read them."""
        with self.catalog.transaction() as conn, conn.cursor(row_factory=class_row(LedgerEntry)) as cur:
            cur.execute(
                "SELECT position, coalesce(tenants, ARRAY[tenant]) AS tenants, source, target, size_rows AS rows,"
                " status, move_id, queue, failures, error FROM plan_moves"
                " WHERE plan_id = %s AND (%s::integer IS NULL OR position = %s) ORDER BY position",
                (plan_id, position, position),
            )
            return cur.fetchall()

    def plan(self, digest: str) -> tuple[int, PlanStatus] | None:
        with self.catalog.transaction() as conn:
            row = conn.execute("SELECT id, status FROM plans WHERE digest = %s", (digest,)).fetchone()
        return None if row is None else (int(row[0]), PlanStatus(row[1]))

    def failed_attempt(self, plan_id: int, position: int, error: str) -> int:
        """A worker's run of the entry failed and may be retried: back to pending; returns failures so far."""
        with self.catalog.transaction() as conn:
            row = conn.execute(
                "UPDATE plan_moves SET status = %s, failures = failures + 1, error = %s, updated_at = now()"
                " WHERE plan_id = %s AND position = %s RETURNING failures",
                (EntryStatus.PENDING, error[:2000], plan_id, position),
            ).fetchone()
        assert row is not None
        return int(row[0])

    def settle(self, plan_id: int) -> PlanStatus | None:
        """Once no entry is pending or running, the plan is done or failed (workers end plans this way)."""
        with self.catalog.transaction() as conn:
            row = conn.execute(
                "UPDATE plans p SET status = CASE WHEN EXISTS (SELECT 1 FROM plan_moves m WHERE m.plan_id = p.id"
                " AND m.status = %(failed)s) THEN %(failed)s ELSE %(done)s END, updated_at = now()"
                " WHERE p.id = %(plan)s AND NOT EXISTS (SELECT 1 FROM plan_moves m WHERE m.plan_id = p.id"
                " AND m.status IN (%(pending)s, %(running)s)) RETURNING p.status",
                {
                    "failed": EntryStatus.FAILED,
                    "done": EntryStatus.DONE,
                    "pending": EntryStatus.PENDING,
                    "running": EntryStatus.RUNNING,
                    "plan": plan_id,
                },
            ).fetchone()
        return None if row is None else PlanStatus(row[0])


@dataclass(frozen=True)
class LedgerEntry:
    """An entry as the catalog records it (`plan_moves`): what workers run and `apply --status` shows."""

    position: int
    tenants: list[str]
    source: str
    target: str
    rows: int
    status: EntryStatus
    move_id: int | None
    queue: str | None
    failures: int
    error: str | None


@contextlib.contextmanager
def _plan_lock(catalog: Catalog, digest: str, where: str) -> Iterator[None]:
    """One `apply` of a plan at a time: a session advisory lock, released when the process dies."""
    conn = dsnlib.connect(catalog.url, autocommit=True)
    try:
        if not try_lock(conn, lock_key(f"migrator.plan:{digest}")):
            raise LockBusy(f"plan {where} is being applied by another running migrator")
        yield
    finally:
        conn.close()


# -- run ------------------------------------------------------------------------------------------------


class _MoveProgress(Silent):
    """A move's Progress that only feeds the overall bar: parallel moves draw no per-table bars."""

    def __init__(self, reporter: ApplyProgress) -> None:
        self.reporter = reporter
        self.counted = 0
        self._lock = threading.Lock()  # the move's copy streams report from their own threads

    def start_table(self, table: str, total: int, done: int) -> None:
        self._count(done)

    def advance(self, table: str, rows: int) -> None:
        self._count(rows)

    def _count(self, rows: int) -> None:
        if rows:
            with self._lock:
                self.counted += rows
                self.reporter.rows(rows)


@contextlib.contextmanager
def _interrupts(stop: threading.Event) -> Iterator[None]:
    """Ctrl-C (SIGINT) sets `stop` instead of raising, so no catalog write is cut in half."""
    try:
        previous = signal.signal(signal.SIGINT, lambda signum, frame: stop.set())
    except ValueError:  # not the main thread: the caller stops us through `stop`
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def run(
    ctx: Context,
    prepared: Prepared,
    options: ApplyOptions,
    reporter: ApplyProgress,
    stop: threading.Event | None = None,
) -> ApplyResult:
    """Run the plan's remaining entries (see the module docstring); returns every entry's outcome."""
    stop = stop or threading.Event()
    ledger = Ledger(ctx.catalog)
    with _plan_lock(ctx.catalog, prepared.digest, prepared.path), _interrupts(stop):
        plan_id = ledger.open(prepared)
        reporter.begin(prepared)
        results = [
            EntryResult(e.position, e.move.tenants, e.move.source, e.move.target, EntryStatus.SKIPPED, e.note)
            for e in prepared.entries
            if e.todo == Todo.DONE
        ]
        ran, left, why_stopped = _schedule(ctx, plan_id, prepared, options, reporter, stop, ledger)
        results += ran + left
        failed = any(r.status == EntryStatus.FAILED for r in results)
        status = PlanStatus.FAILED if failed else PlanStatus.STOPPED if left else PlanStatus.DONE
        ledger.close(plan_id, status)
    results.sort(key=lambda r: r.position)
    return ApplyResult(
        prepared.path, prepared.digest, status, tuple(results), why_stopped == "interrupted", not_started=len(left)
    )


def _schedule(
    ctx: Context,
    plan_id: int,
    prepared: Prepared,
    options: ApplyOptions,
    reporter: ApplyProgress,
    stop: threading.Event,
    ledger: Ledger,
) -> tuple[list[EntryResult], list[EntryResult], str]:
    """Start entries in plan order within the limits; on stop, start nothing more and drain the running.

    Returns the results of the entries run, those of the entries left unstarted, and why it stopped.
    """
    pending = list(prepared.todo)
    running: dict[Future[EntryResult], Entry] = {}
    slots: dict[Future[EntryResult], psycopg.Connection[Any]] = {}  # each running move's --per-stamp slot
    per_target: Counter[str] = Counter()
    results: list[EntryResult] = []
    why_stopped = ""
    held_elsewhere: dict[str, float] = {}  # target -> when to try again its slots other applies or workers hold
    with _closing(slots), ThreadPoolExecutor(max_workers=options.parallel, thread_name_prefix="apply") as pool:
        while pending or running:
            if stop.is_set() and not why_stopped:
                why_stopped = "interrupted"
                reporter.note(
                    f"interrupted: letting {len(running)} running move(s) finish, starting no more; "
                    f"re-run `migrator apply {prepared.path}` to continue"
                )
            if not why_stopped:
                busy = {t for e in running.values() for t in e.move.tenants}
                now = time.monotonic()
                for entry in list(pending):
                    if len(running) >= options.parallel:
                        break
                    target = entry.move.target
                    if per_target[target] >= options.per_stamp or held_elsewhere.get(target, 0.0) > now:
                        continue
                    if busy & set(entry.move.tenants):
                        continue
                    slot = take_slot(ctx.catalog.url, stamp_slot(target), options.per_stamp)
                    if slot is None:
                        if target not in held_elsewhere:
                            reporter.note(
                                f"waiting: {options.per_stamp} move(s) into {target} already running elsewhere "
                                "(--per-stamp counts every apply and worker)"
                            )
                        held_elsewhere[target] = now + SLOT_POLL_S
                        continue
                    held_elsewhere.pop(target, None)
                    pending.remove(entry)
                    per_target[target] += 1
                    busy |= set(entry.move.tenants)
                    reporter.started(entry)
                    future = pool.submit(_one, ctx, plan_id, entry, options, reporter, ledger)
                    running[future], slots[future] = entry, slot
            if not running:
                if pending and not why_stopped:  # every pending entry waits for a slot held elsewhere
                    stop.wait(SLOT_POLL_S)
                    continue
                break
            finished, _ = wait(running, timeout=0.2, return_when=FIRST_COMPLETED)
            for future in finished:
                entry = running.pop(future)
                slots.pop(future).close()
                per_target[entry.move.target] -= 1
                result = _result_of(future, entry)
                results.append(result)
                reporter.finished(result)
                if result.status == EntryStatus.FAILED and options.stop_on_error and not why_stopped:
                    why_stopped = f"--stop-on-error after the move of {entry.move.who} failed"
                    stop.set()
    left = [
        EntryResult(
            e.position, e.move.tenants, e.move.source, e.move.target, EntryStatus.SKIPPED, f"not started: {why_stopped}"
        )
        for e in pending
    ]
    return results, left, why_stopped


@contextlib.contextmanager
def _closing(slots: dict[Future[EntryResult], psycopg.Connection[Any]]) -> Iterator[None]:
    """Free the slots still held when the scheduler leaves (an error, say); the server would at exit."""
    try:
        yield
    finally:
        for conn in slots.values():
            conn.close()


def _result_of(future: Future[EntryResult], entry: Entry) -> EntryResult:
    try:
        return future.result()
    except Exception as exc:  # _one records its own failures; this is the catalog failing under it
        return EntryResult(
            entry.position,
            entry.move.tenants,
            entry.move.source,
            entry.move.target,
            EntryStatus.FAILED,
            f"{type(exc).__name__}: {exc}",
        )


def _one(
    ctx: Context, plan_id: int, entry: Entry, options: ApplyOptions, reporter: ApplyProgress, ledger: Ledger
) -> EntryResult:
    """Run (or resume) one entry's move in a worker thread and record how it ended."""
    move = entry.move
    started = time.monotonic()
    progress = _MoveProgress(reporter)
    ledger.mark(plan_id, entry.position, EntryStatus.RUNNING, entry.resume.id if entry.resume else None)
    try:
        move_options = MoveOptions(
            batch_rows=options.batch_rows, jobs=options.jobs, allow_triggers=options.allow_triggers
        )
        outcome = move_tenants(ctx, move.tenants, move.target, move_options, progress)
    except Exception as exc:  # one failed move must not stop the others
        reason = error_line(ctx, exc)
        unfinished = next(iter(ctx.catalog.open_moves(move.tenants)), None)
        ledger.mark(plan_id, entry.position, EntryStatus.FAILED, unfinished.id if unfinished else None, reason)
        return EntryResult(
            entry.position,
            move.tenants,
            move.source,
            move.target,
            EntryStatus.FAILED,
            reason,
            unfinished.id if unfinished else None,
            seconds=time.monotonic() - started,
        )
    assert outcome.move is not None
    progress._count(max(0, move.rows - progress.counted))
    ledger.mark(plan_id, entry.position, EntryStatus.DONE, outcome.move.id)
    note = f"resumed move {outcome.move.id}" if outcome.resumed else ""
    return EntryResult(
        entry.position,
        move.tenants,
        move.source,
        move.target,
        EntryStatus.DONE,
        note,
        outcome.move.id,
        outcome.move.rows_copied,
        time.monotonic() - started,
    )


def error_line(ctx: Context, exc: Exception) -> str:
    """The error's first line, without any stamp's or the catalog's password."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    if not isinstance(exc, MigratorError):
        first = f"{type(exc).__name__}: {first}"
    with contextlib.suppress(Exception):
        first = dsnlib.scrub(first, ctx.catalog.url, *(s.dsn for s in ctx.catalog.stamps()))
    return first
