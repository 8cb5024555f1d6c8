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
from datetime import datetime

from migrator import stamps
from migrator.catalog import FLIPPED, Move, Phase
from migrator.context import Context
from migrator.errors import Unreachable
from migrator.move import capture, fence


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
    query = "SELECT table_name, upto, rows_copied, done FROM {} WHERE move_id = %s ORDER BY table_name, part"
    with stamps.connect(ctx.catalog.stamp(move.target)) as tgt:
        rows = fence.own_rows(tgt, "copy_progress", query, (move.id,))
    parts: dict[str, list[Range]] = {}
    for table, upto, copied, done in rows:
        ranges = parts.setdefault(table, [])
        lower = ranges[-1].upto if ranges else None  # the ranges partition the key space in order
        ranges.append(Range(lower, upto, copied, done))
    return {table: tuple(ranges) for table, ranges in parts.items()}


@dataclass(frozen=True)
class Window:
    """A flipped move's revert window: open (with the target's backlog of captured changes not yet
    replayed onto the source), closed by cleanup, or used by a revert."""

    state: str  # "open", "closed" or "reverted"
    opened_at: datetime
    closed_at: datetime | None
    backlog: int | None  # open: changes captured on the target since the flip, not yet replayed
    reverted_by: int | None
    note: str = ""

    def line(self, move: Move) -> str:
        """The window as one line of `move status`."""
        since = f"{self.opened_at:%Y-%m-%d %H:%M:%S %Z}"
        if self.state == "reverted":
            return f"revert window: used by move {self.reverted_by}, which took the move back"
        if self.state == "closed":
            return f"revert window: open from {since} until cleanup closed it at {self.closed_at:%Y-%m-%d %H:%M:%S %Z}"
        backlog = "backlog unknown" if self.backlog is None else f"reverse backlog {self.backlog:,} changes"
        return (
            f"revert window: open since {since}; {backlog} captured on {move.target} "
            f"(`migrator move revert {move.id}` takes it back, `migrator cleanup --move {move.id}` closes it)"
            + (f"; {self.note}" if self.note else "")
        )


def window_status(ctx: Context, move: Move) -> Window | None:
    """The move's revert window, if its flip opened one."""
    if move.window_opened_at is None:
        return None
    if move.phase == Phase.REVERTED:
        done = [m.id for m in ctx.catalog.reverts_of(move.id) if m.phase in FLIPPED]
        return Window("reverted", move.window_opened_at, move.window_closed_at, None, done[-1] if done else None)
    if not move.window_open:
        return Window("closed", move.window_opened_at, move.window_closed_at, None, None)
    try:
        with stamps.connect(ctx.catalog.stamp(move.target)) as tgt:
            backlog = capture.backlog(tgt, move.id) if fence.has_schema(tgt) else 0
    except Unreachable as exc:
        return Window("open", move.window_opened_at, None, None, None, str(exc))
    return Window("open", move.window_opened_at, None, backlog, None)
