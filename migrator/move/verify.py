"""Prove a move's tenants' rows equal on two stamps: counts and order-independent checksums per table and tenant.

Checksums are computed inside PostgreSQL on both sides at once (two threads), by hashing each row
with `hash_record_extended`: columns of types whose hash tells every stored value apart are hashed
as they are, the others through their text form under the pinned session settings of `dsn.connect`,
so stamps configured differently (TimeZone, DateStyle...) compare equal when their data is.
On a mismatch the table is narrowed down by primary-key ranges, like data-diff, until the first
differing keys can be named.
"""

from __future__ import annotations

import contextlib
import queue
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Concatenate, ParamSpec, TypeVar

import psycopg
from psycopg import sql

from migrator import stamps
from migrator.catalog import Cohort, name_tenants
from migrator.context import Context
from migrator.errors import BadInput
from migrator.move.keys import by_key, key_quantiles
from migrator.stamps.access import connect_dsn
from migrator.stamps.discovery import (
    Column,
    Layout,
    Table,
    discover,
    key_after,
    key_upto,
    tenant_filter,
    tenant_text,
)

R = TypeVar("R")
P = ParamSpec("P")
LEAF_ROWS = 2000
FANOUT = 16
MAX_KEYS = 5
ALL_ROWS = sql.SQL("true")


@dataclass(frozen=True)
class Checksum:
    rows: int
    high: int
    low: int

    @property
    def digest(self) -> str:
        """A short printable form; equality is on the full tuple."""
        return f"{(self.high ^ (self.low << 1)) & 0xFFFFFFFFFFFFFFFF:016x}"

    def __add__(self, other: Checksum) -> Checksum:
        """Checksums are sums over rows, so those of disjoint row sets add up."""
        return Checksum(self.rows + other.rows, self.high + other.high, self.low + other.low)


EMPTY = Checksum(0, 0, 0)


@dataclass(frozen=True)
class TableResult:
    """One table compared: checksums over all of the move's tenants, the tenants whose own rows
    differ (each tenant is compared on its own), and the first differing keys."""

    table: str
    source: Checksum
    target: Checksum
    missing: list[list[str]] = field(default_factory=list)
    extra: list[list[str]] = field(default_factory=list)
    changed: list[list[str]] = field(default_factory=list)
    tenants: tuple[str, ...] = ()

    @property
    def equal(self) -> bool:
        return self.source == self.target and not self.tenants

    def describe(self, cohort: bool = False) -> str:
        """One line naming the differing keys (and, in a cohort, the tenants whose rows differ)."""
        parts = [f"{self.table}: source {self.source.rows} rows, target {self.target.rows} rows"]
        if cohort and self.tenants:
            parts.append(f"differs for {name_tenants(self.tenants)}")
        for what, keys in (
            ("changed", self.changed),
            ("missing on target", self.missing),
            ("extra on target", self.extra),
        ):
            if keys:
                parts.append(f"{what}: " + "; ".join("(" + ", ".join(k) + ")" for k in keys))
        return ", ".join(parts)


@dataclass(frozen=True)
class Report:
    tenants: Cohort
    tables: list[TableResult]

    @property
    def equal(self) -> bool:
        return all(t.equal for t in self.tables)

    @property
    def mismatches(self) -> list[TableResult]:
        return [t for t in self.tables if not t.equal]

    def summary(self) -> str:
        who = name_tenants(self.tenants)
        if self.equal:
            return f"{who}: {len(self.tables)} tables equal, {sum(t.source.rows for t in self.tables)} rows"
        cohort = len(self.tenants) > 1
        return f"{who} differs: " + " | ".join(t.describe(cohort) for t in self.mismatches)


Range = tuple[list[str] | None, list[str] | None]


# Types whose extended hash function distinguishes every stored value (equal hash input means the
# same bytes). numeric (1.0 = 1.00), floats (0 = -0), interval (1 day = 24 hours), jsonb (numbers
# inside it) and bpchar (trailing blanks) hash equal values alike though they differ, and types
# with no hash function would fail: both are hashed through their text form instead.
EXACT_HASH_TYPES = frozenset(
    {
        "smallint", "integer", "bigint", "oid", "boolean", "date", "time without time zone",
        "timestamp without time zone", "timestamp with time zone", "uuid", "bytea", "inet", "cidr",
        "macaddr", "macaddr8",
    }
)  # fmt: skip
TEXT_TYPES = frozenset({"text", "character varying", "name", '"char"'})


