"""The last steps of a move: prove the target equal to the source, then compare-and-set the route.

Offline moves verify everything and flip. Online moves keep the write freeze short by doing the
expensive work before it: `verify_before_freeze` compares every row the application has not written
since capture began, while it keeps writing. The freeze then only fences the tenant, waits out
in-flight writes, drains the last captured changes, verifies the captured keys and flips. If any
of that fails or takes longer than allowed, the fence is lifted and the route stays where it was.
"""

from __future__ import annotations

import itertools
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg

from migrator import stamps
from migrator.catalog import Cohort, Move, Phase, Route
from migrator.db import dsn as dsnlib
from migrator.db.dsn import WriteMode
from migrator.db.retry import freeze_attempts
from migrator.errors import FreezeTooLong, NotConverging, VerifyMismatch
from migrator.move import capture, copy, fence, integrity, proof, revert
from migrator.move.keys import key_set, keys_table, load_keys
from migrator.move.preflight import check_schema_unchanged
from migrator.move.run import CutoverOptions as CutoverOptions  # re-exported: the CLI builds it from its flags
from migrator.move.run import MoveRun
from migrator.move.streams import MIN_PART_ROWS
from migrator.move.throttle import StandbyBehind
from migrator.move.verify import (
    Report,
    Sides,
    Streams,
    TableResult,
    compare_hashes,
    keyed_hash_query,
    keyed_row_hashes,
    verify_tenants,
)
from migrator.progress import ticking
from migrator.stamps.discovery import Layout, Table, problems_message

log = logging.getLogger("migrator.cutover")


def _sums(report: Report) -> tuple[str, str]:
    source = ",".join(f"{t.table}={t.source.rows}:{t.source.digest}" for t in report.tables)
    target = ",".join(f"{t.table}={t.target.rows}:{t.target.digest}" for t in report.tables)
    return source, target


def check_references(run: MoveRun, move: Move) -> None:
    """Before verify: where the target's writes ran as replica (no foreign-key checks), prove that every
    foreign key of the tenant's rows resolves there (`integrity.dangling`); else stop, unflipped.

    Skipped only where no write can have run as replica: the move started `checked` and the role
    still may not skip triggers (a grant given since would make later sessions replica).
    """
    with stamps.connect(run.target) as tgt:
        if move.write_mode == WriteMode.CHECKED and not dsnlib.may_skip_triggers(tgt):
            return  # the target's own foreign keys checked every row migrator wrote
    problems = integrity.dangling(run.target.dsn, run.layout, move.tenants, run.options.jobs)
    if problems:  # recorded on the move by the state machine, as every step's error
        raise VerifyMismatch(
            f"move {move.id}: foreign keys of {move.who}'s rows do not resolve on {run.target.name}, "
            f"route not flipped: {problems_message(problems)}"
        )


def verify_move(run: MoveRun, move: Move) -> tuple[Move, Report]:
    """Offline: compare every row of the tenant on both stamps and record the outcome on the move."""
    catalog = run.catalog
    check_references(run, move)
    report = verify_tenants(run.source.dsn, run.target.dsn, run.layout, move.tenants, run.options.jobs)
    source_sum, target_sum = _sums(report)
    if not report.equal:
        catalog.update_move(move.id, error=report.summary(), source_checksum=source_sum, target_checksum=target_sum)
        raise VerifyMismatch(f"move {move.id}: verification failed, route not flipped: {report.summary()}")
    move = catalog.update_move(
        move.id, phase=Phase.VERIFIED, source_checksum=source_sum, target_checksum=target_sum, error=None
    )
    return move, report


def wait_for_replicas(run: MoveRun, what: str, timeout_s: float | None = None) -> None:
    """Wait until the target's standbys replayed everything written on it so far (`what`, for the
    progress line), within `timeout_s` (default --replica-wait); none with --no-replica-wait."""
    wait_s = run.options.throttle.replica_wait_s
    if wait_s is None:
        return
    target = run.target.name
    timeout = wait_s if timeout_s is None else timeout_s
    run.throttle.wait_for_standbys(target, timeout, what)


def flip(run: MoveRun, move: Move, freeze_ms: float | None = None, *, window: bool = False) -> list[Route]:
    """Compare-and-set the route, on the session that holds the tenant's lock; `window`: the target
    captures already (`prepare_window`), and the flip records the revert window open.

    Not retried: a session lost since the lock's check before the freeze fails the step at once (the
    move stays resumable) rather than being retried, inside the write freeze, on a dead session.
    """
    return run.catalog.flip(move, run.lock.held(), freeze_ms, window=window)


