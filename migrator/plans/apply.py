"""Carrying out a plan: its moves (each a cohort of tenants) through `move_tenants`, in parallel,
recorded so a re-run resumes.

`prepare` reads the file and refuses a stale plan before anything runs (tenants no longer where
planned, targets no longer active or too full). `run` starts at most --parallel moves at once,
at most --per-stamp per target stamp (slots in the catalog, counted by every apply and worker of
the fleet), never two for one tenant, and records each entry's status
in the catalog tables `plans` / `plan_moves`, keyed by the sha256 of the file's bytes. Running
the same file again skips finished entries and resumes the rest (`move_tenants` resumes a
cohort's unfinished move by itself). A stop (`stop`, set by the CLI on Ctrl-C or SIGTERM) starts no
more moves and stops the running ones at their next safe point, resumable by the same command.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from migrator.catalog import Catalog, EntryStatus, PlanStatus, Stamp, StampState, audit, name_tenants, policy
from migrator.catalog.locks import stamp_slot, take_slot
from migrator.catalog.plans import EntryIdentity, EntryRecord, Ledger, PlanFile, PlanRecord
from migrator.context import Context
from migrator.db.locks import lock_key, try_lock
from migrator.errors import BadInput, Interrupted, LockBusy
from migrator.move import MoveOptions
from migrator.move.run import default_jobs
from migrator.move.throttle import ThrottleOptions
from migrator.plans.capacity import measure_fleet, shift
from migrator.plans.execute import Entry, Todo, execute_entry
from migrator.plans.planners import Plan, PlannedMove, check_stamps, load_plan
from migrator.progress import Progress, Silent

SLOT_POLL_S = 0.5  # how often the slots of a target held by other applies or workers are tried again


@dataclass(frozen=True)
class ApplyOptions:
    """Flags of `migrator apply`: --parallel, --per-stamp, --stop-on-error, --batch-rows, --jobs,
    --allow-triggers, --no-revert-window, --max-attempts, the throttle's."""

    parallel: int = 1
    per_stamp: int = 1
    stop_on_error: bool = False
    batch_rows: int = MoveOptions.batch_rows  # each move's, see MoveOptions
    jobs: int = field(default_factory=default_jobs)  # each move's streams, see MoveOptions
    allow_triggers: bool = False  # each move's, see MoveOptions
    override_reason: str | None = None  # each move's, see MoveOptions (--override-policy --reason)
    revert_window: bool = True  # each move's, see MoveOptions (--no-revert-window)
    max_attempts: int = 3  # with --queue: runs of an entry that fail for a transient reason, at most
    throttle: ThrottleOptions = field(default_factory=ThrottleOptions)  # each move's, see MoveOptions

    def move_options(self) -> MoveOptions:
        """What each of the plan's moves runs with."""
        return MoveOptions(
            batch_rows=self.batch_rows,
            jobs=self.jobs,
            allow_triggers=self.allow_triggers,
            override_reason=self.override_reason,
            revert_window=self.revert_window,
            throttle=self.throttle,
        )


@dataclass(frozen=True)
class Prepared:
    """A validated plan ready to run: its entries and the identity of its file."""

    file: PlanFile
    plan: Plan
    entries: tuple[Entry, ...]
    overridden: tuple[str, ...] = ()  # the entries the placement policy forbids, allowed by --override-policy

    @property
    def todo(self) -> list[Entry]:
        return [e for e in self.entries if e.todo != Todo.DONE]


@dataclass(frozen=True)
class EntryResult(EntryIdentity):
    """How one entry ended in this run: done, failed or skipped, and why."""

    status: EntryStatus
    reason: str = ""
    move_id: int | None = None
    rows: int = 0
    seconds: float = 0.0

    @classmethod
    def of(
        cls, entry: Entry, status: EntryStatus, reason: str = "", *, move_id: int | None = None, rows: int = 0,
        seconds: float = 0.0,
    ) -> EntryResult:  # fmt: skip
        """The result of a plan's entry, under its position, tenants, source and target."""
        move = entry.move
        return cls(entry.position, move.tenants, move.source, move.target, status, reason, move_id, rows, seconds)

    @property
    def stopped(self) -> bool:
        """Its move stopped at a safe point (Ctrl-C, SIGTERM), unfinished and resumable."""
        return self.status == EntryStatus.SKIPPED and self.move_id is not None and self.reason.startswith(STOPPED)


STOPPED = "stopped at a safe point"


