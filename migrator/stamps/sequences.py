"""The sequence-backed keys of a stamp's tenant tables (serial, bigserial, identity) and its block of ids.

Every stamp's sequences start at 1, so the same ids exist on every stamp and a tenant's rows
collide with another tenant's when they move. Striding gives stamp N the block of values from
N * 2^48 on (Citus puts the node's group id in the high bits the same way): ids written from then
on never collide. Block 0, below 2^48, is where the ids issued before striding live; a fleet whose
ids already passed 2^48 cannot be strided this way, and is refused (`plan_block`).

Only bigint sequences are strided: an int4 key has 2^31 values, too few to split across a fleet
(`KeySequence.narrow`); it is reported, with what widening it to bigint takes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from migrator.stamps.discovery import Layout, Table

BLOCK_BITS = 48
BLOCK_SIZE = 1 << BLOCK_BITS


def block_range(block: int) -> tuple[int, int]:
    """The first and last value of block `block` (block 0 holds the ids issued before striding)."""
    return block * BLOCK_SIZE, (block + 1) * BLOCK_SIZE - 1


def block_of(value: int) -> int:
    return value >> BLOCK_BITS


@dataclass(frozen=True)
class KeySequence:
    """A tenant table's column fed by a sequence, as one stamp holds it.

    `unique` says the column alone is a unique key (a primary key `id`): only such a key can collide
    with another stamp's rows; a key that includes the tenant column cannot. `lowest`/`highest` are
    the ids in use (None for an empty table, or a key that cannot collide: not read, as an unindexed
    scan would cost a whole table for nothing). `next_value` is what its next nextval returns;
    `last_issued` the last value it handed out, None since a restart (or ever).
    """

    table: Table
    column: str
    sequence: str
    type: str
    next_value: int
    last_issued: int | None
    max_value: int
    increment: int
    unique: bool
    lowest: int | None = None
    highest: int | None = None

    @property
    def narrow(self) -> bool:
        """An int2/int4 sequence: too few values to split into blocks across a fleet."""
        return self.type != "bigint"

    @property
    def label(self) -> str:
        return f"{self.table.label}.{self.column}"

    def widen_hint(self) -> str:
        """What widening the key to bigint takes, for the report of a narrow key."""
        return (
            f"ALTER TABLE {self.table.label} ALTER COLUMN {self.column} TYPE bigint (rewrites the table under "
            f"an ACCESS EXCLUSIVE lock, and every foreign key column referencing it must widen too), then "
            f"ALTER SEQUENCE {self.sequence} AS bigint"
        )


_SEQUENCES = """
SELECT x, n.nspname, c.relname, s.seqtypid::regtype::text, s.seqmax, s.seqincrement
FROM unnest(%s::text[]) x JOIN pg_sequence s ON s.seqrelid = x::regclass
JOIN pg_class c ON c.oid = s.seqrelid JOIN pg_namespace n ON n.oid = c.relnamespace
"""

# The columns that alone make a unique, non-partial index of each table: (table as given, column).
_UNIQUE_ALONE = """
SELECT x, a.attname FROM unnest(%s::text[]) x
JOIN pg_index i ON i.indrelid = x::regclass AND i.indisunique AND i.indnkeyatts = 1 AND i.indpred IS NULL
  AND i.indexprs IS NULL
JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
"""


def read(conn: psycopg.Connection[Any], layout: Layout) -> list[KeySequence]:
    """Every sequence-backed column of the layout's tenant tables, with its sequence and ids in use."""
    fed = [(t, c.name, c.sequence) for t in layout.tables for c in t.columns if c.sequence is not None]
    if not fed:
        return []
    sequences = {
        name: (typ, *_position(conn, sql.Identifier(schema, relname), step), top, step)
        for name, schema, relname, typ, top, step in conn.execute(_SEQUENCES, (sorted({s for *_, s in fed}),))
    }
    tables = {t.label: t.ident.as_string(conn) for t, *_ in fed}
    unique = {(table, column) for table, column in conn.execute(_UNIQUE_ALONE, (sorted(set(tables.values())),))}
    found = []
    for table, column, sequence in fed:
        typ, position, issued, top, step = sequences[sequence]
        alone = (tables[table.label], column) in unique
        low, high = _in_use(conn, table, column) if alone else (None, None)
        found.append(KeySequence(table, column, sequence, typ, position, issued, top, step, alone, low, high))
    return found


