"""Removing what a move leaves behind: a moved tenant's rows on its old stamp, or a partial copy.

Deletes run children first, in batches of primary keys, one short transaction each, so cleanup
of a large tenant neither holds long locks nor bloats one transaction. A self-referencing table is
deleted in the reverse of its copy order (`tree`: children before parents, by descending depth); the
tables of a DEFERRABLE foreign-key cycle are deleted together in one transaction, deferred. The source's fence stays up
while its leftovers are deleted (only this transaction bypasses it) and is lifted at the end.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from migrator import stamps
from migrator.catalog import Cohort, Move, Phase, Stamp, describe_move, name_tenants
from migrator.context import Context
from migrator.db import dsn as dsnlib
from migrator.db.retry import STAMP_STEP
from migrator.errors import BadInput, Interrupted, PreflightError
from migrator.move import capture, fence, moved, revert, tree
from migrator.move.keys import by_key, keys_table, load_keys
from migrator.move.preflight import check_deletes
from migrator.progress import Progress
from migrator.stamps.access import SCHEMA
from migrator.stamps.discovery import Layout, Table, tenant_filter
from migrator.stamps.paths import parent_missing


def _safe_point(stop: threading.Event | None, stamp: Stamp, table: Table) -> None:
    """Between two committed delete batches: honour a stop (Ctrl-C, SIGTERM); a re-run deletes the rest."""
    if stop is not None and stop.is_set():
        raise Interrupted(f"cleanup on {stamp.name}: stopped at a safe point in {table.label}; run it again to finish")


@STAMP_STEP.wraps
def delete_tenant_rows(
    stamp: Stamp,
    table: Table,
    tenants: Cohort,
    batch_rows: int,
    progress: Progress,
    bypass_fence: bool = False,
    stop: threading.Event | None = None,
) -> int:
    """Delete the tenants' rows of one table in key batches; safe to repeat after an interruption."""
    if table.self_references:
        return _delete_tree(stamp, table, tenants, batch_rows, progress, bypass_fence, stop)
    deleted = 0
    query = sql.SQL("DELETE FROM {t} WHERE ({pk}) IN (SELECT {pk} FROM {t} WHERE {f} LIMIT %s)").format(
        t=table.ident, pk=table.pk_cols(), f=tenant_filter(table, tenants)
    )
    with stamps.connect(stamp, autocommit=False) as conn:
        dsnlib.write_as_copies(conn)  # deleting copies is no business event: application triggers stay quiet
        while True:
            with conn.transaction():
                if bypass_fence:
                    fence.bypass_for_cleanup(conn)
                rows = conn.execute(query, (batch_rows,)).rowcount
            deleted += rows
            progress.advance(table.label, rows)
            if rows < batch_rows:
                return deleted
            _safe_point(stop, stamp, table)


def _delete_tree(
    stamp: Stamp,
    table: Table,
    tenants: Cohort,
    batch_rows: int,
    progress: Progress,
    bypass_fence: bool,
    stop: threading.Event | None,
) -> int:
    """A self-referencing table backwards in its copy order: no batch deletes a row still referenced.

    The order is computed once, in a session of its own: nothing writes the tenant's rows here
    meanwhile (the source is fenced; the target is not routed to). An interruption computes it anew.
    """
    deleted = 0
    with stamps.connect(stamp, autocommit=False) as conn:
        dsnlib.write_as_copies(conn)  # deleting copies is no business event: application triggers stay quiet
        ordered, total = tree.order_rows(conn, table, tenants)
        conn.commit()
        ranges = list(tree.batches(ordered, total, batch_rows))
        for after, upto in reversed(ranges):
            _safe_point(stop, stamp, table)
            with conn.transaction():
                if bypass_fence:
                    fence.bypass_for_cleanup(conn)
                rows = conn.execute(tree.delete_between(table, tenants, after, upto)).rowcount
            deleted += rows
            progress.advance(table.label, rows)
    return deleted


@STAMP_STEP.wraps
def delete_cycle(
    stamp: Stamp, tables: tuple[Table, ...], tenants: Cohort, progress: Progress, bypass_fence: bool = False
) -> dict[str, int]:
    """The tenant's rows of a DEFERRABLE foreign-key cycle, in one transaction with the constraints deferred."""
    counts = {}
    with stamps.connect(stamp, autocommit=False) as conn:
        dsnlib.write_as_copies(conn)  # deleting copies is no business event: application triggers stay quiet
        with conn.transaction():
            if bypass_fence:
                fence.bypass_for_cleanup(conn)
            conn.execute("SET CONSTRAINTS ALL DEFERRED")
            for table in reversed(tables):
                counts[table.label] = conn.execute(
                    sql.SQL("DELETE FROM {} WHERE {}").format(table.ident, tenant_filter(table, tenants))
                ).rowcount
    for label, rows in counts.items():
        progress.advance(label, rows)
    return counts


