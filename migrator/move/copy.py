"""Bulk copy of one tenant's rows: keyset batches streamed with binary COPY, resumable to the row.

Each batch and its cursor are committed in the same target transaction
(`_migrator.copy_progress`), so after kill -9 the copy resumes from the last committed batch:
nothing skipped, nothing duplicated. Memory stays flat: blocks flow from the source COPY to the
target COPY without being parsed, and a writer thread overlaps reading and writing. Columns are
always named (COPY with column lists), so tables whose columns lie in another physical order on
the target copy the same.

Two shapes copy differently: a self-referencing table in batches parents first, read from one
source snapshot (`tree` explains why that is exact and resumable), and the tables of a DEFERRABLE
foreign-key cycle together in one target transaction with the constraints deferred, from one source
snapshot (`copy_cycle`; resumable at that granularity: a cycle is copied whole or not at all).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import psycopg
from psycopg import sql
from psycopg.copy import QueuedLibpqWriter

from migrator.catalog import Cohort
from migrator.db import dsn as dsnlib
from migrator.db.retry import STAMP_STEP
from migrator.errors import MigratorError
from migrator.move import follow, proof, tree
from migrator.move.keys import copy_rows, new_stage, range_bounds
from migrator.move.verify import Sides
from migrator.progress import Progress
from migrator.stamps import sequences
from migrator.stamps.access import SCHEMA, ThreadSessions, connect_dsn
from migrator.stamps.discovery import ForeignKey, Layout, Table, key_after, key_upto, tenant_filter
from migrator.stamps.paths import first_parents

CHUNK_BYTES = 64 * 1024
SEQUENCE_LOCK_CLASS = 0x6D73  # advisory lock class of sequence updates (fence's tenant locks use 0x6D67)


@dataclass(frozen=True)
class Cursor:
    """Where the copy of one table stands on the target: rows copied and whether it is complete."""

    rows: int
    done: bool


START = Cursor(0, False)  # nothing of the table copied yet


@dataclass(frozen=True)
class Stream:
    """What each copy stream of a move works with: both stamps' sessions, the tenants, the move,
    --batch-rows, its share of --rate-limit (rows/s), its progress, and `stop`, which ends it after its
    current batch."""

    sources: ThreadSessions
    targets: ThreadSessions
    tenants: Cohort
    move_id: int
    batch_rows: int
    progress: Progress
    rate_limit: float | None = None
    stop: threading.Event | None = None
    throttle: Callable[[], None] | None = None  # before each batch: wait while the stamps are over the limits

    def ready(self) -> None:
        """Before a batch: yield to the stamps' replicas, slots and load (`migrator.move.throttle`)."""
        if self.throttle is not None:
            self.throttle()

    def pace(self, rows: int, started: float) -> None:
        """Sleep as long as --rate-limit asks after a batch of `rows` begun at `started` (monotonic)."""
        if self.rate_limit:
            time.sleep(max(0.0, rows / self.rate_limit - (time.monotonic() - started)))


@dataclass(frozen=True)
class Part:
    """One key range of a table's copy, (lower bound, `upto`], and its cursor on the target.

    A table copies as one part or, split for parallel streams, as several whose ranges partition
    the key space. The ranges are fixed when the copy of the table starts (saved together, before
    any batch), so a resume with another --jobs continues the same ranges: exact to the row.
    """

    index: int
    after: list[str] | None  # the last key copied, or the range's lower bound (None: none)
    upto: list[str] | None  # the range's upper bound, fixed; None: to the end of the table
    rows: int
    done: bool


def read_parts(tgt: psycopg.Connection[Any], move_id: int, table: Table) -> list[Part]:
    """The table's parts as committed on the target (authoritative for resume), in key order."""
    rows = tgt.execute(
        sql.SQL(
            "SELECT part, cursor, upto, rows_copied, done FROM {}.copy_progress"
            " WHERE move_id = %s AND table_name = %s ORDER BY part"
        ).format(sql.Identifier(SCHEMA)),
        (move_id, table.label),
    ).fetchall()
    return [Part(*row) for row in rows]


