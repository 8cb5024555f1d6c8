"""The fleet's sequence-backed keys: where each stamp's ids stand, which tenants' rows would collide if
they moved (`migrator keys check`), and each stamp's disjoint block of new ids (`migrator keys stride`).

A collision is counted exactly: for two stamps whose ids of a key overlap, the keys of one inside
the overlap are streamed into a temporary table on the other and joined, so each colliding row is
named with both tenants. On a strided fleet only the ids issued before striding can overlap.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from migrator import stamps
from migrator.catalog import Stamp
from migrator.config import Tenancy
from migrator.context import Context
from migrator.errors import BadInput, MigratorError, PreflightError
from migrator.stamps import sequences
from migrator.stamps.discovery import discover, inspect, tenant_text
from migrator.stamps.fanout import PER_SERVER, each_stamp
from migrator.stamps.sequences import KeySequence, Placement


@dataclass(frozen=True)
class StampKeys:
    """One stamp's sequence-backed keys, or why they could not be read."""

    stamp: Stamp
    keys: tuple[KeySequence, ...] = ()
    error: str | None = None


@dataclass(frozen=True)
class Overlap:
    """Two stamps whose ids of one key share the range `low..high`, and the rows that collide there."""

    key: str
    first: str
    second: str
    low: int
    high: int
    colliding: int = 0


@dataclass(frozen=True)
class Collision:
    """`rows` rows of `tenant` (on `source`) in `key` whose ids another tenant holds on `target`."""

    tenant: str
    source: str
    target: str
    key: str
    rows: int


# Per tenant, the stamps it cannot move to, with its collisions there.
Blocked = dict[str, dict[str, list[Collision]]]


@dataclass(frozen=True)
class KeyReport:
    """`migrator keys check`: every stamp's keys, their overlaps and the collisions they make."""

    stamps: tuple[StampKeys, ...]
    overlaps: tuple[Overlap, ...]
    collisions: tuple[Collision, ...]

    @property
    def strided(self) -> bool:
        return bool(self.stamps) and all(s.stamp.key_block is not None for s in self.stamps)

    @property
    def narrow(self) -> list[KeySequence]:
        """int2/int4 keys, once each (by table and column)."""
        seen: dict[str, KeySequence] = {}
        for found in self.stamps:
            for key in found.keys:
                if key.narrow:
                    seen.setdefault(key.label, key)
        return list(seen.values())

    def blocked(self) -> Blocked:
        """Per tenant, the stamps it cannot move to and the collisions there."""
        found: dict[str, dict[str, list[Collision]]] = defaultdict(lambda: defaultdict(list))
        for c in self.collisions:
            found[c.tenant][c.target].append(c)
        return found


def survey(ctx: Context, chosen: Sequence[Stamp], per_server: int = PER_SERVER) -> list[StampKeys]:
    """Every chosen stamp's sequence-backed keys, at most `per_server` sessions on a server at once."""

    def look(stamp: Stamp) -> StampKeys:
        try:
            with stamps.connect(stamp) as conn:
                return StampKeys(stamp, tuple(sequences.read(conn, discover(conn, ctx.config.tenancy))))
        except (MigratorError, psycopg.Error) as exc:
            return StampKeys(stamp, error=str(exc).splitlines()[0])

    return each_stamp(chosen, look, per_server)


def check(ctx: Context, per_server: int = PER_SERVER, chosen: Sequence[Stamp] | None = None) -> KeyReport:
    """`migrator keys check`: the survey, then the collisions of every pair of stamps whose ids overlap."""
    found = survey(ctx, ctx.catalog.stamps() if chosen is None else chosen, per_server)
    overlaps, collisions = [], []
    for first, second, a, b, low, high in _overlapping(found):
        pair = _collisions(first.stamp, second.stamp, a, b, low, high)
        collisions.extend(pair)
        overlaps.append(Overlap(a.label, first.stamp.name, second.stamp.name, low, high, sum(c.rows for c in pair)))
    collisions.sort(key=lambda c: (len(c.tenant), c.tenant, c.source, c.target, c.key))
    return KeyReport(tuple(found), tuple(overlaps), tuple(collisions))


def _overlapping(found: list[StampKeys]) -> list[tuple[StampKeys, StampKeys, KeySequence, KeySequence, int, int]]:
    """Each pair of stamps and unique key whose ids in use share a range, with that range."""
    pairs = []
    for i, first in enumerate(found):
        for second in found[i + 1 :]:
            theirs = {k.label: k for k in second.keys if k.unique and k.lowest is not None}
            for a in first.keys:
                b = theirs.get(a.label)
                if not a.unique or a.lowest is None or a.highest is None or b is None:
                    continue
                assert b.lowest is not None and b.highest is not None
                low, high = max(a.lowest, b.lowest), min(a.highest, b.highest)
                if low <= high:
                    pairs.append((first, second, a, b, low, high))
    return pairs