@dataclass(frozen=True)
class ApplyResult:
    file: PlanFile
    status: PlanStatus
    results: tuple[EntryResult, ...]
    interrupted: bool = False
    not_started: int = 0  # entries skipped because the run stopped before starting them

    def having(self, status: str) -> list[EntryResult]:
        return [r for r in self.results if r.status == status]


# -- prepare: parse, validate, refuse stale plans -------------------------------------------------------


def plan_digest(path: Path) -> str:
    """The key of a plan's run in the catalog (`PlanFile.digest`), for the commands that only read its record."""
    _, content = load_plan(path)
    return PlanFile.of(path, content).digest


def prepare(ctx: Context, path: Path, override_policy: bool = False) -> Prepared:
    """Parse the plan and check it still holds against the catalog, the stamps and the placement policy
    as it is now (a plan made under an older policy is stale, unless `override_policy`); changes nothing."""
    plan, content = load_plan(path)
    file = PlanFile.of(path, content)
    known = check_stamps(plan, ctx.catalog, file.path)
    recorded = Ledger(ctx.catalog).statuses(file.digest)
    entries, stale = [], []
    for position, move in enumerate(plan.moves):
        entry, problem = classify_entry(ctx.catalog, position, move, recorded.get(position))
        if problem is None and entry.todo != Todo.DONE and known[move.target].state != StampState.ACTIVE:
            problem = f"target {move.target} is {known[move.target].state}"
        if problem:
            stale.append(f"moves[{position}] (line {move.line}) {problem}")
        entries.append(entry)
    if not stale:
        stale = _capacity_problems(ctx, entries, known)
    forbidden = [] if stale else _policy_problems(ctx.catalog, entries)
    if stale or (forbidden and not override_policy):
        raise BadInput(
            f"stale plan {file.path}: {'; '.join(stale or forbidden)}; make a new plan"
            + ("" if stale else " (or --override-policy --reason TEXT, recorded in the audit trail)")
        )
    return Prepared(file, plan, tuple(entries), tuple(forbidden))


def _policy_problems(catalog: Catalog, entries: list[Entry]) -> list[str]:
    """The entries the placement policy forbids now, judged on the fleet as the plan leaves it (so an
    entry that empties a dedicated stamp for a later one is no violation), each named with its line."""
    todo = [e for e in entries if e.todo != Todo.DONE]
    layout = policy.load_layout(catalog)
    for entry in todo:
        layout.place(entry.move.tenants, entry.move.source, entry.move.target)
    return [
        f"moves[{e.position}] (line {e.move.line}) {'; '.join(found)}"
        for e in todo
        if (found := layout.violations(e.move.tenants, e.move.target))
    ]


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


@contextlib.contextmanager
def _plan_lock(catalog: Catalog, file: PlanFile) -> Iterator[None]:
    """One `apply` of a plan at a time: a session advisory lock, released when the process dies."""
    conn = catalog.connect(autocommit=True)
    try:
        if not try_lock(conn, lock_key(f"migrator.plan:{file.digest}")):
            raise LockBusy(f"plan {file.path} is being applied by another running migrator")
        yield
    finally:
        conn.close()


def record(prepared: Prepared) -> PlanRecord:
    """The plan as the catalog's ledger records it."""
    return PlanRecord(
        prepared.file,
        prepared.plan.kind,
        tuple(
            EntryRecord(e.position, e.move.tenants, e.move.source, e.move.target, e.move.rows, e.move.bytes,
                        e.move.queue, e.todo == Todo.DONE)
            for e in prepared.entries
        ),
    )  # fmt: skip


# -- run ------------------------------------------------------------------------------------------------


class _MoveProgress(Silent):
    """A move's Progress that only feeds the plan's overall counter: parallel moves draw no per-table bars."""

    def __init__(self, plan: Progress, who: str) -> None:
        self.plan, self.who = plan, who
        self.counted = 0
        self._lock = threading.Lock()  # the move's copy streams report from their own threads

    def start(self, part: str, total: int, done: int = 0, unit: str = "rows") -> None:
        self.count(done)

    def advance(self, part: str, count: int) -> None:
        self.count(count)

    def count(self, rows: int) -> None:
        if rows:
            with self._lock:
                self.counted += rows
                self.plan.advance(self.who, rows)