def _hashed_column(column: Column) -> sql.Composed:
    """A column as it goes into the row's hash: itself, or its text byte-compared ("C")."""
    ident = sql.Identifier(column.name)
    if column.base_type in EXACT_HASH_TYPES:
        return sql.SQL("{}").format(ident)
    if column.base_type in TEXT_TYPES:
        return sql.SQL('{} COLLATE "C"').format(ident)
    return sql.SQL('{}::text COLLATE "C"').format(ident)


def _hashed_row(table: Table) -> sql.Composed:
    """The row as a record of hashed columns: what every hash here is computed from."""
    return sql.SQL("ROW({})").format(sql.SQL(", ").join(_hashed_column(c) for c in table.columns))


def _row_hash(table: Table) -> sql.Composed:
    """128 bits as 32 hex digits: two 64-bit hashes of the row under different seeds.

    On 1M rows of the peer schema `hash_record_extended` over the hashed columns took 0.43 s
    against 0.95 s for `hashtextextended` over the whole row's text (building the text was most of
    it). Extended hash functions are stable across PostgreSQL versions (hash partitioning depends
    on them); a server of the other byte order hashes differently, which shows as a mismatch,
    never as a false match.
    """
    return sql.SQL(
        "lpad(to_hex(hash_record_extended({r}, 0)), 16, '0') || lpad(to_hex(hash_record_extended({r}, 1)), 16, '0')"
    ).format(r=_hashed_row(table))


def keyed_hash_query(table: Table, tenants: Cohort, keys: sql.Composable) -> sql.Composed:
    """(key, hash of the row) of the tenant's rows whose key is in `keys` (a key relation, see `by_key`)."""
    select = sql.SQL("ARRAY[{}] AS key, {} AS hash").format(table.pk_text(), _row_hash(table))
    return sql.SQL("SELECT x.key, x.hash FROM {}").format(by_key(table, keys, tenants, select))


def keyed_row_hashes(
    conn: psycopg.Connection[Any], table: Table, tenants: Cohort, keys: sql.Composable
) -> dict[tuple[str, ...], str]:
    """Key -> hash of the row, for the tenant's rows whose key is in `keys` (`keyed_hash_query`)."""
    return {tuple(key): digest for key, digest in conn.execute(keyed_hash_query(table, tenants, keys)).fetchall()}


def _in_span(table: Table, tenants: Cohort, span: Range, where: sql.Composable = ALL_ROWS) -> sql.Composed:
    """The tenant's rows with keys in (span[0], span[1]], and the extra filter: every query here reads these."""
    return sql.SQL("{} AND {} AND {} AND {}").format(
        tenant_filter(table, tenants), key_after(table, span[0]), key_upto(table, span[1]), where
    )


def checksum(
    conn: psycopg.Connection[Any],
    table: Table,
    tenants: Cohort,
    span: Range = (None, None),
    where: sql.Composable = ALL_ROWS,
) -> Checksum:
    """Count and the sums of both 64-bit halves of the row hashes, over a key range (and filter) of the tenant.

    sum(bigint) is exact (a 128-bit accumulator, numeric result): no cast per row is needed.
    """
    return rows_checksum(conn, table, _in_span(table, tenants, span, where))


def rows_checksum(conn: psycopg.Connection[Any], table: Table, rows: sql.Composable) -> Checksum:
    """`checksum` of the table's rows matching `rows`, a WHERE condition (a copy batch's, see `copy`)."""
    row = conn.execute(checksum_query(table, rows)).fetchone()
    assert row is not None
    return Checksum(int(row[0]), int(row[1]), int(row[2]))


def checksum_query(table: Table, rows: sql.Composable) -> sql.Composed:
    """Count and the sums of both halves of the row hashes of the table's rows matching `rows`."""
    return sql.SQL(
        "SELECT count(*), coalesce(sum(hash_record_extended(r, 0)), 0), coalesce(sum(hash_record_extended(r, 1)), 0)"
        " FROM (SELECT {} AS r FROM {} WHERE {}) rows"
    ).format(_hashed_row(table), table.ident, rows)


def tenant_checksums(
    conn: psycopg.Connection[Any], table: Table, tenants: Cohort, where: sql.Composable = ALL_ROWS
) -> dict[str, Checksum]:
    """`checksum` of each tenant's rows (with the filter), in one pass; tenants without rows are absent.

    Keyed by the tenant column's text, which preflight requires to be the tenant's spelling.
    """
    if len(tenants) == 1:  # no grouping needed
        one = checksum(conn, table, tenants, where=where)
        return {tenants[0]: one} if one.rows else {}
    query = sql.SQL(
        "SELECT k, count(*), sum(hash_record_extended(r, 0)), sum(hash_record_extended(r, 1))"
        " FROM (SELECT {} AS k, {} AS r FROM {} WHERE {}) rows GROUP BY k"
    ).format(
        tenant_text(table, table.ident), _hashed_row(table), table.ident, _in_span(table, tenants, (None, None), where)
    )
    return {k: Checksum(int(n), int(high), int(low)) for k, n, high, low in conn.execute(query).fetchall()}