def _collisions(first: Stamp, second: Stamp, a: KeySequence, b: KeySequence, low: int, high: int) -> list[Collision]:
    """The rows of each stamp's tenants in `a`/`b` whose ids the other stamp's other tenants hold.

    The second stamp's ids in `low..high` (with their tenants) are streamed by COPY into a temporary
    table on the first and joined there: one pass over the overlap, both directions at once.
    """
    theirs = sql.Identifier("migrator_their_keys")
    column = sql.Identifier(a.column)
    pick = sql.SQL("SELECT t.{c}, {tenant} FROM {table} t WHERE t.{c} BETWEEN {low} AND {high}").format(
        c=column,
        low=sql.Literal(low),
        high=sql.Literal(high),
        tenant=tenant_text(b.table, sql.Identifier("t")),
        table=b.table.ident,
    )
    with stamps.connect(first, autocommit=False) as one, stamps.connect(second) as other:
        one.execute(
            sql.SQL("CREATE TEMPORARY TABLE {} (id bigint PRIMARY KEY, tenant text) ON COMMIT DROP").format(theirs)
        )
        into = sql.SQL("COPY {} FROM STDIN").format(theirs)
        with one.cursor().copy(into) as sink, other.cursor().copy(sql.SQL("COPY ({}) TO STDOUT").format(pick)) as rows:
            for block in rows:
                sink.write(block)
        pairs = one.execute(
            sql.SQL(
                "SELECT {mine}, o.tenant, count(*) FROM {table} t JOIN {theirs} o ON o.id = t.{c}"
                " WHERE {mine} IS DISTINCT FROM o.tenant GROUP BY 1, 2"
            ).format(mine=tenant_text(a.table, sql.Identifier("t")), table=a.table.ident, theirs=theirs, c=column)
        ).fetchall()
        one.rollback()
    found: list[Collision] = []
    for mine, other_tenant, count in pairs:
        if mine is not None:
            found.append(Collision(mine, first.name, second.name, a.label, count))
        if other_tenant is not None:
            found.append(Collision(other_tenant, second.name, first.name, a.label, count))
    return _summed(found)


def _summed(found: list[Collision]) -> list[Collision]:
    """One collision per (tenant, source, target, key), its rows summed over the other tenants."""
    rows: dict[tuple[str, str, str, str], int] = defaultdict(int)
    for c in found:
        rows[(c.tenant, c.source, c.target, c.key)] += c.rows
    return [Collision(t, s, d, k, n) for (t, s, d, k), n in sorted(rows.items())]


def describe(collisions: Sequence[Collision]) -> str:
    """`table: N rows` for each key of a tenant's collisions on one stamp."""
    return ", ".join(f"{c.key}: {c.rows:,} rows" for c in collisions)


# -- striding ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StampStride:
    """What striding does (or did) on one stamp: its block and each of its bigint sequences."""

    stamp: str
    block: int
    placements: tuple[Placement, ...] = ()


@dataclass(frozen=True)
class Stride:
    """`migrator keys stride`: per stamp, its block and sequences; `dry_run` when nothing was changed."""

    stamps: tuple[StampStride, ...]
    dry_run: bool
    narrow: tuple[KeySequence, ...] = field(default=())

    @property
    def restarted(self) -> int:
        return sum(1 for s in self.stamps for p in s.placements if p.restart_at is not None)


def stride(ctx: Context, dry_run: bool = False, per_server: int = PER_SERVER) -> Stride:
    """Give every stamp (retired ones too: their ids live on in tenants that moved away) a block and
    restart its bigint sequences there.

    Everything is read and checked first: one stamp unreachable, or one sequence whose block would
    be too small for the ids already issued, refuses the whole stride before any change. Run again,
    it changes nothing (blocks are kept, sequences inside their block stay).
    """
    fleet = ctx.catalog.stamps()
    if not fleet:
        raise BadInput("the catalog has no stamps; add them with `migrator stamp add` first")
    blocks = _blocks(fleet)
    found = survey(ctx, fleet, per_server)
    unreachable = [f"{f.stamp.name}: {f.error}" for f in found if f.error]
    if unreachable:
        raise MigratorError(f"keys stride refused, nothing changed: {'; '.join(unreachable)}")
    known = known_blocks(fleet)
    planned, refused = [], []
    for stamp_keys in found:
        block = blocks[stamp_keys.stamp.name]
        placements, problems = sequences.plan_block(stamp_keys.stamp.name, list(stamp_keys.keys), block, known)
        planned.append(StampStride(stamp_keys.stamp.name, block, tuple(placements)))
        refused.extend(problems)
    if refused:
        raise BadInput(f"keys stride refused, nothing changed: {'; '.join(refused)}")
    narrow = tuple(KeyReport(tuple(found), (), ()).narrow)
    if dry_run:
        return Stride(tuple(planned), True, narrow)
    ctx.catalog.assign_key_blocks([s.name for s in fleet])
    for stamp, plan in zip(fleet, planned, strict=True):
        with stamps.connect(stamp) as conn:
            sequences.apply_block(conn, list(plan.placements))
    return Stride(tuple(planned), False, narrow)