def run(
    ctx: Context,
    prepared: Prepared,
    options: ApplyOptions,
    progress: Progress,
    stop: threading.Event | None = None,
) -> ApplyResult:
    """Run the plan's remaining entries (see the module docstring); returns every entry's outcome.

    `stop` (the CLI sets it on Ctrl-C or SIGTERM) starts no more moves and stops the running ones at
    their next safe point; they are reported skipped with their move id (`EntryResult.stopped`)."""
    stop = stop or threading.Event()
    ledger = Ledger(ctx.catalog)
    with _plan_lock(ctx.catalog, prepared.file):
        plan_id = ledger.open(record(prepared))
        if prepared.overridden:
            tenants = [t for e in prepared.todo for t in e.move.tenants]
            reason = f"{options.override_reason}: plan {prepared.file.path}: {'; '.join(prepared.overridden)}"
            audit.append(ctx.catalog, audit.Event(audit.Action.OVERRIDE, tenants, reason=reason))
        progress.begin(sum(e.move.rows for e in prepared.todo))
        progress.describe(_counts([], prepared.todo))
        for entry in prepared.entries:
            if entry.todo == Todo.DONE:
                progress.phase(f"skip    {entry.move.who}: {entry.note}")
        results = [EntryResult.of(e, EntryStatus.SKIPPED, e.note) for e in prepared.entries if e.todo == Todo.DONE]
        ran, left, why_stopped = _schedule(ctx, plan_id, prepared, options, progress, stop)
        results += ran + left
        failed = any(r.status == EntryStatus.FAILED for r in results)
        stopped = left or any(r.stopped for r in ran)
        status = PlanStatus.FAILED if failed else PlanStatus.STOPPED if stopped else PlanStatus.DONE
        ledger.close(plan_id, status)
    results.sort(key=lambda r: r.position)
    return ApplyResult(prepared.file, status, tuple(results), why_stopped == "interrupted", not_started=len(left))


def _schedule(
    ctx: Context,
    plan_id: int,
    prepared: Prepared,
    options: ApplyOptions,
    progress: Progress,
    stop: threading.Event,
) -> tuple[list[EntryResult], list[EntryResult], str]:
    """Start entries in plan order within the limits; on stop, start nothing more and drain the running.

    Returns the results of the entries run, those of the entries left unstarted, and why it stopped.
    """
    pending = list(prepared.todo)
    results: list[EntryResult] = []
    why_stopped = ""
    starter = _Starter(ctx, plan_id, options, progress, stop)
    # The pool shuts down (waiting for its moves) before the starter frees the slots still held.
    with contextlib.closing(starter), ThreadPoolExecutor(options.parallel, thread_name_prefix="apply") as pool:
        while pending or starter.running:
            if stop.is_set() and not why_stopped:
                why_stopped = "interrupted"
                progress.note(
                    f"stopping: starting no more moves; {len(starter.running)} running move(s) stop at their next "
                    "safe point"
                )
            if not why_stopped:
                starter.start_ready(pending, pool)
            if not starter.running:
                if pending and not why_stopped:  # every pending entry waits for a slot held elsewhere
                    stop.wait(SLOT_POLL_S)
                    continue
                break
            for entry, result in starter.finished():
                results.append(result)
                progress.describe(_counts(results, prepared.todo))
                progress.phase(_finished_line(result, len(results), len(prepared.todo)))
                if result.status == EntryStatus.FAILED and options.stop_on_error and not why_stopped:
                    why_stopped = f"--stop-on-error after the move of {entry.move.who} failed"
                    stop.set()
    left = [EntryResult.of(e, EntryStatus.SKIPPED, f"not started: {why_stopped}") for e in pending]
    return results, left, why_stopped