def opens_window(run: MoveRun, move: Move) -> bool:
    """Whether the move's flip opens a revert window: not with --no-revert-window, never for a revert."""
    return run.options.revert_window and move.reverts is None


def prepare_window(run: MoveRun, move: Move, *, capture: bool) -> None:
    """Before the flip: the guard on the target that will capture the tenants' writes once they live
    there (the revert window), installed outside any freeze, as its DDL yields to the target's writers.

    Online, its capture starts in the freeze, after the drain (whose own writes are no business of the
    window); offline nothing writes the tenants there before the flip, so it captures at once. A log an
    earlier attempt left is dropped: nothing but migrator wrote the tenants on the target before the flip.
    """
    with stamps.connect(run.target, autocommit=False) as tgt:
        fence.guard(tgt, run.layout, move.tenants, move.id, fenced=False, capture=capture)
        with tgt.transaction():
            fence.forget_changes(tgt, move.id)


Hashes = dict[tuple[str, ...], str]


Proof = tuple[TableResult | None, list[list[str]]]  # untouched rows' result (if asked), keys still unproven


def _captured_hashes(
    conn: psycopg.Connection[Any], index: int, table: Table, tenants: Cohort, keys: list[list[str]],
    others: list[list[str]],
) -> Hashes:  # fmt: skip
    """In the caller's transaction: row hashes of the table's rows in `keys` (loaded as
    `keys_table(index)`); and the captured keys the bulk proof's rows lie outside of, where they are
    `others` than `keys` (an incremental pass: loaded as `proof.captured_table(index)`)."""
    load_keys(conn, table, keys, keys_table(index))
    if others:
        load_keys(conn, table, others, proof.captured_table(index))
    return keyed_row_hashes(conn, table, tenants, keys_table(index)) if keys else {}


def _differing(source: Hashes, target: Hashes) -> list[list[str]]:
    """The keys whose rows differ between two key -> row hash maps (missing on one side included)."""
    return [list(k) for k in set(source) | set(target) if source.get(k) != target.get(k)]