def read_cursor(tgt: psycopg.Connection[Any], move_id: int, table: Table) -> Cursor:
    """The table's copy summed over its parts; not started when it has none."""
    parts = read_parts(tgt, move_id, table)
    if not parts:
        return START
    return Cursor(sum(p.rows for p in parts), all(p.done for p in parts))


@STAMP_STEP.wraps
def read_cursors(targets: ThreadSessions, move_id: int, tables: Sequence[Table]) -> dict[str, Cursor]:
    """The tables' cursors as committed on the target (a read: retried whole when the session is
    lost, as every copy step is)."""
    tgt = targets.session(autocommit=True)
    return {table.label: read_cursor(tgt, move_id, table) for table in tables}


def _save_part(tgt: psycopg.Connection[Any], move_id: int, table: Table, part: Part) -> None:
    tgt.execute(
        sql.SQL(
            "INSERT INTO {}.copy_progress (move_id, table_name, part, cursor, upto, rows_copied, done)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s)"
            " ON CONFLICT (move_id, table_name, part) DO UPDATE SET cursor = EXCLUDED.cursor,"
            " rows_copied = EXCLUDED.rows_copied, done = EXCLUDED.done"
        ).format(sql.Identifier(SCHEMA)),
        (move_id, table.label, part.index, part.after, part.upto, part.rows, part.done),
    )


@STAMP_STEP.wraps
def plan_parts(
    sources: ThreadSessions,
    targets: ThreadSessions,
    table: Table,
    tenants: Cohort,
    move_id: int,
    pieces: int,
    rows: int,
) -> list[Part]:
    """The table's parts: those already on the target, or up to `pieces` new ranges of about
    `rows / pieces` rows each (`rows`: preflight's count), cut at keys of a sample of the source's
    pages and saved in one target transaction before any of them copies a row.

    A self-referencing table and the tables of a cycle always copy as one part (their order is
    not by key). Rows written since preflight only make the ranges less even, never inexact.
    Retried whole on a lost session: the parts are saved in one transaction or not at all.
    """
    tgt = targets.session(autocommit=True)
    parts = read_parts(tgt, move_id, table)
    if parts:
        return parts
    bounds: list[list[str]] = []
    if pieces > 1 and rows >= pieces and not (table.self_references or table.cycle):
        bounds = range_bounds(sources.session(autocommit=True), table, tenants, pieces)
    edges: list[list[str] | None] = [None, *bounds, None]
    parts = [Part(i, edges[i], edges[i + 1], 0, False) for i in range(len(edges) - 1)]
    with tgt.transaction():
        for part in parts:
            _save_part(tgt, move_id, table, part)
    return parts


def batch_filter(src: psycopg.Connection[Any], table: Table, tenants: Cohort) -> sql.Composable:
    """Which rows a copy's batches select on the source: the tenants' (`tenant_filter`).

    For a path table, its paths' first parents of the tenants are read once, into indexed temporary
    tables of this session; each batch reads its key range in order and looks each row's parent up
    there, in one hash of them where that fits in hash_mem (work_mem x hash_mem_multiplier), else by
    the index. Through the paths themselves, the planner probed each row's parent by index in the
    shared parent table (a batch of 50,000 rows took 87 ms against 13 ms with the tenant column; 30
    to 45 ms by the hash); a semi-join with the temporary table became a hash join over the whole
    range and a sort (200 to 570 ms); an uncorrelated IN over it, once the parents outgrew hash_mem,
    rescanned them all for every row (580,000 tasks past 8 MB: 191 s for a batch of 40,000 checklist
    items, 0.1 to 0.2 s by the index).
    Parents written later are captured, and catch-up brings their rows.
    """
    if table.key is None:
        found = []
        for i, path in enumerate(table.paths):
            parents = sql.Identifier(f"migrator_parents_{i}")
            src.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(parents))
            src.execute(sql.SQL("CREATE TEMPORARY TABLE {} AS {}").format(parents, first_parents(path, tenants)))
            keys = path.hops[0].parent_columns
            src.execute(
                sql.SQL("CREATE INDEX ON {} ({})").format(parents, sql.SQL(", ").join(map(sql.Identifier, keys)))
            )
            src.execute(sql.SQL("VACUUM ANALYZE {}").format(parents))  # all visible: index-only probes
            match = sql.SQL(" AND ").join(
                sql.SQL("migrator_parent.{} = {}.{}").format(sql.Identifier(key), table.ident, sql.Identifier(column))
                for key, column in zip(keys, path.columns, strict=True)
            )
            # IS TRUE keeps the planner from a semi-join (a hash of a whole key range, then a sort, per
            # batch): the batch reads its range in key order; the correlated EXISTS lets the planner
            # choose between one hash of the parents and the index, never a rescan of them per row.
            found.append(sql.SQL("(EXISTS (SELECT FROM {} migrator_parent WHERE {})) IS TRUE").format(parents, match))
        return sql.SQL("({})").format(sql.SQL(" OR ").join(found))
    return tenant_filter(table, tenants)