def table_result(label: str, source: dict[str, Checksum], target: dict[str, Checksum]) -> TableResult:
    """Compare per-tenant checksums of one table: totals, and the tenants whose rows differ."""
    differ = tuple(t for t in sorted(set(source) | set(target)) if source.get(t) != target.get(t))
    return TableResult(label, sum(source.values(), EMPTY), sum(target.values(), EMPTY), tenants=differ)


def _signed64(hex16: str) -> int:
    value = int(hex16, 16)
    return value - (1 << 64) if value >= 1 << 63 else value


def checksum_of(hashes: dict[tuple[str, ...], str]) -> Checksum:
    """The same Checksum as `checksum` computes in SQL, from row hashes already fetched."""
    return Checksum(
        len(hashes), sum(_signed64(h[:16]) for h in hashes.values()), sum(_signed64(h[16:]) for h in hashes.values())
    )


def compare_hashes(table: str, source: dict[tuple[str, ...], str], target: dict[tuple[str, ...], str]) -> TableResult:
    """Compare two key -> row hash maps, naming the first differing keys."""
    keys = sorted(set(source) | set(target))
    missing = [list(k) for k in keys if k not in target][:MAX_KEYS]
    extra = [list(k) for k in keys if k not in source][:MAX_KEYS]
    changed = [list(k) for k in keys if k in source and k in target and source[k] != target[k]][:MAX_KEYS]
    return TableResult(table, checksum_of(source), checksum_of(target), missing, extra, changed)


def row_hashes(
    conn: psycopg.Connection[Any],
    table: Table,
    tenants: Cohort,
    span: Range = (None, None),
    where: sql.Composable = ALL_ROWS,
) -> dict[tuple[str, ...], str]:
    """Key -> hash of the row, for the tenant's rows in a key range (and filter)."""
    query = sql.SQL("SELECT ARRAY[{}], {} FROM {} WHERE {}").format(
        table.pk_text(), _row_hash(table), table.ident, _in_span(table, tenants, span, where)
    )
    return {tuple(key): digest for key, digest in conn.execute(query).fetchall()}


