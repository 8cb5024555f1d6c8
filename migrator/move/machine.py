"""A move, end to end, as a resumable state machine stored in the catalog.

Online (default): preflight -> capture -> copy -> catch-up -> verify untouched rows -> short fenced
cutover (drain, verify captured keys, flip). Offline: preflight -> fence -> copy -> verify -> flip.

The move's phase is stored in the catalog after each step, and the copy's cursor on the target,
so running the same `migrator move` again after a crash continues the unfinished move instead of
starting over. Every step is idempotent, which is what makes resume after kill -9 safe.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from migrator import stamps
from migrator.catalog import (
    FLIPPED,
    Catalog,
    Cohort,
    Mode,
    Move,
    Phase,
    Route,
    Stamp,
    TableProgress,
    TenantLock,
    audit,
    describe_move,
)
from migrator.context import Context
from migrator.errors import BadInput, MigratorError, PreflightError, VerifyMismatch
from migrator.move import copy, fence, moved, proof, revert, streams, throttle
from migrator.move.cleanup import delete_debris, delete_tenant, forget_progress
from migrator.move.cutover import (
    catch_up,
    check_references,
    flip,
    online_cutover,
    opens_window,
    prepare_window,
    verify_before_freeze,
    verify_move,
    wait_for_replicas,
)
from migrator.move.preflight import check_deletes, check_move, check_resume, check_schema_unchanged
from migrator.move.run import MoveOptions, MoveRun
from migrator.move.verify import Report
from migrator.progress import Progress, ticking
from migrator.stamps.access import ThreadSessions
from migrator.stamps.discovery import Layout


@dataclass(frozen=True)
class MoveOutcome:
    """What a move of a cohort did; `move` is None only for a dry run, `routes` empty until the flip."""

    tenants: Cohort
    source: str
    target: str
    move: Move | None
    routes: list[Route]
    resumed: bool
    tables: dict[str, int] = field(default_factory=dict)
    report: Report | None = None
    timings: dict[str, float] = field(default_factory=dict)
    not_moved: dict[str, int] = field(default_factory=dict)  # per table, rows whose tenant key is NULL
    skipped: tuple[str, ...] = ()  # views and materialized views of the tenancy schema (no rows of their own)
    freeze_steps_ms: dict[str, float] = field(default_factory=dict)  # online: the flipping freeze, step by step
    reached: dict[str, str] = field(default_factory=dict)  # dry run: how each table's rows are found
    global_tables: tuple[str, ...] = ()  # dry run: tables holding no tenant's rows, left alone
    suspects: tuple[str, ...] = ()  # dry run: global tables' columns that look like undeclared references


def move_tenants(
    ctx: Context,
    tenants: Cohort,
    target: str,
    options: MoveOptions,
    progress: Progress,
    stop: threading.Event | None = None,
) -> MoveOutcome:
    """Move (or resume moving) a cohort of tenants to `target` as one unit; returns after its routes
    flipped. A single tenant is a cohort of one.

    A cohort resumes only as the same cohort: a tenant of an unfinished move names that move.
    `stop` (a worker's SIGTERM) ends the run at its next safe point with `Interrupted`.
    """
    stop = stop or threading.Event()
    catalog = ctx.catalog
    options = with_config_limits(ctx, options)
    with catalog.lock_tenants(tenants) as lock:
        unfinished = catalog.open_moves(tenants)
        if unfinished:
            move = unfinished[0]
            if set(move.tenants) != set(tenants) or move.target != target:
                listed = " ".join(move.tenants) if len(move.tenants) <= 10 else f"--move {move.id}"
                raise PreflightError(
                    f"{describe_move(move)} is unfinished; resume it with `migrator move {listed} --to {move.target}` "
                    f"or run `migrator move abort {move.id}`"
                )
            return _resume(ctx, move, lock, options, progress, stop)
        checked = check_move(
            catalog,
            ctx.config.tenancy,
            tenants,
            target,
            allow_triggers=options.allow_triggers,
            override_policy=options.override_reason is not None,
        )
        throttle.check_visible(catalog, (checked.source, checked.target), options.throttle)
        if options.dry_run:
            return MoveOutcome(
                tenants,
                checked.source.name,
                checked.target.name,
                None,
                [],
                False,
                checked.rows,
                not_moved=checked.null_tenant_rows,
                skipped=checked.skipped,
                reached={t.label: t.reach for t in checked.layout.tables},
                global_tables=checked.layout.global_tables,
                suspects=checked.layout.suspects,
            )
        mode = Mode.ONLINE if options.online else Mode.OFFLINE
        move = catalog.create_move(checked.routes, checked.target.name, mode, options.batch_rows, checked.revision)
        if checked.overridden:
            _record_override(catalog, move, options.override_reason, checked.overridden)
        write_mode, why = checked.write_mode
        move = catalog.update_move(move.id, rows_total=checked.total_rows, write_mode=write_mode, write_mode_reason=why)
        _save_progress(catalog, move, checked.layout, checked.rows, {})
        progress.phase(
            f"move {move.id}: {move.who} {checked.source.name} -> {checked.target.name}, "
            f"{checked.total_rows} rows in {len(checked.layout.tables)} tables"
        )
        run = MoveRun(
            catalog, checked.source, checked.target, checked.layout, lock, options, progress, ctx.metrics, stop
        )
        outcome = _run(run, move, resumed=False)
        return replace(outcome, not_moved=checked.null_tenant_rows, skipped=checked.skipped)


def _record_override(catalog: Catalog, move: Move, reason: str | None, overridden: tuple[str, ...]) -> None:
    """The audit record of a move the placement policy forbids, allowed by --override-policy."""
    event = audit.Event(
        audit.Action.OVERRIDE, move.tenants, move.source, move.target, move.id, f"{reason}: {'; '.join(overridden)}"
    )
    audit.append(catalog, event)


def resume_move(
    ctx: Context, move_id: int, options: MoveOptions, progress: Progress, stop: threading.Event | None = None
) -> MoveOutcome:
    """`migrator move --move ID`: resume an unfinished move by its id (a cohort too long to list)."""
    move = ctx.catalog.move(move_id)
    options = with_config_limits(ctx, options)
    if not move.is_open:
        raise BadInput(f"{describe_move(move)} is finished; nothing to resume")
    with ctx.catalog.lock_tenants(move.tenants) as lock:
        return _resume(ctx, ctx.catalog.move(move_id), lock, options, progress, stop)


def revert_move(
    ctx: Context, move_id: int, options: MoveOptions, progress: Progress, stop: threading.Event | None = None
) -> MoveOutcome:
    """`migrator move revert ID`: take a flipped move back within its revert window (see `revert`).

    The revert is a move of its own, back from the forward move's target to its source, run by the
    same state machine from `synced`: resumable after any interruption by running this again, and
    `migrator move abort` leaves the tenants on the target, writable. A revert whose flip was
    interrupted before the source's fence was lifted is finished here.
    """
    catalog = ctx.catalog
    options = replace(with_config_limits(ctx, options), revert_window=False)  # a revert opens no window
    with catalog.lock_tenants(catalog.move(move_id).tenants) as lock:
        forward = catalog.move(move_id)
        reverts = catalog.reverts_of(forward.id)
        pending = [m for m in reverts if m.is_open]
        if pending:
            return _resume(ctx, pending[0], lock, options, progress, stop)
        if forward.phase == Phase.REVERTED:
            done = next(m for m in reversed(reverts) if m.phase in FLIPPED)
            if not options.dry_run:
                _finish_revert(ctx, done)
            routes = catalog.routes_of(done.tenants)
            return MoveOutcome(done.tenants, done.source, done.target, done, routes, True)
        checked = revert.check_revert(catalog, forward)
        source, target = catalog.stamp(forward.target), catalog.stamp(forward.source)
        throttle.check_visible(catalog, (source, target), options.throttle)
        if options.dry_run:
            return MoveOutcome(forward.tenants, forward.target, forward.source, None, [], False)
        with stamps.connect(source) as conn:  # a forward move killed right after its flip left them
            forget_progress(conn, forward.id)
        move = catalog.create_move(
            checked.routes, forward.source, Mode.ONLINE, options.batch_rows, checked.revision, reverts=forward.id
        )
        write_mode, why = checked.write_mode
        move = catalog.update_move(
            move.id, rows_total=forward.rows_copied, write_mode=write_mode, write_mode_reason=why
        )
        progress.phase(f"move {move.id}: reverting move {forward.id}, {move.who} {source.name} -> {target.name}")
        layout = stamps.layout(source, ctx.config.tenancy)
        run = MoveRun(catalog, source, target, layout, lock, options, progress, ctx.metrics, stop or threading.Event())
        return _run(run, move, resumed=False)


def _finish_revert(ctx: Context, move: Move) -> None:
    """The end of a flipped revert, again (idempotent): a crash may have come before it."""
    revert.finish(ctx.catalog, move, stamps.layout(ctx.catalog.stamp(move.target), ctx.config.tenancy))


def with_config_limits(ctx: Context, options: MoveOptions) -> MoveOptions:
    """The move's own limits made stricter by migrator.toml's `[throttle]` (the catalog's are read live)."""
    limits = options.throttle.limits.stricter(ctx.config.throttle)
    return replace(options, throttle=replace(options.throttle, limits=limits))


def _resume(
    ctx: Context,
    move: Move,
    lock: TenantLock,
    options: MoveOptions,
    progress: Progress,
    stop: threading.Event | None = None,
) -> MoveOutcome:
    source, dest = ctx.catalog.stamp(move.source), ctx.catalog.stamp(move.target)
    layout = _resume_layout(ctx, move, source, dest)
    check_resume(source, dest, layout, allow_triggers=options.allow_triggers)
    throttle.check_visible(ctx.catalog, (source, dest), options.throttle)
    if options.dry_run:
        return MoveOutcome(move.tenants, source.name, dest.name, move, [], True)
    progress.phase(f"resuming move {move.id} of {move.who} at phase {move.phase}")
    run = MoveRun(ctx.catalog, source, dest, layout, lock, options, progress, ctx.metrics, stop or threading.Event())
    return _run(run, move, resumed=True)


def _resume_layout(ctx: Context, move: Move, source: Stamp, target: Stamp) -> Layout:
    """Re-read the layout for a resume, refusing if either stamp's schema changed meanwhile."""
    with stamps.connect(source) as src, stamps.connect(target) as tgt:
        advice = f"abort it with `migrator move abort {move.id}`"
        check_schema_unchanged(src, tgt, move, source.name, target.name, advice)
    return stamps.layout(source, ctx.config.tenancy)


def _save_progress(
    catalog: Catalog, move: Move, layout: Layout, totals: dict[str, int], cursors: dict[str, copy.Cursor]
) -> None:
    """The catalog's per-table copy progress for `move status` (the target's cursors stay authoritative)."""
    rows = []
    for position, table in enumerate(layout.tables):
        cursor = cursors.get(table.label, copy.START)
        total = totals.get(table.label, 0)
        rows.append(TableProgress(move.id, table.label, position, total, cursor.rows, cursor.done, None, None))
    catalog.save_tables(move.id, rows)


def _run(run: MoveRun, move: Move, *, resumed: bool) -> MoveOutcome:
    report = None
    timings: dict[str, float] = {}
    run.progress.begin(move.rows_total)
    if move.phase not in (Phase.CREATED, Phase.COPYING):  # resumed after the copy: every row is copied
        run.progress.advance("", move.rows_copied)

    def at(step: Move) -> Move:
        run.metrics.phase(step.id, step.phase, len(step.tenants))
        return step

    run.metrics.rows_copied.labels(run.source.name, run.target.name)  # exported (as 0) from the start

    try:
        move = at(move)
        run.safe_point(move.id)
        if move.phase == Phase.CREATED:
            with _timed(timings, "guard"):
                move = at(_guard(run, move))
        if move.phase == Phase.COPYING:
            run.safe_point(move.id)
            with _timed(timings, "copy"):
                move = at(_copy(run, move))
        if move.mode == Mode.OFFLINE:
            if move.phase == Phase.COPIED:
                run.lock.check()
                run.progress.phase(f"verifying {move.who} on {run.source.name} and {run.target.name}")
                with _timed(timings, "verify"), ticking(run.progress, f"verifying {move.who}"):
                    move, report = verify_move(run, move)
                    at(move)
            if move.phase == Phase.VERIFIED:
                run.progress.phase(f"flipping route of {move.who} to {run.target.name}")
                with _timed(timings, "flip"):
                    routes = _offline_flip(run, move)
                return _finished(run, move, routes, resumed, report, timings)
        else:
            if move.phase == Phase.COPIED:
                run.safe_point(move.id)
                with _timed(timings, "sync"):
                    move, report = _sync(run, move)
                    at(move)
            if move.phase in (Phase.SYNCED, Phase.CUTOVER):
                run.safe_point(move.id)
                with _timed(timings, "cutover"):
                    routes, freeze_steps = online_cutover(run, move)
                return replace(_finished(run, move, routes, resumed, report, timings), freeze_steps_ms=freeze_steps)
        raise MigratorError(f"move {move.id} is {move.phase}; nothing to run")
    except MigratorError as exc:
        _failed(run, move, str(exc), exc)
        raise
    except Exception as exc:
        _failed(run, move, f"{type(exc).__name__}: {exc}", exc)
        raise
    finally:
        run.close()


def _offline_flip(run: MoveRun, move: Move) -> list[Route]:
    """Offline, once verified: wait for the target's standbys, open the revert window (the source is
    fenced: nothing writes the tenants until they live on the target, so it captures at once), flip."""
    with ticking(run.progress, f"waiting for {run.target.name}'s standbys to replay the copy"):
        wait_for_replicas(run, "the copy")
    window = opens_window(run, move)
    if window:
        prepare_window(run, move, capture=True)
    run.lock.check()  # a lock lost during the long verify is taken again here, outside any freeze
    return flip(run, move, window=window)


def _failed(run: MoveRun, move: Move, message: str, exc: Exception) -> None:
    if isinstance(exc, VerifyMismatch):
        run.metrics.verify_mismatches.inc()
    run.metrics.ended(move.id, "failed", len(move.tenants))
    _record_error(run.catalog, move, message)


@contextlib.contextmanager
def _timed(timings: dict[str, float], step: str) -> Iterator[None]:
    """Seconds spent in each step by this invocation: shown in `--json`, read by `scripts/bench`."""
    started = time.monotonic()
    try:
        yield
    finally:
        timings[step] = round(time.monotonic() - started, 3)


def _finished(
    run: MoveRun, move: Move, routes: list[Route], resumed: bool, report: Report | None, timings: dict[str, float]
) -> MoveOutcome:
    run.metrics.ended(move.id, "flipped", len(move.tenants))
    timings.update(run.throttle_seconds())
    with stamps.connect(run.target) as tgt:
        copied = proof.copied_sums(tgt, move.id)
        moved.record(run.catalog, run.source, run.layout, move, copied)
        with stamps.connect(run.source) as src:  # the log `record` read (a revert's is gone with its window)
            fence.forget_changes(src, move.capture_id)
        forget_progress(tgt, move.id)
    move = run.catalog.move(move.id)
    return MoveOutcome(
        move.tenants, run.source.name, run.target.name, move, routes, resumed, report=report, timings=timings
    )


def _sync(run: MoveRun, move: Move) -> tuple[Move, Report]:
    """Online: catch up, then verify every row the application has not touched, while it writes."""
    run.progress.phase(f"catching up with the writes of {move.who} on {run.source.name}")
    with ticking(run.progress, f"catching up with the writes of {move.who}"):
        catch_up(run, move)
    with ticking(run.progress, f"checking the references of {move.who} on {run.target.name}"):
        check_references(run, move)
    run.progress.phase(f"verifying the bulk copy of {move.who} (writes continue)")
    with ticking(run.progress, f"verifying the bulk copy of {move.who}"):
        report, unproven = verify_before_freeze(run, move)
    run.progress.phase(f"bulk copy verified; {unproven} keys in flux are checked again in the freeze")
    if not report.equal:
        message = f"move {move.id}: verification of the bulk copy failed, route not flipped: {report.summary()}"
        run.catalog.update_move(move.id, error=report.summary())
        raise VerifyMismatch(message)
    return run.catalog.update_move(move.id, phase=Phase.SYNCED, error=None), report


def _record_error(catalog: Catalog, move: Move, message: str) -> None:
    """Best effort: the error is shown by `move status`; losing it must not hide the original one."""
    with contextlib.suppress(Exception):
        catalog.update_move(move.id, error=message[:2000])


def _guard(run: MoveRun, move: Move) -> Move:
    """Before the copy: online, capture the tenant's writes; offline, reject them for the whole copy."""
    offline = move.mode == Mode.OFFLINE
    with stamps.connect(run.source, autocommit=False) as src:
        fence.guard(src, run.layout, move.tenants, move.id, fenced=offline, capture=not offline)
    if offline:
        run.catalog.set_route_state(move.tenants, "fenced")
    with stamps.connect(run.target, autocommit=False) as tgt:
        fence.ensure_schema(tgt)
    return run.catalog.update_move(move.id, phase=Phase.COPYING)


def _copy(run: MoveRun, move: Move) -> Move:
    catalog, layout = run.catalog, run.layout
    totals = {t.table_name: t.rows_total for t in catalog.tables(move.id)}

    def finished(completed: dict[str, copy.Cursor]) -> None:
        cursors.update(completed)
        _save_progress(catalog, move, layout, totals, cursors)

    with (  # the copy's steps on each stamp share a session per thread (`ThreadSessions`)
        ThreadSessions(run.source.dsn, f"stamp {run.source.name}") as sources,
        ThreadSessions(run.target.dsn, f"stamp {run.target.name}") as targets,
    ):
        cursors = copy.read_cursors(targets, move.id, layout.tables)
        for table in layout.tables:  # resumed: the tables an earlier run completed count on the total
            if cursors[table.label].done:
                run.progress.advance(table.label, cursors[table.label].rows)
        if layout.followed:
            copy.copy_followed(sources, targets, layout, move.tenants)
        try:
            streams.copy_tables(run, sources, targets, move.id, move.tenants, totals, finished)
        except BaseException:  # stopped or failed: the catalog keeps what the target committed (`move list`)
            with contextlib.suppress(Exception):
                finished(copy.read_cursors(targets, move.id, layout.tables))
                catalog.update_move(move.id, rows_copied=sum(c.rows for c in cursors.values()))
            raise
        tgt = targets.session(autocommit=False)
        copy.advance_sequences(tgt, layout.tables, move.tenants, run.target.key_block)
        tgt.commit()
    return catalog.update_move(move.id, phase=Phase.COPIED, rows_copied=sum(c.rows for c in cursors.values()))


def abort_move(
    ctx: Context, move_id: int, batch_rows: int, progress: Progress, *, allow_triggers: bool = False
) -> Move:
    """`migrator move abort`: before the flip, remove the partial copy and lift the fence, for every
    tenant of the move.

    Refused before any delete where the target's triggers would fire for them or row-level security
    would hide rows of the partial copy (`check_deletes`).
    """
    catalog = ctx.catalog
    move = catalog.move(move_id)
    if move.phase in FLIPPED or move.phase == Phase.REVERTED:
        raise MigratorError(
            f"move {move.id} already flipped {move.who} to {move.target}; it cannot be aborted "
            f"(run `migrator cleanup --move {move.id}` to remove the old copy"
            + (f", or `migrator move revert {move.id}` to take it back)" if move.window_open else ")")
        )
    if move.phase == Phase.ABORTED:
        return move
    if move.reverts is not None:
        return _abort_revert(ctx, move, progress)
    with catalog.lock_tenants(move.tenants):
        source, target = catalog.stamp(move.source), catalog.stamp(move.target)
        layout = stamps.layout(source, ctx.config.tenancy)
        check_deletes(target, layout, allow_triggers=allow_triggers, what=f"abort of move {move.id}")
        progress.phase(f"removing the partial copy of {move.who} from {target.name}")
        with stamps.connect(target, autocommit=False) as tgt:  # a revert window's guard, made before the flip
            fence.unguard(tgt, layout, move.tenants)
        if move.write_mode == "replica":  # path rows copied before their parents are found by key
            delete_debris(source, target, layout, move.tenants, move.id)
        delete_tenant(target, layout, move.tenants, batch_rows, progress)
        with stamps.connect(target) as tgt:
            forget_progress(tgt, move.id)
        with stamps.connect(source, autocommit=False) as src:
            fence.unguard(src, layout, move.tenants)
        catalog.set_route_state(move.tenants, "active")
        return catalog.update_move(move.id, phase=Phase.ABORTED, finished_at=datetime.now(UTC))


def _abort_revert(ctx: Context, revert: Move, progress: Progress) -> Move:
    """`migrator move abort` of an unfinished revert: the tenants stay where the forward move put them,
    writable (its target's fence lifted), and its revert window stays open, with its log.

    Nothing is deleted: the rows the revert replayed onto the forward move's source are copies of the
    target's, as the forward move's own were, and the window's log still names every key written since
    its flip (a next revert replays them again, idempotently). The forward move's record of its source
    is taken again as the replay left it (still fenced, nothing else writes it), so that its cleanup
    deletes exactly those rows.
    """
    catalog = ctx.catalog
    with catalog.lock_tenants(revert.tenants):
        live, old = catalog.stamp(revert.source), catalog.stamp(revert.target)
        progress.phase(f"lifting the fence of {revert.who} on {live.name}; they stay there")
        with stamps.connect(live, autocommit=False) as conn:
            fence.set_fenced(conn, revert.tenants, False)
            conn.commit()
        catalog.set_route_state(revert.tenants, "active")
        assert revert.reverts is not None
        moved.record(catalog, old, stamps.layout(old, ctx.config.tenancy), catalog.move(revert.reverts), {})
        return catalog.update_move(revert.id, phase=Phase.ABORTED, finished_at=datetime.now(UTC))