def _batch_bound(
    src: psycopg.Connection[Any], table: Table, rows: sql.Composable, part: Part, batch_rows: int
) -> list[str] | None:
    """The key of the batch's last row, or None when fewer than `batch_rows` rows of the part remain."""
    row = src.execute(
        sql.SQL("SELECT ARRAY[{}] FROM {} WHERE {} AND {} AND {} ORDER BY {} OFFSET %s LIMIT 1").format(
            table.pk_text(),
            table.ident,
            rows,
            key_after(table, part.after),
            key_upto(table, part.upto),
            table.pk_cols(),
        ),
        (batch_rows - 1,),
    ).fetchone()
    return list(row[0]) if row else None


# Key types every server orders alike (no collation, no locale): for keys of these only, a batch's
# last key can be read back from the target instead of bounded on the source first.
ORDERED_ALIKE = frozenset(
    {"smallint", "integer", "bigint", "oid", "boolean", "date", "uuid",
     "timestamp without time zone", "timestamp with time zone"}
)  # fmt: skip


def _orders_alike(table: Table) -> bool:
    types = {c.name: c.base_type for c in table.columns}
    return all(types[name] in ORDERED_ALIKE for name in table.primary_key)


def _key_range(
    table: Table, rows: sql.Composable, after: list[str] | None, upto: list[str] | None, limit: int | None = None
) -> sql.Composed:
    """SELECT of the copy columns of the rows (`rows`, a filter) in a key range, in key order (the first `limit`)."""
    return sql.SQL("SELECT {} FROM {} WHERE {} AND {} AND {} ORDER BY {}{}").format(
        table.cols(),
        table.ident,
        rows,
        key_after(table, after),
        key_upto(table, upto),
        table.pk_cols(),
        sql.SQL(" LIMIT {}").format(sql.Literal(limit)) if limit else sql.SQL(""),
    )


def _last_key(
    tgt: psycopg.Connection[Any], relation: sql.Identifier, table: Table, tenants: Cohort, part: Part
) -> list[str]:
    """The greatest key of the part's range in `relation` on the target (the table, or the stage):
    the last row a batch wrote, because the part's range holds only rows its batches wrote.

    The stage holds the batch alone. In the table, the tenant's rows are those of the range; a path
    table's rows are found by their parents, which online may not be on the target yet (catch-up
    brings them), so there the batch's rows are those this transaction wrote.
    """
    batch: sql.Composable
    if relation == STAGE:
        batch = sql.SQL("true")
    elif table.key is None:
        batch = sql.SQL("xmin = pg_current_xact_id()::xid")
    else:
        batch = tenant_filter(table, tenants)
    row = tgt.execute(
        sql.SQL("SELECT ARRAY[{}] FROM {} WHERE {} AND {} AND {} ORDER BY {} LIMIT 1").format(
            table.pk_text(),
            relation,
            batch,
            key_after(table, part.after),
            key_upto(table, part.upto),
            sql.SQL(", ").join(sql.SQL("{} DESC").format(sql.Identifier(n)) for n in table.primary_key),
        )
    ).fetchone()
    assert row is not None, "a full batch left no row in its range"
    return list(row[0])