def verify_before_freeze(run: MoveRun, move: Move, incremental: bool = False) -> tuple[Report, int]:
    """Online, before the freeze: prove as much as possible while the application keeps writing.

    In one source snapshot, the rows of captured keys are compared row by row, and (but for a revert)
    every other row by what the copy's batches proved (`proof.prove_untouched`: a count on each side,
    and a key-by-key compare of target rows no proven batch wrote). No replay runs meanwhile, so the
    target is static. Changes whose rows proved equal are marked; the freeze then re-checks only keys
    with unproven changes (written since, or still in flux). Returns the report of untouched rows
    and the unproven count. `incremental` compares only keys with unproven changes (run again just
    before each freeze, so the freeze itself has little left to check). Tables are compared --jobs
    at a time (fewer for a small tenant), every source connection reading in the snapshot this
    transaction exports.

    A revert proves no bulk: its rows outside the window's log are the forward move's, proven at its flip.
    """
    layout, tenants, bulk = run.layout, move.tenants, move.reverts is None
    with stamps.connect(run.source, autocommit=False) as src:
        src.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        captured = capture.captured_keys(src, layout, move.capture_id) if bulk or not incremental else {}
        keys = capture.captured_keys(src, layout, move.capture_id, unverified_only=True) if incremental else captured
        snapshot = src.execute("SELECT pg_export_snapshot()").fetchone()[0]  # type: ignore[index]
        # a pair of sessions per MIN_PART_ROWS rows at most, as the copy's parts: connecting costs more
        # than comparing a small tenant's tables
        jobs = max(1, min(run.options.jobs, len(layout.tables), move.rows_total // MIN_PART_ROWS))
        with Streams(run.source.dsn, run.target.dsn, jobs, snapshot=snapshot) as streams:

            def prove(sides: Sides, index: int, table: Table) -> Proof:
                own = keys.get(table.name, [])
                others = captured.get(table.name, []) if bulk and incremental else []
                target = sides.beside.submit(_captured_hashes, sides.tgt, index, table, tenants, own, others)
                differ = _differing(_captured_hashes(sides.src, index, table, tenants, own, others), target.result())
                if not bulk:
                    return None, differ
                outside = proof.captured_table(index) if others else keys_table(index) if own else None
                return proof.prove_untouched(sides, index, table, tenants, move.id, outside), differ

            proofs = streams.map(prove, layout.tables)
        unproven = {table.name: differ for table, (_, differ) in zip(layout.tables, proofs, strict=True) if differ}
        capture.mark_verified(src, layout, move.capture_id, unproven)
        src.commit()
    results = [result for result, _ in proofs if result is not None]
    return Report(tenants, results), sum(len(v) for v in unproven.values())


def _keyed_hashes(
    conn: psycopg.Connection[Any], layout: Layout, tenants: Cohort, keys: dict[str, list[list[str]]]
) -> dict[str, Hashes]:
    """Per table with keys, the row hash of each key's row, all in one transaction of `conn` and one
    round trip (a pipeline, read once it has ended: inside the freeze, each round trip waits for a
    busy CPU)."""
    with conn.pipeline(), conn.transaction(force_rollback=True):
        found = {
            table.name: conn.execute(keyed_hash_query(table, tenants, key_set(table, keys[table.name])))
            for table in layout.tables
            if keys.get(table.name)
        }
    return {name: {tuple(key): digest for key, digest in rows.fetchall()} for name, rows in found.items()}


def _hash_keys(
    src: psycopg.Connection[Any], tgt: psycopg.Connection[Any], layout: Layout, tenants: Cohort,
    keys: dict[str, list[list[str]]],
) -> dict[str, tuple[Hashes, Hashes]]:  # fmt: skip
    """Per table with keys, the row hash of each key's row on the source and on the target, both
    sides at once (the target's in a thread)."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        target_future = pool.submit(_keyed_hashes, tgt, layout, tenants, keys)
        source = _keyed_hashes(src, layout, tenants, keys)
        target = target_future.result()
    return {name: (source[name], target[name]) for name in source}


def _verify_captured(src: psycopg.Connection[Any], tgt: psycopg.Connection[Any], layout: Layout, move: Move) -> Report:
    """In the freeze: compare the rows of every captured key not yet proven, naming the keys that differ
    (in the source's transaction that reads them, which the caller commits)."""
    keys = capture.captured_keys(src, layout, move.capture_id, unverified_only=True)
    hashes = _hash_keys(src, tgt, layout, move.tenants, keys)
    results = [compare_hashes(table.label, *hashes[table.name]) for table in layout.tables if table.name in hashes]
    return Report(move.tenants, results)


SETTLE_ROUNDS = 3  # replay rounds a settling cycle runs at most: a tenant that writes faster is left to the freeze
SETTLE_CYCLES = 4  # replay-and-prove cycles before the fence at most
SETTLED_KEYS = 50  # a cycle that proved no more keys than this leaves the freeze little more: fence now


def _settle(run: MoveRun, src: psycopg.Connection[Any], tgt: psycopg.Connection[Any], move: Move) -> None:
    """Just before the fence, on the freeze's own sessions (idle): replay what is pending, a few
    rounds at most, then prove the keys not yet proven in one source snapshot and mark them; and
    again while a cycle still had many keys to prove. What the freeze drains and proves is what
    arrives during the last cycle, and each cycle is shorter than the one before, as it has only
    what arrived during that one (a writer that never sleeps, one cycle: 90 to 530 changes in the
    freeze's drain, 12 to 43 ms)."""
    layout, tenants, batch = run.layout, move.tenants, run.options.cutover.replay_batch
    replay = capture.Replay(src, tgt, layout, tenants, move.capture_id, batch)
    for _ in range(SETTLE_CYCLES):
        for _ in range(SETTLE_ROUNDS):
            if replay.once().changes < batch:
                break  # it took all that was pending
        with src.transaction():
            src.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            keys = capture.captured_keys(src, layout, move.capture_id, unverified_only=True)
            hashes = _hash_keys(src, tgt, layout, tenants, keys)
            unproven = {name: _differing(*both) for name, both in hashes.items()}
            capture.mark_verified(src, layout, move.capture_id, {name: k for name, k in unproven.items() if k})
        if sum(len(k) for k in keys.values()) <= SETTLED_KEYS:
            return


def catch_up(run: MoveRun, move: Move) -> int:
    """Replay captured changes until the backlog is small enough to enter the cutover.

    --catchup-timeout bounds the whole catch-up: its deadline is fixed here, before the replay's
    first attempt, so a reconnect (policy STAMP_STEP) does not start the clock again. Raises
    NotConverging when the deadline passes first, so a move never forces a long freeze on a tenant
    that writes faster than the replay.
    """
    options = run.options.cutover
    deadline = time.monotonic() + options.catchup_timeout_s
    pending = capture.catch_up(
        run.replay,
        run.layout,
        move.tenants,
        move.capture_id,
        capture.Goal(options.cutover_backlog, deadline, options.replay_batch),
        observe=lambda pending: _observe_backlog(run, move, pending),
    )
    if pending > options.cutover_backlog:
        raise NotConverging(
            f"catch-up of move {move.id} did not converge in {options.catchup_timeout_s:.0f}s: {pending} changes "
            "still pending (the tenant writes faster than the replay); the tenant stays writable, re-run the move "
            "to continue"
        )
    return pending


def _observe_backlog(run: MoveRun, move: Move, pending: int) -> None:
    """Each catch-up round: export the backlog, and stop here if asked (a round is a safe point)."""
    run.metrics.catchup_backlog.labels(run.source.name).set(pending)
    run.safe_point(move.id)
    run.throttle.wait(move.id)


def online_cutover(run: MoveRun, move: Move) -> tuple[list[Route], dict[str, float]]:
    """Catch up, then freeze writes just long enough to drain, verify the captured keys and flip.

    An attempt that cannot finish within --max-freeze-ms lifts the fence again; the next one starts
    after a pause (policy `freeze_attempts`). After the last attempt the move stops, unfenced and
    resumable. Returns the route and the milliseconds of each step of the freeze that flipped it.
    """
    options = run.options.cutover
    numbers = itertools.count(1)
    try:
        return freeze_attempts(options.attempts)(lambda: _attempt_cutover(run, move, next(numbers)))
    except FreezeTooLong as exc:
        raise FreezeTooLong(
            f"move {move.id}: the cutover did not fit in {options.max_freeze_ms:.0f} ms after {options.attempts} "
            f"attempts (last: {exc}); the tenant stays writable on its source, re-run the move to try again"
        ) from None


def _attempt_cutover(run: MoveRun, move: Move, number: int) -> tuple[list[Route], dict[str, float]]:
    """One attempt: catch up and re-verify the keys in flux while writes go on, then the freeze.

    The last catch-up comes after everything else that takes time (the window's guard, the standbys),
    and the freeze's own sessions settle the rest just before the fence (`_settle`).
    """
    catch_up(run, move)
    verify_before_freeze(run, move, incremental=True)
    capture.vacuum_changes(run.source.dsn)
    run.safe_point(move.id)
    if opens_window(run, move):
        prepare_window(run, move, capture=False)
    with ticking(run.progress, f"waiting for {run.target.name}'s standbys to replay the copy"):
        wait_for_replicas(run, "the copy")  # so that the freeze only waits for the drain's few rows
    catch_up(run, move)
    run.lock.check()
    try:
        return _freeze_and_flip(run, move)
    except FreezeTooLong as exc:
        run.progress.phase(f"{exc}; writes resumed (attempt {number}/{run.options.cutover.attempts})")
        run.catalog.update_move(move.id, phase=Phase.SYNCED, error=str(exc))
        raise


class FreezeClock:
    """Where the freeze's time goes: milliseconds per step inside the fence, each since the one before."""

    def __init__(self) -> None:
        self.started = self._last = time.monotonic()
        self.steps: dict[str, float] = {}

    def elapsed_ms(self) -> float:
        return (time.monotonic() - self.started) * 1000

    def step(self, name: str) -> None:
        now = time.monotonic()
        self.steps[name] = round((now - self._last) * 1000, 2)
        self._last = now


def _freeze_and_flip(run: MoveRun, move: Move) -> tuple[list[Route], dict[str, float]]:
    catalog, layout, options = run.catalog, run.layout, run.options.cutover
    window = opens_window(run, move)
    with stamps.connect(run.source, autocommit=False) as src, stamps.connect(run.target, autocommit=False) as tgt:
        dsnlib.write_as_copies(tgt)  # the drain's upserts and deletes are copies (before the freeze's clock)
        fence.bypass_for_replay(tgt)  # a revert's target is fenced until its flip
        check_schema_unchanged(src, tgt, move, run.source.name, run.target.name, "not flipped")
        src.commit()
        tgt.commit()
        move = catalog.update_move(move.id, phase=Phase.CUTOVER)
        catalog.announce_cutover(move)  # routers open connections to the target while this settles
        _settle(run, src, tgt, move)
        catalog.rehearse_flip(move, run.lock.held(), window=window)  # the flip's session warm, its routes unchanged
        clock = FreezeClock()
        elapsed_ms = clock.elapsed_ms
        try:
            # Each step's statements in one round trip (a pipeline), here and below: under load every
            # round trip waits for the CPU.
            with src.pipeline(), src.transaction():  # waits (within the budget) for snapshot-keeping writers
                fence.set_fenced(src, move.tenants, True, timeout_ms=int(options.max_freeze_ms))
            clock.step("fence")
            budget = max(1, int(options.max_freeze_ms - elapsed_ms()))
            with src.pipeline(), src.transaction():
                fence.wait_for_writers(src, move.capture_id, budget)
            clock.step("writers")
            log.info("move %s: fenced, in-flight writes done at %.0f ms", move.id, elapsed_ms())
            drained = capture.Replay(src, tgt, layout, move.tenants, move.capture_id, options.replay_batch).drain()
            clock.step("drain")
            log.info("move %s: drained %d changes at %.0f ms", move.id, drained, elapsed_ms())
            # The drain's transactions are still open on both sides: the rest of the freeze's work on
            # the stamps runs in them, and they commit after the revisions' check.
            copy.follow_source_sequences(src, tgt, layout.tables, run.target.key_block)
            if window:  # from the commit on, every write of the tenants on the target is captured (not
                fence.set_capture(tgt, move.tenants, True)  # the drain's; until the flip nothing else writes them)
            clock.step("sequences")
            report = _verify_captured(src, tgt, layout, move)
            clock.step("keys")
            log.info("move %s: verified captured keys at %.0f ms", move.id, elapsed_ms())
            if not report.equal:
                raise VerifyMismatch(f"move {move.id}: verification failed, route not flipped: {report.summary()}")
            check_schema_unchanged(src, tgt, move, run.source.name, run.target.name, "not flipped")
            tgt.commit()  # the drained rows, the sequences and the window's capture
            src.commit()
            clock.step("revisions")
            try:
                if run.options.throttle.replica_wait:  # a step of its own, waited or not (a query on the target)
                    wait_for_replicas(run, "the drain", max(0.0, options.max_freeze_ms - elapsed_ms()) / 1000)
                    clock.step("standbys")
            except StandbyBehind as exc:
                raise FreezeTooLong(f"the target's standbys did not replay the drain in the freeze: {exc}") from None
            if elapsed_ms() > options.max_freeze_ms:
                limit = options.max_freeze_ms
                raise FreezeTooLong(f"freeze reached {elapsed_ms():.0f} ms > --max-freeze-ms {limit:.0f}")
        except (psycopg.errors.LockNotAvailable, psycopg.errors.QueryCanceled) as exc:
            _unfence(src, tgt, move, window)
            run.metrics.freeze.labels("released").observe(elapsed_ms() / 1000)
            raise FreezeTooLong(f"in-flight writes did not finish within the freeze budget ({exc.sqlstate})") from None
        except BaseException:
            _unfence(src, tgt, move, window)
            run.metrics.freeze.labels("released").observe(elapsed_ms() / 1000)
            raise
        route = flip(run, move, freeze_ms=elapsed_ms(), window=window)
        clock.step("flip")
        frozen_ms = elapsed_ms()  # fence to the flip's commit, which is when writers can go to the target
        run.metrics.freeze.labels("flipped").observe(frozen_ms / 1000)
        steps = ", ".join(f"{name} {ms:.1f}" for name, ms in clock.steps.items())
        log.info("move %s: freeze steps (ms): %s", move.id, steps)
        catalog.update_move(move.id, freeze_ms=frozen_ms)
        run.progress.phase(f"flipped {move.who} to {run.target.name}; writes were frozen {frozen_ms:.0f} ms")
        if move.reverts is None:  # the log stays until `moved.record` has read which tables it names
            with src.transaction():
                fence.stop_capture(src, move.tenants, forget=False)
        else:  # the tenants write again where they live now
            revert.lift(src, tgt, layout, move.tenants)
        return route, clock.steps


def _unfence(src: psycopg.Connection[Any], tgt: psycopg.Connection[Any], move: Move, window: bool) -> None:
    """Lift the fence after a failed freeze, so the tenant writes again on its (unchanged) source; and
    stop the target's capture a window started (nothing of the tenants is written there meanwhile).
    The drain's transactions, if still open, roll back: its batch is replayed again next time."""
    if not src.closed:
        src.rollback()
        fence.set_fenced(src, move.tenants, False)
        src.commit()
    if not tgt.closed:
        tgt.rollback()
        if window:
            fence.set_capture(tgt, move.tenants, False)
            tgt.commit()