class _Starter:
    """Starts a plan's entries within --parallel, --per-stamp (slots in the catalog, counted by every
    apply and worker) and one move per tenant; frees each move's slot when it ends."""

    def __init__(
        self, ctx: Context, plan_id: int, options: ApplyOptions, progress: Progress, stop: threading.Event
    ) -> None:
        self.ctx, self.plan_id, self.options, self.progress, self.stop = ctx, plan_id, options, progress, stop
        self.running: dict[Future[EntryResult], Entry] = {}
        self._slots: dict[Future[EntryResult], psycopg.Connection[Any]] = {}  # each running move's slot
        self._per_target: Counter[str] = Counter()
        self._held_elsewhere: dict[str, float] = {}  # target -> when to try again its slots held elsewhere

    def start_ready(self, pending: list[Entry], pool: ThreadPoolExecutor) -> None:
        """Start, in plan order, the pending entries the limits allow now (removed from `pending`)."""
        busy = {t for e in self.running.values() for t in e.move.tenants}
        for entry in list(pending):
            if len(self.running) >= self.options.parallel:
                break
            if busy & set(entry.move.tenants):
                continue
            slot = self._slot(entry.move.target)
            if slot is None:
                continue
            pending.remove(entry)
            self._per_target[entry.move.target] += 1
            busy |= set(entry.move.tenants)
            what = entry.note if entry.resume else f"{entry.move.rows:,} rows"
            self.progress.phase(f"start   {entry.move.who} {entry.move.source} -> {entry.move.target} ({what})")
            future = pool.submit(_one, self.ctx, self.plan_id, entry, self.options, self.progress, self.stop)
            self.running[future], self._slots[future] = entry, slot

    def _slot(self, target: str) -> psycopg.Connection[Any] | None:
        """One of the target's --per-stamp slots, or None (within this apply's count, or held elsewhere:
        said once, and tried again after SLOT_POLL_S)."""
        now = time.monotonic()
        if self._per_target[target] >= self.options.per_stamp or self._held_elsewhere.get(target, 0.0) > now:
            return None
        slot = take_slot(self.ctx.catalog.url, stamp_slot(target), self.options.per_stamp)
        if slot is None:
            if target not in self._held_elsewhere:
                self.progress.note(
                    f"waiting: {self.options.per_stamp} move(s) into {target} already running elsewhere "
                    "(--per-stamp counts every apply and worker)"
                )
            self._held_elsewhere[target] = now + SLOT_POLL_S
            return None
        self._held_elsewhere.pop(target, None)
        return slot

    def finished(self) -> list[tuple[Entry, EntryResult]]:
        """The entries whose move ended within a moment, their slots freed."""
        done, _ = wait(self.running, timeout=0.2, return_when=FIRST_COMPLETED)
        ended = []
        for future in done:
            entry = self.running.pop(future)
            self._slots.pop(future).close()
            self._per_target[entry.move.target] -= 1
            ended.append((entry, _result_of(future, entry)))
        return ended

    def close(self) -> None:
        """Free the slots still held when the scheduler leaves (an error, say); the server would at exit."""
        for conn in self._slots.values():
            conn.close()


def _counts(results: list[EntryResult], todo: list[Entry]) -> str:
    """The overall counter's description: tenants moved and moves ended of this run's."""
    tenants = sum(len(r.tenants) for r in results if r.status == EntryStatus.DONE)
    return f"plan: {tenants}/{sum(len(e.move.tenants) for e in todo)} tenants, {len(results)}/{len(todo)} moves"


def _finished_line(result: EntryResult, count: int, total: int) -> str:
    """The line that says an entry's move ended, and how many of the run's have."""
    where = f"{name_tenants(result.tenants)} {result.source} -> {result.target}"
    if result.status == EntryStatus.DONE:
        return f"done    {where} in {result.seconds:.1f} s (move {result.move_id}) [{count}/{total}]"
    return f"FAILED  {where}: {result.reason} [{count}/{total}]"


def _result_of(future: Future[EntryResult], entry: Entry) -> EntryResult:
    try:
        return future.result()
    except Exception as exc:  # _one records its own failures; this is the catalog failing under it
        return EntryResult.of(entry, EntryStatus.FAILED, f"{type(exc).__name__}: {exc}")


def _one(
    ctx: Context, plan_id: int, entry: Entry, options: ApplyOptions, progress: Progress, stop: threading.Event
) -> EntryResult:
    """Run (or resume) one entry's move in a worker thread (`execute_entry`); a failure is recorded at once,
    a move stopped at a safe point is pending again."""
    move = entry.move
    counter = _MoveProgress(progress, move.who)
    done = execute_entry(ctx, plan_id, entry, options.move_options(), counter, stop)
    if isinstance(done.error, Interrupted) and stop.is_set():
        Ledger(ctx.catalog).mark(plan_id, entry.position, EntryStatus.PENDING, done.move_id)
        reason = f"{STOPPED} (move {done.move_id})"
        return EntryResult.of(entry, EntryStatus.SKIPPED, reason, move_id=done.move_id)
    if done.status == EntryStatus.FAILED:
        Ledger(ctx.catalog).mark(plan_id, entry.position, EntryStatus.FAILED, done.move_id, done.reason)
    else:
        counter.count(max(0, move.rows - counter.counted))
    note = f"resumed move {done.move_id}" if done.resumed else ""
    reason = done.reason or note
    return EntryResult.of(entry, done.status, reason, move_id=done.move_id, rows=done.rows, seconds=done.seconds)