def _stream_batch(
    src: psycopg.Connection[Any], tgt: psycopg.Connection[Any], table: Table, select: sql.Composable
) -> int:
    """COPY the rows `select` returns on the source to the target inside its open transaction; returns rows."""
    out = sql.SQL("COPY ({}) TO STDOUT (FORMAT BINARY)").format(select)
    insert = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(table.ident, table.cols())
    with src.cursor() as scur, tgt.cursor() as tcur:
        with scur.copy(out) as reader, tcur.copy(insert, writer=QueuedLibpqWriter(tcur)) as inp:
            # Binary COPY sends one message per row: hand the writer thread ~64 KiB at a time, not rows.
            chunk: list[bytes | bytearray | memoryview] = []
            size = 0
            for block in reader:
                chunk.append(block)
                size += len(block)
                if size >= CHUNK_BYTES:
                    inp.write(b"".join(chunk))
                    chunk, size = [], 0
            if chunk:
                inp.write(b"".join(chunk))
        return max(tcur.rowcount, 0)


@STAMP_STEP.wraps
def copy_part(stream: Stream, table: Table, index: int) -> int:
    """Copy one part of the table from where its cursor stands on the target; returns rows copied now.

    Retried on transient errors: every attempt re-reads the committed cursor, so a retry neither
    repeats nor skips a batch. Parts of one table copy concurrently, each on its thread's sessions;
    `stop` ends the part after its current batch (another stream failed, or the operator stopped).

    Where the key orders alike on every server, a batch is the first `batch_rows` rows past the
    cursor and its last key is read back from the target in the batch's transaction; otherwise the
    source is asked for the batch's last key first (an OFFSET scan, a third of COPY's own work).
    """
    if table.self_references:
        return _copy_tree(stream, table)
    tenants, move_id, batch_rows, stop = stream.tenants, stream.move_id, stream.batch_rows, stream.stop
    read_back = _orders_alike(table)
    src, tgt = stream.sources.session(autocommit=True), stream.targets.session(autocommit=False)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="copy-proof") as beside:
        dsnlib.write_as_copies(tgt)  # the target's application triggers do not fire for copied rows
        src.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ  # a batch's COPY and its checksum: one snapshot
        sides = Sides(src, tgt, beside)
        part = next(p for p in read_parts(tgt, move_id, table) if p.index == index)
        tgt.commit()
        of_tenants = batch_filter(src, table, tenants)
        copied = 0
        while not part.done and not (stop and stop.is_set()):
            stream.ready()
            started = time.monotonic()
            try:
                with src.transaction(), tgt.transaction():
                    bound, select = _next_batch(src, table, of_tenants, part, batch_rows, read_back)
                    follow.copy_for_batch(src, tgt, table, select)  # the shared rows it references, first
                    rows = _stream_batch(src, tgt, table, select)
                    upto = (
                        _last_key(tgt, table.ident, table, tenants, part) if read_back and rows == batch_rows else bound
                    )
                    _prove_range(sides, stream, table, (of_tenants, part, upto))
                    part = _next_part(tgt, move_id, table, part, upto, rows)
            except psycopg.errors.ForeignKeyViolation:  # a parent written since its table was copied
                with src.transaction(), tgt.transaction():
                    bound, select = _next_batch(src, table, of_tenants, part, batch_rows, read_back)
                    follow.copy_for_batch(src, tgt, table, select)  # a followed row referenced since
                    new_stage(tgt, table, STAGE)
                    staged = copy_rows(src, tgt, table, select, STAGE)
                    upto = _last_key(tgt, STAGE, table, tenants, part) if read_back and staged == batch_rows else bound
                    deferred = defer_orphans(stream.sources.dsn, tgt, table, move_id)
                    rows = _insert_staged(tgt, table)
                    # rows left to catch-up are missing here: the batch is compared again before the flip
                    _prove_range(sides, stream, table, (of_tenants, part, upto), proven=not deferred)
                    part = _next_part(tgt, move_id, table, part, upto, rows)
            copied += rows
            stream.progress.advance(table.label, rows)
            stream.pace(rows, started)
        return copied