def _position(conn: psycopg.Connection[Any], sequence: sql.Identifier, increment: int) -> tuple[int, int | None]:
    """What the sequence's next nextval returns, and the last value it handed out (None since a
    restart by setval(..., false), when pg_sequence_last_value says NULL too)."""
    row = conn.execute(sql.SQL("SELECT last_value, is_called FROM {}").format(sequence)).fetchone()
    assert row is not None
    last, called = int(row[0]), bool(row[1])
    return (last + increment, last) if called else (last, None)


def _in_use(conn: psycopg.Connection[Any], table: Table, column: str) -> tuple[int | None, int | None]:
    """The lowest and highest id in use: two index probes of the column's unique index."""
    row = conn.execute(
        sql.SQL("SELECT min({c}), max({c}) FROM {t}").format(c=sql.Identifier(column), t=table.ident)
    ).fetchone()
    assert row is not None
    return row[0], row[1]


def values_within(values: dict[str, int], block: int | None) -> dict[str, int]:
    """The sequence values a move may raise a target's sequences to: all of them on a fleet not strided,
    else only those inside the target's own block (a copied id from the source's block is the
    source's to hand out; raising the target past it would hand out the source's ids)."""
    if block is None:
        return values
    low, high = block_range(block)
    return {name: value for name, value in values.items() if low <= value <= high}


@dataclass(frozen=True)
class Placement:
    """What striding does to one sequence of a stamp: `restart_at` None means already in its block."""

    sequence: str
    keys: tuple[str, ...]
    next_value: int
    restart_at: int | None


def plan_block(
    stamp: str, found: list[KeySequence], block: int, known: frozenset[int] = frozenset()
) -> tuple[list[Placement], list[str]]:
    """How to put a stamp's bigint sequences into block `block`, and the reasons it cannot be (refusals).

    A sequence already inside its block stays where it is (striding again changes nothing); one
    below it restarts at the block's first value. `known` are the blocks the catalog had given out
    before: ids in them are rows that moved from another strided stamp. Refused: a sequence that
    handed out ids at or past 2^48 outside its block, or ids in use there outside every known block
    (the blocks are too small for the ids already issued); a MAXVALUE short of the block; a
    descending sequence.
    """
    low, high = block_range(block)
    by_sequence: dict[str, list[KeySequence]] = {}
    for key in found:
        if not key.narrow:
            by_sequence.setdefault(key.sequence, []).append(key)
    placements, refused = [], []
    for sequence, keys in sorted(by_sequence.items()):
        first = keys[0]
        issued = [first.last_issued] if first.last_issued is not None and block_of(first.last_issued) != block else []
        issued += [k.highest for k in keys if k.highest is not None and block_of(k.highest) not in known]
        outside = [v for v in issued if v >= BLOCK_SIZE]
        labels = tuple(k.label for k in keys)
        if first.increment <= 0:
            refused.append(f"{sequence} on stamp {stamp} ({', '.join(labels)}) counts down; stride it by hand")
        elif outside:
            refused.append(
                f"{sequence} on stamp {stamp} ({', '.join(labels)}) has issued id {max(outside)}, past the "
                f"{BLOCK_SIZE} ids below the first block and outside stamp {stamp}'s block {block} "
                f"({low}..{high}): the blocks are too small for the ids already issued"
            )
        elif first.max_value < high:
            refused.append(
                f"{sequence} on stamp {stamp} has MAXVALUE {first.max_value}, short of its block {block} "
                f"({low}..{high}): ALTER SEQUENCE {sequence} NO MAXVALUE first"
            )
        else:
            inside = low <= first.next_value <= high
            placements.append(Placement(sequence, labels, first.next_value, None if inside else low))
    return placements, refused


def apply_block(conn: psycopg.Connection[Any], placements: list[Placement]) -> None:
    """Restart the placed sequences at their block, never lowering one: an application's nextval
    racing with this only ever raises it, and a value already at or past the restart is kept."""
    moving = [p for p in placements if p.restart_at is not None]
    if moving:
        conn.execute(
            "SELECT setval(s::regclass, v, false) FROM unnest(%s::text[], %s::bigint[]) AS u(s, v)"
            " WHERE coalesce(pg_sequence_last_value(s::regclass), 0) < v",
            ([p.sequence for p in moving], [p.restart_at for p in moving]),
        )
