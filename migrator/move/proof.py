"""Verification folded into the copy: each batch proven as it commits, and after the copy only the rest.

A copy batch's rows are checksummed on the source in the snapshot its COPY read them from, and on
the target once written, in the batch's own transaction (both sides at once), so a target trigger
or a type that stores a value differently shows here, as it would in a full compare. Each batch is
recorded on the target with its transaction id and whether the two sums matched
(`_migrator.copy_batches`), in the transaction that commits the batch and its cursor: a resumed copy
keeps the batches already proven and proves the rest as it copies them.

Before the flip, the bulk of the tenant is then proven without reading it twice (`prove_untouched`).
Outside the keys the move captured (whose rows are compared one by one, as before):
- a target row whose xmin is a proven batch's was written by that batch and is unchanged since (any
  write makes a new row version with a new xmin), and its source row, never captured, is unchanged
  since the batch read it: the two are equal;
- every other target row (written by anything other than a proven batch: a batch whose sums
  differed, an application or an operator writing the target, a copy of an older migrator) is
  compared with its source row, key by key;
- equal row counts on both sides then prove that nothing is missing: the target's rows are a
  subset of the source's, key for key, and there are as many.
That costs a count on each side instead of two hashes of every row. Where the rows to compare one by
one are too many, or the counts differ, the table is compared by checksums and narrowed down to the
differing keys, as `migrator verify` does (which always compares everything).
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql

from migrator.catalog import Cohort
from migrator.move import fence
from migrator.move.keys import load_keys, outside_keys
from migrator.move.verify import (
    ALL_ROWS,
    Checksum,
    Sides,
    TableResult,
    compare_hashes,
    compare_table,
    keyed_row_hashes,
    rows_checksum,
)
from migrator.stamps.access import SCHEMA
from migrator.stamps.discovery import Table, tenant_filter

WRITTEN_HERE = sql.SQL("xmin = pg_current_xact_id()::xid")  # rows this transaction wrote
KEYED_MAX = 20_000  # rows not proven by a batch compared key by key; beyond, the table by checksums


def prove_batch(
    sides: Sides, table: Table, source_rows: sql.Composable, target_rows: sql.Composable
) -> tuple[Checksum, Checksum]:
    """Checksums of a batch: its rows on the source (`source_rows`, in the snapshot of its COPY) and on
    the target (`target_rows`, in the batch's open transaction), both sides at once."""
    source = sides.beside.submit(rows_checksum, sides.src, table, source_rows)
    target = rows_checksum(sides.tgt, table, target_rows)
    return source.result(), target


def record_batch(
    tgt: psycopg.Connection[Any], move_id: int, table: Table, sums: tuple[Checksum, Checksum], proven: bool = True
) -> None:
    """Record a batch under the target's transaction id, in the transaction that writes it; proven only
    where both sums match (and the caller found nothing else amiss)."""
    source, target = sums
    tgt.execute(
        sql.SQL(
            "INSERT INTO {}.copy_batches (move_id, table_name, rows, proven, source_sum) VALUES (%s, %s, %s, %s, %s)"
        ).format(sql.Identifier(SCHEMA)),
        (move_id, table.label, source.rows, proven and source == target, [source.rows, source.high, source.low]),
    )


def captured_table(index: int) -> sql.Identifier:
    """The temporary table of the layout's `index`-th table's captured keys, outside which its rows are proven."""
    return sql.Identifier(f"migrator_captured_{index}")


def proven_xids(tgt: psycopg.Connection[Any], move_id: int, table: Table) -> list[str]:
    """The transactions of the table's proven batches (as xid text, what a row's xmin reads)."""
    # a stamp prepared by an older migrator has no batches: nothing proven, every row compared
    query = "SELECT xid::xid::text FROM {} WHERE move_id = %s AND table_name = %s AND proven"
    return [xid for (xid,) in fence.own_rows(tgt, "copy_batches", query, (move_id, table.label))]


def counts(
    conn: psycopg.Connection[Any], table: Table, tenants: Cohort, outside: sql.Composable = ALL_ROWS,
    xids: list[str] | None = None,
) -> tuple[int, int]:  # fmt: skip
    """The tenant's rows (outside the captured keys, if `outside` says so), and (given proven
    batches' `xids`) how many of them no proven batch wrote."""
    unproven = sql.SQL("count(*) FILTER (WHERE xmin <> ALL(%s::xid[]))") if xids is not None else sql.SQL("0")
    row = conn.execute(
        sql.SQL("SELECT count(*), {} FROM {} WHERE {} AND {}").format(
            unproven, table.ident, tenant_filter(table, tenants), outside
        ),
        (xids,) if xids is not None else None,
    ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def _unproven_keys(
    tgt: psycopg.Connection[Any], table: Table, tenants: Cohort, outside: sql.Composable, xids: list[str]
) -> list[list[str]]:
    """Keys of the target's rows of the tenant, outside the captured keys, that no proven batch wrote."""
    rows = tgt.execute(
        sql.SQL("SELECT ARRAY[{}] FROM {} WHERE {} AND {} AND xmin <> ALL(%s::xid[])").format(
            table.pk_text(), table.ident, tenant_filter(table, tenants), outside
        ),
        (xids,),
    )
    return [list(key) for (key,) in rows.fetchall()]


def prove_untouched(
    sides: Sides, index: int, table: Table, tenants: Cohort, move_id: int, captured: sql.Identifier | None
) -> TableResult:
    """The table's rows outside the captured keys (loaded as the temporary table `captured` on both
    sides; None where none was captured),
    proven equal on both stamps as the module says; the source in the caller's snapshot, the target static.

    Where they are equal the result's checksums count the rows; where not, its keys name the first
    that differ.
    """
    xids = proven_xids(sides.tgt, move_id, table)
    # no anti-join with an empty key table: the planner probes it once per row (1.1 s on 700,000 rows)
    outside = outside_keys(table, captured) if captured is not None else ALL_ROWS
    source = sides.beside.submit(counts, sides.src, table, tenants, outside, None)
    target_rows, unproven = counts(sides.tgt, table, tenants, outside, xids)
    source_rows = source.result()[0]
    if source_rows == target_rows and unproven == 0:
        return TableResult(table.label, Checksum(source_rows, 0, 0), Checksum(target_rows, 0, 0))
    if source_rows == target_rows and unproven <= KEYED_MAX:
        keys = _unproven_keys(sides.tgt, table, tenants, outside, xids)
        name = sql.Identifier(f"migrator_unproven_{index}")
        sides.both(load_keys, table, keys, name)
        found = compare_hashes(table.label, *sides.both(keyed_row_hashes, table, tenants, name))
        if found.equal:
            return TableResult(table.label, Checksum(source_rows, 0, 0), Checksum(target_rows, 0, 0))
        return found
    return compare_table(sides, table, tenants, outside)


def copied_sums(tgt: psycopg.Connection[Any], move_id: int) -> dict[str, Checksum]:
    """Per table, the sum of the source checksums of the move's batches (what the copy read, all tenants)."""
    query = (
        "SELECT table_name, sum(source_sum[1]), sum(source_sum[2]), sum(source_sum[3]) FROM {}"
        " WHERE move_id = %s GROUP BY table_name"
    )
    rows = fence.own_rows(tgt, "copy_batches", query, (move_id,))
    return {label: Checksum(int(n), int(high), int(low)) for label, n, high, low in rows}
