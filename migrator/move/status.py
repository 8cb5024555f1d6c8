"""What `migrator move status ID` shows of a move's copy: the rows the target has committed, per
table and per key range, however the run ended.

The copy commits each batch together with its cursor in one target transaction (`copy`), so the
target's `_migrator.copy_progress` is the truth of an unfinished copy, after Ctrl-C or kill -9 as
well. The catalog keeps per-table figures too (saved as each table completes and when the copy
stops), which is what a finished move, or an unreachable target, is shown from. A table's count at
the start (preflight's) is kept apart from the rows written during the copy, so a tenant that
writes while it moves shows `382 rows: 350 at start + 32 written since`, never 109%.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from psycopg import sql

from migrator import stamps
from migrator.catalog import Move
from migrator.context import Context
from migrator.errors import Unreachable
from migrator.move import fence
from migrator.stamps.access import SCHEMA


@dataclass(frozen=True)
class Range:
    """One key range of a table's copy, (lower, upto], and the rows the target committed in it."""

    lower: list[str] | None  # None: from the first key
    upto: list[str] | None  # None: to the last key
    rows: int
    done: bool


@dataclass(frozen=True)
class TableCopy:
    """A table's copy: rows committed on the target, against the count taken at the start."""

    table: str
    rows: int
    at_start: int
    done: bool
    ranges: tuple[Range, ...] = ()  # empty where the catalog's figures are shown
    written_since: int = field(init=False)  # rows beyond the count at the start, written during the copy

    def __post_init__(self) -> None:
        object.__setattr__(self, "written_since", max(0, self.rows - self.at_start))


@dataclass(frozen=True)
class CopyStatus:
    """Every table of the move's copy, and where the figures come from (`target` or `catalog`)."""

    tables: tuple[TableCopy, ...]
    source: str
    note: str = ""

    @property
    def rows(self) -> int:
        return sum(t.rows for t in self.tables)

    @property
    def at_start(self) -> int:
        return sum(t.at_start for t in self.tables)


def copy_status(ctx: Context, move: Move) -> CopyStatus:
    """The move's copy as the target committed it while the move is unfinished, else as the catalog saved it."""
    saved = ctx.catalog.tables(move.id)
    from_catalog = tuple(TableCopy(t.table_name, t.rows_copied, t.rows_total, t.done) for t in saved)
    if not move.is_open:
        return CopyStatus(from_catalog, "catalog")
    try:
        committed = _committed(ctx, move)
    except Unreachable as exc:
        return CopyStatus(from_catalog, "catalog", f"{exc}; the catalog's figures, saved as tables completed")
    tables = []
    for t in saved:
        ranges = committed.get(t.table_name, ())
        if ranges:
            rows, done = sum(r.rows for r in ranges), all(r.done for r in ranges)
            tables.append(TableCopy(t.table_name, rows, t.rows_total, done, ranges))
        else:
            tables.append(TableCopy(t.table_name, t.rows_copied, t.rows_total, t.done))
    return CopyStatus(tuple(tables), "target")


def _committed(ctx: Context, move: Move) -> dict[str, tuple[Range, ...]]:
    """Each table's ranges as committed on the target (none before the copy starts or after the flip)."""
    with stamps.connect(ctx.catalog.stamp(move.target)) as tgt:
        if not fence.has_schema(tgt):
            return {}
        rows = tgt.execute(
            sql.SQL(
                "SELECT table_name, upto, rows_copied, done FROM {}.copy_progress WHERE move_id = %s"
                " ORDER BY table_name, part"
            ).format(sql.Identifier(SCHEMA)),
            (move.id,),
        ).fetchall()
    parts: dict[str, list[Range]] = {}
    for table, upto, copied, done in rows:
        ranges = parts.setdefault(table, [])
        lower = ranges[-1].upto if ranges else None  # the ranges partition the key space in order
        ranges.append(Range(lower, upto, copied, done))
    return {table: tuple(ranges) for table, ranges in parts.items()}