def _next_batch(
    src: psycopg.Connection[Any], table: Table, of_tenants: sql.Composable, part: Part, batch_rows: int,
    read_back: bool,
) -> tuple[list[str] | None, sql.Composed]:  # fmt: skip
    """The part's next batch on the source, in the caller's snapshot: its last key (None where it is
    read back from the target, or the part's rest is smaller) and the SELECT of its rows."""
    bound = None if read_back else _batch_bound(src, table, of_tenants, part, batch_rows)
    return bound, _key_range(table, of_tenants, part.after, bound or part.upto, batch_rows if read_back else None)


Batch = tuple[sql.Composable, Part, list[str] | None]  # the source's filter, the part, the batch's last key


def _prove_range(sides: Sides, stream: Stream, table: Table, batch: Batch, *, proven: bool = True) -> None:
    """Checksum the batch just written, the part's key range up to `upto` (None: to the part's end), on
    both sides, and record it with the batch (`proof`)."""
    of_tenants, part, upto = batch
    span = sql.SQL("{} AND {}").format(key_after(table, part.after), key_upto(table, upto or part.upto))
    sums = proof.prove_batch(
        sides,
        table,
        sql.SQL("{} AND {}").format(of_tenants, span),
        sql.SQL("{} AND {}").format(proof.WRITTEN_HERE, span),
    )
    proof.record_batch(sides.tgt, stream.move_id, table, sums, proven)


def _next_part(
    tgt: psycopg.Connection[Any], move_id: int, table: Table, part: Part, upto: list[str] | None, rows: int
) -> Part:
    """Save the part's cursor past a batch ending at `upto` (None: the part's last batch), in the
    batch's transaction."""
    moved = replace(part, after=upto or part.upto, rows=part.rows + rows, done=upto is None)
    _save_part(tgt, move_id, table, moved)
    return moved


STAGE = sql.Identifier("migrator_copy_stage")


def _insert_staged(tgt: psycopg.Connection[Any], table: Table) -> int:
    """Insert the staged rows the target lacks (a new session may stage rows copied before)."""
    return tgt.execute(
        sql.SQL("INSERT INTO {} ({}) OVERRIDING SYSTEM VALUE SELECT {} FROM {} ON CONFLICT ({}) DO NOTHING").format(
            table.ident, table.cols(), table.cols(), STAGE, table.pk_cols()
        )
    ).rowcount


def defer_orphans(source_dsn: str, tgt: psycopg.Connection[Any], table: Table, move_id: int) -> int:
    """Take out of the staged batch the rows whose parents the target lacks, and leave them to catch-up.

    Online, the application may write a parent after its table was copied and then a child under
    it: the copy of the child then meets a row whose parent is not on the target yet (the parent is
    captured, so catch-up brings it). Such rows, and any staged row that references one of them,
    are logged to the source's change log as if the application had written them, before the batch
    commits on the target; catch-up replays them after their parents (the log is replayed in order).
    Offline nothing writes during the copy, so such a row references another tenant's row: refused.
    """
    if not table.foreign_keys:
        return 0
    missing = sql.SQL(" OR ").join(_orphaned(table, fk) for fk in table.foreign_keys)
    found = sql.SQL("DELETE FROM {s} s WHERE {missing} RETURNING ARRAY[{key}]").format(
        s=STAGE,
        missing=missing,
        key=sql.SQL(", ").join(sql.SQL("to_jsonb(s) ->> {}").format(sql.Literal(c)) for c in table.primary_key),
    )
    keys: list[list[str]] = []
    while batch := [list(row[0]) for row in tgt.execute(found).fetchall()]:
        keys += batch  # again: rows that referenced the ones just taken out
    if not keys:
        return 0
    with connect_dsn(source_dsn, "the source", autocommit=True) as src, src.transaction():
        row = src.execute(
            sql.SQL("SELECT capture FROM {}.guarded_tenants WHERE move_id = %s").format(sql.Identifier(SCHEMA)),
            (move_id,),
        ).fetchone()
        if not (row and row[0]):
            raise MigratorError(
                f"rows of {table.label} reference rows the target lacks (keys "
                + "; ".join("(" + ", ".join(k) + ")" for k in keys[:5])
                + "), rows of another tenant or of none; a move copies one tenant's rows only"
            )
        src.cursor().executemany(
            sql.SQL("INSERT INTO {}.changes (move_id, table_name, pk) VALUES (%s, %s, %s)").format(
                sql.Identifier(SCHEMA)
            ),
            [(move_id, table.name, key) for key in keys],
        )
    return len(keys)