def delete_tenant(
    stamp: Stamp,
    layout: Layout,
    tenants: Cohort,
    batch_rows: int,
    progress: Progress,
    bypass_fence: bool = False,
    stop: threading.Event | None = None,
) -> dict[str, int]:
    """Delete all of the tenants' rows on the stamp, children before parents; `stop` ends it between batches
    with `Interrupted`."""
    counts: dict[str, int] = {}
    for table in reversed(layout.tables):
        progress.start(table.label, 0, 0)
        if table.cycle and table.label not in counts:  # the whole cycle at its last table in copy order
            counts.update(delete_cycle(stamp, layout.cycle_of(table), tenants, progress, bypass_fence))
        elif not table.cycle:
            counts[table.label] = delete_tenant_rows(stamp, table, tenants, batch_rows, progress, bypass_fence, stop)
        progress.finish(table.label)
    return counts


@STAMP_STEP.wraps
def delete_debris(source: Stamp, target: Stamp, layout: Layout, tenants: Cohort, move_id: int) -> int:
    """Abort: path rows the copy wrote on a `replica` target before their parent got there.

    Online, a parent written after its table was copied reaches the target only with catch-up, but a
    child under it is copied with its table; as replica nothing refuses it. The target finds a path
    table's rows through their parents, so such a row is invisible to `delete_tenant` there. These
    are the target's rows whose path parent is missing and whose key is the tenants' on the source
    or was captured by the move (never another tenant's), taken parents first: a child of a row
    removed here is missing its parent in turn. Returns how many rows were deleted.
    """
    deleted = 0
    with stamps.connect(source, autocommit=False) as src, stamps.connect(target, autocommit=False) as tgt:
        dsnlib.write_as_copies(tgt)
        captured = capture.captured_keys(src, layout, move_id)
        src.rollback()  # captured_keys logs path rows of moved rows: nothing of that is wanted here
        for table in (t for t in layout.tables if t.paths):
            orphans = [list(k) for (k,) in tgt.execute(_orphans(table)).fetchall()]
            if not orphans:
                continue
            with src.transaction(force_rollback=True):
                load_keys(src, table, orphans, keys_table(0))
                owned = {tuple(k) for (k,) in src.execute(_owned(table, tenants)).fetchall()}
            owned |= {tuple(k) for k in captured.get(table.name, [])} & {tuple(k) for k in orphans}
            if owned:
                with tgt.transaction():
                    load_keys(tgt, table, [list(k) for k in owned], keys_table(0))
                    deleted += tgt.execute(
                        sql.SQL("DELETE FROM {} WHERE ({}) IN (SELECT {} FROM {})").format(
                            table.ident, table.pk_cols(), table.pk_cols(), keys_table(0)
                        )
                    ).rowcount
    return deleted


def _orphans(table: Table) -> sql.Composed:
    """Keys of the table's rows that have a path set whose first parent is not there."""
    text = sql.SQL(", ").join(sql.SQL("t.{}::text").format(sql.Identifier(c)) for c in table.primary_key)
    return sql.SQL("SELECT ARRAY[{}] FROM {} t WHERE {}").format(
        text, table.ident, parent_missing(table.paths, sql.Identifier("t"))
    )


def _owned(table: Table, tenants: Cohort) -> sql.Composed:
    """Keys of a temporary key table whose rows on the source are the tenants'."""
    select = sql.SQL("ARRAY[{}] AS k").format(table.pk_text())
    return sql.SQL("SELECT x.k FROM {}").format(by_key(table, keys_table(0), tenants, select))


def forget_progress(conn: psycopg.Connection[Any], move_id: int) -> None:
    """Drop the target's copy cursors and batch proofs of a finished or aborted move."""
    for name in ("copy_progress", "copy_batches"):  # an older migrator's `_migrator` lacks the second
        if fence.has_table(conn, name):
            conn.execute(sql.SQL("DELETE FROM {} WHERE move_id = %s").format(sql.Identifier(SCHEMA, name)), (move_id,))


@dataclass(frozen=True)
class CleanupOptions:
    """Flags of `migrator cleanup`: --batch-rows (rows per delete), --allow-triggers, --dry-run."""

    batch_rows: int
    allow_triggers: bool = False
    dry_run: bool = False