def _split(
    conn: psycopg.Connection[Any], table: Table, tenants: Cohort, span: Range, rows: int, where: sql.Composable
) -> list[Range]:
    """Cut a range into about FANOUT sub-ranges at the source's key quantiles."""
    bounds = key_quantiles(conn, table, _in_span(table, tenants, span, where), max(1, rows // FANOUT))
    edges: list[list[str] | None] = [span[0], *bounds, span[1]]
    return [(edges[i], edges[i + 1]) for i in range(len(edges) - 1) if edges[i] != edges[i + 1]]


@dataclass(frozen=True)
class Sides:
    """A session on the source and one on the target, and the thread that runs the source's half of
    a comparison or proof beside the target's (both sides at once)."""

    src: psycopg.Connection[Any]
    tgt: psycopg.Connection[Any]
    beside: ThreadPoolExecutor

    def both(
        self, read: Callable[Concatenate[psycopg.Connection[Any], P], R], *args: P.args, **kwargs: P.kwargs
    ) -> tuple[R, R]:
        """`read` on the source (in the thread beside) and on the target at once: (the source's, the target's)."""
        source = self.beside.submit(read, self.src, *args, **kwargs)
        target = read(self.tgt, *args, **kwargs)
        return source.result(), target


@dataclass(frozen=True)
class Differing:
    """A range of one table whose checksums differ, to narrow down to keys: the rows of `tenants`
    in `span` that match `where` (rows outside a move's captured keys, or all)."""

    table: Table
    tenants: Cohort
    span: Range = (None, None)
    where: sql.Composable = field(default_factory=lambda: ALL_ROWS)  # a Composable is not hashable


def _narrow(
    sides: Sides, rows: Differing, src_sum: Checksum, tgt_sum: Checksum, found: dict[str, list[list[str]]]
) -> None:
    table, tenants, span, where = rows.table, rows.tenants, rows.span, rows.where
    if sum(len(v) for v in found.values()) >= MAX_KEYS:
        return
    if max(src_sum.rows, tgt_sum.rows) <= LEAF_ROWS or src_sum.rows == 0:
        src_rows, tgt_rows = sides.both(row_hashes, table, tenants, span, where)
        for key in sorted(set(src_rows) | set(tgt_rows)):
            kind = (
                "missing"
                if key not in tgt_rows
                else "extra"
                if key not in src_rows
                else ("changed" if src_rows[key] != tgt_rows[key] else None)
            )
            if kind and sum(len(v) for v in found.values()) < MAX_KEYS:
                found[kind].append(list(key))
        return
    for sub in _split(sides.src, table, tenants, span, src_sum.rows, where):
        s, t = sides.both(checksum, table, tenants, sub, where)
        if s != t:
            _narrow(sides, replace(rows, span=sub), s, t, found)


class Streams:
    """`count` pairs of (source, target) connections, each comparing one table at a time in its own thread.

    A pair is reused from table to table (connecting costs more than checksumming a small table), as
    `Sides` whose threads run a table's source side beside its target side. With `snapshot` (exported by a
    source transaction that stays open meanwhile) every source connection reads in that snapshot,
    so all tables are compared as of one moment, and every connection holds a transaction until
    the block ends (temporary key tables live in it).
    """

    def __init__(self, source_dsn: str, target_dsn: str, count: int, snapshot: str | None = None) -> None:
        self._dsns, self._count, self._snapshot = (source_dsn, target_dsn), max(1, count), snapshot
        self._stack = contextlib.ExitStack()
        self._pairs: queue.SimpleQueue[Sides] = queue.SimpleQueue()
        self._beside = ThreadPoolExecutor(max_workers=self._count, thread_name_prefix="verify-side")

    def __enter__(self) -> Streams:
        autocommit = self._snapshot is None
        with self._stack as stack:
            for _ in range(self._count):
                src = stack.enter_context(connect_dsn(self._dsns[0], "the source", autocommit=autocommit))
                tgt = stack.enter_context(connect_dsn(self._dsns[1], "the target", autocommit=autocommit))
                if self._snapshot is not None:
                    src.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                    src.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(self._snapshot)))
                self._pairs.put(Sides(src, tgt, self._beside))
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc: object) -> None:
        self._beside.shutdown()
        self._stack.close()  # closing a connection rolls back what it holds

    def map(self, work: Callable[[Sides, int, Table], R], tables: Sequence[Table]) -> list[R]:
        """`work(sides, index, table)` for each table, `count` at a time; results in table order."""

        def one(index: int, table: Table) -> R:
            sides = self._pairs.get()
            try:
                return work(sides, index, table)
            finally:
                self._pairs.put(sides)

        with ThreadPoolExecutor(max_workers=self._count, thread_name_prefix="verify") as pool:
            return list(pool.map(one, range(len(tables)), tables))


def compare_table(sides: Sides, table: Table, tenants: Cohort, where: sql.Composable = ALL_ROWS) -> TableResult:
    """Checksum one table's rows (those matching `where`) per tenant on both sides concurrently;
    narrow down to keys where they differ."""
    s_sums, t_sums = sides.both(tenant_checksums, table, tenants, where)
    result = table_result(table.label, s_sums, t_sums)
    if result.equal:
        return result
    found: dict[str, list[list[str]]] = {"missing": [], "extra": [], "changed": []}
    for tenant in result.tenants:
        rows = Differing(table, (tenant,), where=where)
        _narrow(sides, rows, s_sums.get(tenant, EMPTY), t_sums.get(tenant, EMPTY), found)
    return replace(result, missing=found["missing"], extra=found["extra"], changed=found["changed"])


def verify_tenants(source_dsn: str, target_dsn: str, layout: Layout, tenants: Cohort, jobs: int = 1) -> Report:
    """Compare every tenant table of `layout` between two stamps (read-only on both), `jobs` tables at a time."""
    with Streams(source_dsn, target_dsn, min(jobs, len(layout.tables))) as streams:
        results = streams.map(lambda sides, _, table: compare_table(sides, table, tenants), layout.tables)
    return Report(tenants, results)


def verify_between(ctx: Context, tenants: Cohort, source_name: str, target_name: str, jobs: int = 1) -> Report:
    """`migrator verify`: compare tenants on two stamps, using the source's layout.

    An unknown tenant (no route) is bad input, as for a move: two empty sides would "verify equal".
    """
    for tenant in tenants:
        ctx.catalog.route(tenant)
    source, target = ctx.catalog.stamp(source_name), ctx.catalog.stamp(target_name)
    if source.name == target.name:
        raise BadInput("source and target are the same stamp")
    with stamps.connect(source) as src, stamps.connect(target):  # an unreachable stamp is named, masked
        layout = discover(src, ctx.config.tenancy)
    return verify_tenants(source.dsn, target.dsn, layout, tenants, jobs)