def _orphaned(table: Table, fk: ForeignKey) -> sql.Composed:
    """A staged row `s` references, through `fk`, a row that is neither on the target nor staged."""
    cols = [(sql.Identifier(c), sql.Identifier(p)) for c, p in zip(fk.columns, fk.parent_columns, strict=True)]
    match = sql.SQL(" AND ").join(sql.SQL("p.{} = s.{}").format(p, c) for c, p in cols)
    staged = (
        sql.SQL(" OR EXISTS (SELECT 1 FROM {} p WHERE {})").format(STAGE, match)
        if fk.parent == table.name
        else sql.SQL("")
    )
    return sql.SQL("NOT ({} OR EXISTS (SELECT 1 FROM {} p WHERE {}){})").format(
        sql.SQL(" OR ").join(sql.SQL("s.{} IS NULL").format(c) for c, _ in cols),
        fk.parent_ident,
        match,
        staged,
    )


def _copy_tree(stream: Stream, table: Table) -> int:
    """A self-referencing table, parents first, from one source snapshot (see `tree`).

    Its cursor only counts rows and says when the table is done: a new snapshot orders the rows
    afresh and inserts the ones the target lacks (ON CONFLICT DO NOTHING on the row key).
    """
    tenants, move_id = stream.tenants, stream.move_id
    src, tgt = stream.sources.session(autocommit=False), stream.targets.session(autocommit=False)
    dsnlib.write_as_copies(tgt)  # the target's application triggers do not fire for copied rows
    cursor = read_cursor(tgt, move_id, table)
    tgt.commit()
    if cursor.done:
        return 0
    src.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
    ordered, total = tree.order_rows(src, table, tenants)
    copied = 0
    for after, upto in list(tree.batches(ordered, total, stream.batch_rows)) or [(0, 0)]:
        stream.ready()
        started = time.monotonic()
        with tgt.transaction(), ThreadPoolExecutor(max_workers=1, thread_name_prefix="copy-proof") as beside:
            new_stage(tgt, table, STAGE)
            copy_rows(src, tgt, table, tree.rows_between(table, tenants, after, upto), STAGE)
            deferred = defer_orphans(stream.sources.dsn, tgt, table, move_id)
            rows = _insert_staged(tgt, table)
            # rows a resumed copy inserted before, or left to catch-up, are missing from the sums:
            # such a batch is compared again before the flip
            sums = proof.prove_batch(
                Sides(src, tgt, beside),
                table,
                sql.SQL("{} AND {}").format(tenant_filter(table, tenants), tree.numbered(table, after, upto)),
                sql.SQL("{} AND {}").format(proof.WRITTEN_HERE, tree.staged_in(table, STAGE)),
            )
            proof.record_batch(tgt, move_id, table, sums, proven=not deferred)
            cursor = Cursor(cursor.rows + rows, upto >= total)
            _save_part(tgt, move_id, table, Part(0, None, None, cursor.rows, cursor.done))
        copied += rows
        stream.progress.advance(table.label, rows)
        stream.pace(upto - after, started)
    src.rollback()
    return copied


