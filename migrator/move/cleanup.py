"""Removing what a move leaves behind: a moved tenant's rows on its old stamp, or a partial copy.

Deletes run children first, in batches of primary keys, one short transaction each, so cleanup
of a large tenant neither holds long locks nor bloats one transaction. A self-referencing table is
deleted in the reverse of its copy order (`tree`: children before parents, by descending depth); the
tables of a DEFERRABLE foreign-key cycle are deleted together in one transaction, deferred. The source's fence stays up
while its leftovers are deleted (only this transaction bypasses it) and is lifted at the end.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql

from migrator import stamps
from migrator.catalog import Move, Phase, Stamp
from migrator.context import Context
from migrator.db import dsn as dsnlib
from migrator.db.retry import STAMP_STEP
from migrator.errors import BadInput
from migrator.move import fence, tree
from migrator.move.preflight import check_deletes
from migrator.progress import Progress
from migrator.stamps.access import SCHEMA
from migrator.stamps.discovery import Layout, Table, tenant_filter


@STAMP_STEP.wraps
def delete_tenant_rows(
    stamp: Stamp, table: Table, tenant: str, batch_rows: int, progress: Progress, bypass_fence: bool = False
) -> int:
    """Delete the tenant's rows of one table in key batches; safe to repeat after an interruption."""
    if table.self_references:
        return _delete_tree(stamp, table, tenant, batch_rows, progress, bypass_fence)
    deleted = 0
    query = sql.SQL("DELETE FROM {t} WHERE ({pk}) IN (SELECT {pk} FROM {t} WHERE {f} LIMIT %s)").format(
        t=table.ident, pk=table.pk_cols(), f=tenant_filter(table, tenant)
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


def _delete_tree(
    stamp: Stamp, table: Table, tenant: str, batch_rows: int, progress: Progress, bypass_fence: bool
) -> int:
    """A self-referencing table backwards in its copy order: no batch deletes a row still referenced.

    The order is computed once, in a session of its own: nothing writes the tenant's rows here
    meanwhile (the source is fenced; the target is not routed to). An interruption computes it anew.
    """
    deleted = 0
    with stamps.connect(stamp, autocommit=False) as conn:
        dsnlib.write_as_copies(conn)  # deleting copies is no business event: application triggers stay quiet
        ordered, total = tree.order_rows(conn, table, tenant)
        conn.commit()
        ranges = list(tree.batches(ordered, total, batch_rows))
        for after, upto in reversed(ranges):
            with conn.transaction():
                if bypass_fence:
                    fence.bypass_for_cleanup(conn)
                rows = conn.execute(tree.delete_between(table, tenant, after, upto)).rowcount
            deleted += rows
            progress.advance(table.label, rows)
    return deleted


@STAMP_STEP.wraps
def delete_cycle(
    stamp: Stamp, tables: tuple[Table, ...], tenant: str, progress: Progress, bypass_fence: bool = False
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
                    sql.SQL("DELETE FROM {} WHERE {}").format(table.ident, tenant_filter(table, tenant))
                ).rowcount
    for label, rows in counts.items():
        progress.advance(label, rows)
    return counts


def delete_tenant(
    stamp: Stamp, layout: Layout, tenant: str, batch_rows: int, progress: Progress, bypass_fence: bool = False
) -> dict[str, int]:
    """Delete all of the tenant's rows on the stamp, children before parents."""
    counts: dict[str, int] = {}
    for table in reversed(layout.tables):
        progress.start_table(table.label, 0, 0)
        if table.cycle and table.label not in counts:  # the whole cycle at its last table in copy order
            counts.update(delete_cycle(stamp, layout.cycle_of(table), tenant, progress, bypass_fence))
        elif not table.cycle:
            counts[table.label] = delete_tenant_rows(stamp, table, tenant, batch_rows, progress, bypass_fence)
        progress.finish_table(table.label)
    return counts


def forget_progress(conn: psycopg.Connection[Any], move_id: int) -> None:
    """Drop the target's copy cursors of a finished or aborted move."""
    if fence.has_schema(conn):
        conn.execute(
            sql.SQL("DELETE FROM {}.copy_progress WHERE move_id = %s").format(sql.Identifier(SCHEMA)), (move_id,)
        )


def cleanup_tenant(
    ctx: Context, tenant: str, stamp_name: str, batch_rows: int, progress: Progress, *, allow_triggers: bool = False
) -> dict[str, int]:
    """`migrator cleanup`: delete a moved tenant's leftovers on its old stamp and lift the fence there.

    Refused before any delete where the stamp's triggers would fire for them or row-level security
    would hide some of the leftovers.
    """
    catalog = ctx.catalog
    route = catalog.route(tenant)
    stamp = catalog.stamp(stamp_name)
    if route.stamp == stamp.name:
        raise BadInput(f"tenant {tenant} lives on {stamp.name}; cleanup only deletes a moved tenant's leftovers")
    with catalog.lock_tenant(tenant):
        open_move = catalog.open_move(tenant)
        if open_move and stamp.name in (open_move.source, open_move.target):
            raise BadInput(f"move {open_move.id} of tenant {tenant} is unfinished; finish or abort it first")
        layout = stamps.layout(stamp, ctx.config.tenancy)
        check_deletes(stamp, layout, allow_triggers=allow_triggers, what=f"cleanup of tenant {tenant} on {stamp.name}")
        progress.phase(f"deleting tenant {tenant}'s rows on {stamp.name}")
        counts = delete_tenant(stamp, layout, tenant, batch_rows, progress, bypass_fence=True)
        with stamps.connect(stamp, autocommit=False) as conn:
            fence.unguard(conn, layout, tenant)
        _mark_cleaned(ctx, tenant, stamp.name)
    return counts


def _mark_cleaned(ctx: Context, tenant: str, stamp_name: str) -> Move | None:
    """Mark the flipped move from this stamp cleaned, after dropping its copy cursors on the target.

    A move killed between its flip and its own final step leaves those cursors behind, and no
    other command would remove them (abort refuses a flipped move).
    """
    for move in ctx.catalog.moves(tenant):
        if move.source == stamp_name and move.phase == Phase.FLIPPED:
            with stamps.connect(ctx.catalog.stamp(move.target)) as tgt:
                forget_progress(tgt, move.id)
            return ctx.catalog.update_move(move.id, phase=Phase.CLEANED)
    return None


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