def _blocks(fleet: list[Stamp]) -> dict[str, int]:
    """Each stamp's block: its own if it has one, else the next free ones in name order (as
    `assign_key_blocks` gives them)."""
    blocks = {s.name: s.key_block for s in fleet if s.key_block is not None}
    top = max(blocks.values(), default=0)
    for stamp in fleet:
        if stamp.name not in blocks:
            top += 1
            blocks[stamp.name] = top
    return blocks


def strided(ctx: Context) -> bool:
    """Whether `keys stride` has given the fleet blocks (then every stamp joining it gets one)."""
    return any(s.key_block is not None for s in ctx.catalog.stamps())


def check_new_stamp(ctx: Context, stamp: Stamp) -> None:
    """Before a stamp joins a strided fleet: refuse, with nothing recorded, when its sequences cannot
    be put into the next block (ids already issued past it)."""
    fleet = ctx.catalog.stamps()
    block = next_block(fleet)
    with stamps.connect(stamp) as conn:
        _, refused = sequences.plan_block(
            stamp.name, _keys_if_any(conn, ctx.config.tenancy), block, known_blocks(fleet)
        )
    if refused:
        raise BadInput(f"stamp {stamp.name} not added: {'; '.join(refused)}")


def next_block(fleet: Iterable[Stamp]) -> int:
    """The block a stamp joining a strided fleet gets: the one after the highest given out."""
    return max((s.key_block or 0 for s in fleet), default=0) + 1


def place_new_stamp(ctx: Context, stamp: Stamp, *, reachable: bool = True) -> Stamp:
    """A stamp joining a strided fleet (`stamp add`, `fleet up`) gets the next block and, when
    `reachable`, its sequences are placed there (a stamp without the application's tables yet has
    none: `schema upgrade` places them as its revisions create them)."""
    fleet = {s.name: s for s in ctx.catalog.assign_key_blocks([stamp.name])}
    placed = fleet[stamp.name]
    if reachable:
        with stamps.connect(placed) as conn:
            found = _keys_if_any(conn, ctx.config.tenancy)
            placements, refused = sequences.plan_block(
                placed.name, found, placed.key_block or 0, known_blocks(fleet.values())
            )
            if refused:
                raise MigratorError(f"stamp {placed.name} has block {placed.key_block}, but {'; '.join(refused)}")
            sequences.apply_block(conn, placements)
    return placed


def _keys_if_any(conn: psycopg.Connection[Any], tenancy: Tenancy) -> list[KeySequence]:
    """The stamp's sequence-backed keys; none while it lacks the application's root table (`inspect`
    raises only then: problems elsewhere in the layout are a move's to refuse, not a block's)."""
    try:
        return sequences.read(conn, inspect(conn, tenancy))
    except PreflightError:
        return []


def known_blocks(fleet: Iterable[Stamp]) -> frozenset[int]:
    return frozenset(s.key_block for s in fleet if s.key_block is not None)


def place_sequences(
    conn: psycopg.Connection[Any], tenancy: Tenancy, stamp: Stamp, known: frozenset[int]
) -> list[Placement]:
    """Put a strided stamp's sequences that are not yet in its block there (a table a schema revision
    just created); refused, with nothing changed, when one cannot be. None for a stamp not strided.
    `known`: the blocks given out (ids in them are rows moved in from other stamps)."""
    if stamp.key_block is None:
        return []
    found = sequences.read(conn, discover(conn, tenancy))
    placements, refused = sequences.plan_block(stamp.name, found, stamp.key_block, known)
    if refused:
        raise MigratorError(f"cannot place the sequences of stamp {stamp.name} in its block: {'; '.join(refused)}")
    sequences.apply_block(conn, placements)
    return [p for p in placements if p.restart_at is not None]