@STAMP_STEP.wraps
def copy_cycle(
    sources: ThreadSessions,
    targets: ThreadSessions,
    tables: tuple[Table, ...],
    tenants: Cohort,
    move_id: int,
    progress: Progress,
) -> int:
    """The tables of a DEFERRABLE foreign-key cycle, whole, in one target transaction; returns rows copied.

    Their rows may reference each other in any order, so the constraints are deferred to the commit,
    which also commits every table's cursor as done: after kill -9 nothing of the cycle is on the
    target and it is copied again. All tables are read in one source snapshot, so the references
    between them hold; later changes are captured.
    """
    src, tgt = sources.session(autocommit=False), targets.session(autocommit=False)
    dsnlib.write_as_copies(tgt)  # the target's application triggers do not fire for copied rows
    if all(read_cursor(tgt, move_id, table).done for table in tables):
        return 0
    tgt.commit()
    src.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
    copied: dict[str, int] = {}
    with tgt.transaction(), ThreadPoolExecutor(max_workers=1, thread_name_prefix="copy-proof") as beside:
        tgt.execute("SET CONSTRAINTS ALL DEFERRED")
        for table in tables:
            select = _key_range(table, tenant_filter(table, tenants), None, None)
            copied[table.label] = _stream_batch(src, tgt, table, select)
            sums = proof.prove_batch(Sides(src, tgt, beside), table, tenant_filter(table, tenants), proof.WRITTEN_HERE)
            proof.record_batch(tgt, move_id, table, sums)
            _save_part(tgt, move_id, table, Part(0, None, None, copied[table.label], True))
    src.rollback()
    for table in tables:
        progress.advance(table.label, copied[table.label])
    return sum(copied.values())


@STAMP_STEP.wraps
def complete_tables(
    targets: ThreadSessions, move_id: int, tables: Sequence[Table], copied: dict[str, int]
) -> dict[str, Cursor]:
    """Once a table (or a cycle) is copied: statistics for its new size (`_analyze`), then its
    cursors as committed. Idempotent: retried whole on a lost connection like the copy's other steps."""
    tgt = targets.session(autocommit=True)
    for table in tables:
        _analyze(tgt, table, copied.get(table.label, 0))
    return {table.label: read_cursor(tgt, move_id, table) for table in tables}


def _analyze(tgt: psycopg.Connection[Any], table: Table, copied: int) -> None:
    """Give the target's planner the copied table's real size before its children are copied.

    A table emptied by an earlier cleanup keeps statistics saying it is empty; the foreign-key
    checks of the next table's COPY are then planned against that, and one plan seen here walked
    the whole tenant's index for every child row (minutes per batch). Only the columns migrator's
    own statements and the foreign-key checks look rows up by are sampled (key, tenant and
    foreign-key columns): the row count comes with any column list, and the others (long texts)
    were most of the cost (296 ms against 29 ms for a 37,000-row table of the sample schema).
    (A role that does not own the table gets a server warning and no statistics.)
    Skipped where the `copied` rows are at most ANALYZE_SHARE (autovacuum's own default share for a
    new sample) of the rows the statistics count: they still describe the table, and a small tenant
    moved into a large shared table costs no sample of it (177 ms a table, eight per move, in a drain
    of small tenants). Statistics that say empty are always refreshed.
    """
    row = tgt.execute(
        "SELECT greatest(c.reltuples, 0) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %s AND c.relname = %s",
        (table.schema, table.name),
    ).fetchone()
    if row is not None and copied <= ANALYZE_SHARE * float(row[0]):
        return
    columns = [*table.primary_key, *([table.key] if table.key else [])]
    columns += [c for fk in (*table.foreign_keys, *table.shared_keys) for c in fk.columns]
    listed = sql.SQL(", ").join(sql.Identifier(c) for c in dict.fromkeys(columns))
    tgt.execute(sql.SQL("ANALYZE {} ({})").format(table.ident, listed))