def cleanup_tenants(
    ctx: Context,
    tenants: Cohort,
    stamp_name: str,
    options: CleanupOptions,
    progress: Progress,
    stop: threading.Event | None = None,
) -> dict[str, int]:
    """`migrator cleanup`: delete moved tenants' leftovers on their old stamp and lift the fence there;
    first close the revert windows of their moves away from it (their targets capture no more).

    Refused before any delete where a tenant still lives on the stamp or has an unfinished move,
    where the stamp's triggers would fire for the deletes, where row-level security would hide
    some of the leftovers, and where the leftovers are not exactly what a flipped move copied and
    verified, or rows that stay would reference them (`moved.prove`). A dry run returns the rows
    it would delete per table, and deletes nothing.
    """
    catalog = ctx.catalog
    stamp = catalog.stamp(stamp_name)
    routes = {r.tenant: r for r in catalog.routes_of(tenants)}
    for tenant in tenants:
        route = routes.get(tenant) or catalog.route(tenant)  # an unknown tenant: its one-line refusal
        if route.stamp == stamp.name:
            raise BadInput(f"tenant {tenant} lives on {stamp.name}; cleanup only deletes a moved tenant's leftovers")
    with catalog.lock_tenants(tenants):
        for open_move in catalog.open_moves(tenants):
            if stamp.name in (open_move.source, open_move.target):
                raise BadInput(f"{describe_move(open_move)} is unfinished; finish or abort it first")
        layout = stamps.layout(stamp, ctx.config.tenancy)
        who = name_tenants(tenants)
        check_deletes(stamp, layout, allow_triggers=options.allow_triggers, what=f"cleanup of {who} on {stamp.name}")
        try:
            proof = moved.prove(catalog, stamp, layout, tenants, mark=not options.dry_run)
        except PreflightError as exc:
            raise PreflightError(f"cleanup of {who} on {stamp.name} was refused, {exc}") from None
        if options.dry_run:
            return proof.rows
        for closed in revert.close_windows(catalog, stamp.name, tenants, layout):
            progress.phase(f"closed the revert window of move {closed}: its target captures no more")
        progress.phase(f"deleting the rows of {who} on {stamp.name}")
        counts = delete_tenant(stamp, layout, tenants, options.batch_rows, progress, bypass_fence=True, stop=stop)
        with stamps.connect(stamp, autocommit=False) as conn:
            fence.unguard(conn, layout, tenants)
            still_guarded = fence.guarded(conn)
        _mark_cleaned(ctx, tenants, stamp.name, still_guarded)
    return counts


def cleanup_move(
    ctx: Context, move_id: int, options: CleanupOptions, progress: Progress, stop: threading.Event | None = None
) -> tuple[Move, dict[str, int]]:
    """`migrator cleanup --move ID`: the leftovers of every tenant of a flipped move, on its source."""
    move = ctx.catalog.move(move_id)
    if move.phase == Phase.REVERTED:
        reverts = [m.id for m in ctx.catalog.reverts_of(move.id) if m.phase in (Phase.FLIPPED, Phase.CLEANED)]
        raise BadInput(
            f"move {move.id} was reverted (by move {', '.join(map(str, reverts))}): {move.who} live on {move.source} "
            f"again; the copy left on {move.target} is the revert's to clean up (`migrator cleanup --move "
            f"{reverts[-1] if reverts else '?'}`)"
        )
    if move.phase != Phase.FLIPPED and move.phase != Phase.CLEANED:
        raise BadInput(f"{describe_move(move)} has not flipped; only a flipped move leaves rows to clean up")
    counts = cleanup_tenants(ctx, move.tenants, move.source, options, progress, stop)
    return ctx.catalog.move(move_id), counts


def _mark_cleaned(ctx: Context, tenants: Cohort, stamp_name: str, still_guarded: set[str]) -> None:
    """Mark the flipped moves from this stamp cleaned once none of their tenants is guarded there any
    more, after dropping their copy cursors on the target.

    A move killed between its flip and its own final step leaves those cursors behind, and no
    other command would remove them (abort refuses a flipped move).
    """
    moves = {m.id: m for tenant in tenants for m in ctx.catalog.moves(tenant)}
    for move in moves.values():
        if move.source == stamp_name and move.phase == Phase.FLIPPED and not still_guarded & set(move.tenants):
            with stamps.connect(ctx.catalog.stamp(move.target)) as tgt:
                forget_progress(tgt, move.id)
            ctx.catalog.update_move(move.id, phase=Phase.CLEANED)


def leftovers(ctx: Context, stamp_name: str | None = None) -> dict[str, list[str]]:
    """migrator objects left on stamps, by stamp name; empty lists are omitted."""
    chosen = [ctx.catalog.stamp(stamp_name)] if stamp_name else ctx.catalog.stamps()
    found = {}
    for stamp in chosen:
        with stamps.connect(stamp) as conn:
            items = fence.leftovers(conn)
        if items:
            found[stamp.name] = items
    return found