ANALYZE_SHARE = 0.1  # autovacuum_analyze_scale_factor's default


@STAMP_STEP.wraps
def copy_followed(sources: ThreadSessions, targets: ThreadSessions, layout: Layout, tenants: Cohort) -> int:
    """Before the tenant tables: the followed rows they reference that the target lacks (`follow`), in one
    target transaction (idempotent: a retry inserts what is still missing)."""
    src, tgt = sources.session(autocommit=False), targets.session(autocommit=False)
    dsnlib.write_as_copies(tgt)  # copies, not business events: the target's triggers do not fire
    src.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
    with tgt.transaction():
        copied = follow.copy_for_tenants(src, tgt, layout, tenants)
    src.commit()
    return copied


def advance_sequences(
    tgt: psycopg.Connection[Any], tables: tuple[Table, ...], tenants: Cohort, block: int | None
) -> list[str]:
    """Move the target's sequences (serial and identity) past the copied keys; returns those advanced.

    On a strided fleet (`block`, the target's block of ids) only past copied keys inside that block:
    a key from the source's block is the source's to hand out, and raising the target's sequence past
    it would put the target in the source's block.
    """
    tops: dict[str, int] = {}
    for table in tables:
        for column in table.columns:
            if column.sequence is None:
                continue
            row = tgt.execute(
                sql.SQL("SELECT max({}) FROM {} WHERE {} AND {}").format(
                    sql.Identifier(column.name), table.ident, tenant_filter(table, tenants), _within(column.name, block)
                )
            ).fetchone()
            if row is not None and row[0] is not None:
                tops[column.sequence] = max(row[0], tops.get(column.sequence, row[0]))
    _raise_sequences(tgt, tops)
    return sorted(tops)


def _within(column: str, block: int | None) -> sql.Composable:
    """The copied keys a target's sequence may pass: all, or on a strided fleet those of its block."""
    if block is None:
        return sql.SQL("true")
    low, high = sequences.block_range(block)
    return sql.SQL("{} BETWEEN {} AND {}").format(sql.Identifier(column), sql.Literal(low), sql.Literal(high))


def follow_source_sequences(
    src: psycopg.Connection[Any], tgt: psycopg.Connection[Any], tables: tuple[Table, ...], block: int | None
) -> None:
    """Inside the cutover's freeze: raise the target's sequences to at least the source's, O(1) each.

    `advance_sequences` after the bulk copy scans the copied keys; every key the source's
    sequences handed out since (rows captured during catch-up) is at most their last value, so
    reading that is enough here and keeps a scan of the tenant's rows out of the write freeze. On a
    strided fleet the source's values are in its own block, never raised into the target's (`block`).
    """
    names = sorted({c.sequence for t in tables for c in t.columns if c.sequence})
    if not names:
        return
    rows = src.execute("SELECT s, pg_sequence_last_value(s::regclass) FROM unnest(%s::text[]) AS s", (names,))
    values = {name: value for name, value in rows.fetchall() if value is not None}
    _raise_sequences(tgt, sequences.values_within(values, block))


def _raise_sequences(tgt: psycopg.Connection[Any], values: dict[str, int]) -> None:
    """Set each sequence to at least its value, in the caller's transaction; never lower one.

    Two moves into one target may raise a shared sequence at the same time: a transaction-scoped
    advisory lock per sequence makes their read-then-set atomic between them (an application's
    nextval only ever raises it further).
    """
    names = sorted(values)
    for name in names:
        tgt.execute("SELECT pg_advisory_xact_lock(%s, %s::regclass::oid::integer)", (SEQUENCE_LOCK_CLASS, name))
    if names:
        tgt.execute(
            "SELECT setval(s::regclass, v) FROM unnest(%s::text[], %s::bigint[]) AS u(s, v)"
            " WHERE v > coalesce(pg_sequence_last_value(s::regclass), v - 1)",
            (names, [values[n] for n in names]),
        )
