"""Catch-up: replay the changes captured on the source onto the target, by primary key.

The guard trigger (see `fence`) logs the keys of every row the moving tenant writes to
`_migrator.changes`. Replay never trusts logged values: it re-reads the current source row of
each key and upserts it on the target, or deletes it there when it is gone. Replaying a key twice
is harmless, which is what makes catch-up safe to interrupt and resume.

Rows travel by binary COPY into a staging table, so values stay byte-exact. A batch holds whole
source transactions (a cascaded delete is never split from its parent) read in one snapshot;
upserts run parents first and deletes children first, so the target's foreign keys hold. Each
table's upserts are one statement, and so are its deletes: a NOT DEFERRABLE foreign key is checked
at the end of the statement, so rows of a self-referencing table may reference each other in any
order within a batch; where tables form a (DEFERRABLE) cycle, the batch defers its constraints.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from migrator.catalog import Cohort
from migrator.db import dsn as dsnlib
from migrator.db.retry import STAMP_STEP
from migrator.errors import MigratorError
from migrator.move import fence, follow
from migrator.move.keys import by_key, copy_rows, keep_stage, key_set
from migrator.stamps.access import SCHEMA, ThreadSessions, connect_dsn
from migrator.stamps.discovery import Layout, Table
from migrator.stamps.paths import Hop, parent_missing, qualified

UNPROVEN = sql.Identifier("migrator_unproven_keys")


@dataclass(frozen=True)
class Applied:
    changes: int
    upserted: int
    deleted: int


def backlog(src: psycopg.Connection[Any], move_id: int) -> int:
    """Captured changes of the move not yet replayed."""
    row = src.execute(
        sql.SQL("SELECT count(*) FROM {}.changes WHERE move_id = %s AND NOT applied").format(sql.Identifier(SCHEMA)),
        (move_id,),
    ).fetchone()
    return int(row[0]) if row else 0


def expand(src: psycopg.Connection[Any], layout: Layout, move_id: int) -> int:
    """Log, as changes of the same source transaction, the path rows of rows whose tenant changed.

    An update that moves an invoice to another tenant (or a line to another tenant's invoice) moves
    its path rows with it, though no trigger of theirs fired, and so does a delete of a parent under
    a declared reference (nothing cascades: its children belong to no tenant from then on). The guard
    marks such changes `moved` (every delete, and updates that change the row's tenant), and here
    their children's keys are added to the log, down every path (a child of a moved row moved too).
    Everything that reads the log (replay, verify, the freeze's proof) then sees them as captured.
    Runs in the caller's transaction; returns how many keys it added. Where no table has a path
    there is nothing to add, and no statement is sent (every replay round and proof runs this).
    """
    if not any(t.paths for t in layout.tables):
        return 0
    schema, added = sql.Identifier(SCHEMA), 0
    while moved := src.execute(
        sql.SQL(
            "UPDATE {}.changes SET expanded = true WHERE move_id = %s AND moved AND NOT expanded"
            " RETURNING xid::text, table_name, pk"
        ).format(schema),
        (move_id,),
    ).fetchall():
        found: list[tuple[str, str, list[str]]] = []
        for table in layout.tables:
            xids = {tuple(pk): xid for xid, name, pk in moved if layout.owner_of(name) == table.name}
            for child, hop in (
                (t, p.hops[0]) for t in layout.tables for p in t.paths if p.hops[0].parent == table.name
            ):
                for key, parent_key in _children(src, child, hop, table, [list(k) for k in xids]):
                    found.append((xids[tuple(parent_key)], child.name, key))
        if found:
            src.cursor().executemany(
                sql.SQL(
                    "INSERT INTO {}.changes (move_id, xid, table_name, pk, moved) VALUES (%s, %s::xid8, %s, %s, true)"
                ).format(schema),
                [(move_id, xid, name, key) for xid, name, key in found],
            )
        added += len(found)
    return added


def _as_logged(alias: str, column: str) -> sql.Composed:
    """A key column's text as the guard logs it (`to_jsonb(NEW) ->> column`), so keys match the log's."""
    return sql.SQL("to_jsonb({}.{}) #>> '{{}}'").format(sql.Identifier(alias), sql.Identifier(column))


def _children(
    conn: psycopg.Connection[Any], child: Table, hop: Hop, parent: Table, parent_keys: list[list[str]]
) -> list[tuple[list[str], list[str]]]:
    """(child key, parent key) of `child`'s rows that reference, through `hop`, the `parent` rows of these keys.

    Where the hop references the parent's row key, the children are matched on it directly, so the
    children of a deleted parent are found too (under a declared reference nothing deletes them);
    otherwise through the parent row, which an update leaves in place.
    """
    rows = Jsonb([dict(zip(parent.primary_key, key, strict=True)) for key in parent_keys])
    keys = sql.SQL("SELECT {} FROM jsonb_populate_recordset(NULL::{}, %s)").format(parent.pk_cols(), parent.ident)
    child_key = sql.SQL(", ").join(_as_logged("c", c) for c in child.primary_key)
    cols = qualified("c", hop.columns)
    if tuple(hop.parent_columns) == parent.primary_key:
        query = sql.SQL("SELECT ARRAY[{}], ARRAY[{}] FROM {} c WHERE ({}) IN ({})").format(
            child_key, sql.SQL(", ").join(_as_logged("c", c) for c in hop.columns), child.ident, cols, keys
        )
    else:
        query = sql.SQL("SELECT ARRAY[{}], ARRAY[{}] FROM {} c JOIN {} p ON ({}) = ({}) WHERE ({}) IN ({})").format(
            child_key,
            sql.SQL(", ").join(_as_logged("p", c) for c in parent.primary_key),
            child.ident,
            parent.ident,
            cols,
            qualified("p", hop.parent_columns),
            qualified("p", parent.primary_key),
            keys,
        )
    return [(list(c), list(p)) for c, p in conn.execute(query, (rows,)).fetchall()]


def captured_keys(
    src: psycopg.Connection[Any], layout: Layout, move_id: int, unverified_only: bool = False
) -> dict[str, list[list[str]]]:
    """Distinct keys the move captured so far (applied or not), by tenant table name (a partition's
    changes under its partitioned table's name), the path rows of rows whose tenant changed
    included (`expand`, in the caller's transaction).

    With unverified_only, only keys with a change not yet proven equal before the freeze.
    """
    expand(src, layout, move_id)
    keys: dict[str, list[list[str]]] = defaultdict(list)
    unverified = sql.SQL(" AND NOT verified" if unverified_only else "")  # served by the changes_unverified index
    for table_name, pk in src.execute(
        sql.SQL("SELECT DISTINCT table_name, pk FROM {}.changes WHERE move_id = %s{}").format(
            sql.Identifier(SCHEMA), unverified
        ),
        (move_id,),
    ):
        keys[layout.owner_of(table_name)].append(list(pk))
    return dict(keys)


def vacuum_changes(source_dsn: str) -> None:
    """Vacuum the change log before a freeze, outside it.

    Replaying and verifying flag changes with UPDATEs; their dead index entries would otherwise be
    walked by every query of the freeze while autovacuum lags behind a busy tenant. Without
    truncation: giving the table's empty tail back takes an ACCESS EXCLUSIVE lock, which the
    writers' captured inserts hold off (VACUUM waited up to 5 s for it) or are blocked by. And
    SKIP_LOCKED: the change log is shared by the source's moves, and another move's vacuum already
    serves this one (they queued behind each other, three cohorts' cutovers 15 s apart).
    """
    with connect_dsn(source_dsn, "the source", autocommit=True) as src:
        src.execute(sql.SQL("VACUUM (ANALYZE, SKIP_LOCKED, TRUNCATE false) {}.changes").format(sql.Identifier(SCHEMA)))


def _begin_batch(
    src: psycopg.Connection[Any], layout: Layout, move_id: int, limit: int
) -> list[tuple[int, str, list[str]]]:
    """On an idle source session, open a REPEATABLE READ transaction and read in it the oldest
    unapplied changes, extended to whole source transactions (after `expand`): one round trip
    where no table has a path."""
    with src.pipeline():  # psycopg sends the BEGIN in the same round trip
        src.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        expand(src, layout, move_id)
        taken = src.execute(
            sql.SQL(
                "WITH head AS (SELECT xid FROM {s}.changes WHERE move_id = %(m)s AND NOT applied ORDER BY id"
                " LIMIT %(n)s) SELECT id, table_name, pk FROM {s}.changes WHERE move_id = %(m)s AND NOT applied"
                " AND xid IN (SELECT xid FROM head) ORDER BY id"
            ).format(s=sql.Identifier(SCHEMA)),
            {"m": move_id, "n": limit},
        )
    return taken.fetchall()


def mark_verified(
    src: psycopg.Connection[Any], layout: Layout, move_id: int, unproven: dict[str, list[list[str]]]
) -> None:
    """Mark the changes visible to the caller's snapshot as proven, except those of `unproven` keys.

    Runs in the snapshot the proof was made in, so a change committed later stays unproven and its
    key is verified again in the freeze.
    """
    src.execute(sql.SQL("CREATE TEMPORARY TABLE IF NOT EXISTS {} (t text, k text[]) ON COMMIT DROP").format(UNPROVEN))
    src.execute(sql.SQL("TRUNCATE {}").format(UNPROVEN))
    with src.cursor().copy(sql.SQL("COPY {} (t, k) FROM STDIN").format(UNPROVEN)) as copy:
        for table_name, keys in unproven.items():
            partitions = next((t.partitions for t in layout.tables if t.name == table_name), ())
            for name in (table_name, *partitions):  # the names its changes may be logged under
                for key in keys:
                    copy.write_row((name, key))
    src.execute(
        sql.SQL(
            "UPDATE {s}.changes c SET verified = true WHERE move_id = %s AND NOT verified"
            " AND NOT EXISTS (SELECT 1 FROM {raw} u WHERE u.t = c.table_name AND u.k = c.pk)"
        ).format(s=sql.Identifier(SCHEMA), raw=UNPROVEN),
        (move_id,),
    )


def _upsert(table: Table, stage: sql.Identifier) -> sql.Composed:
    """The statement writing a table's staged rows over the target's (inserted, or updated by key)."""
    identity = {c.name for c in table.columns if c.identity}
    updatable = [c for c in table.copy_columns if c not in table.primary_key and c not in identity]
    action = (
        sql.SQL("DO UPDATE SET {}").format(
            sql.SQL(", ").join(sql.SQL("{c} = EXCLUDED.{c}").format(c=sql.Identifier(c)) for c in updatable)
        )
        if updatable
        else sql.SQL("DO NOTHING")
    )
    return sql.SQL("INSERT INTO {} ({}) OVERRIDING SYSTEM VALUE SELECT {} FROM {} ON CONFLICT ({}) {}").format(
        table.ident, table.cols(), table.cols(), stage, table.pk_cols(), action
    )


def _gone(table: Table, tenants: Cohort, keys: sql.Composable, stage: sql.Identifier) -> list[sql.Composed]:
    """Statements deleting keyed rows of the tenant that no longer exist on the source (found by key,
    deleted by ctid).

    A ctid names a row within one relation only: in a partitioned table the same ctid exists in
    every partition, so there the row is named by its partition (tableoid) and ctid together.
    A path table's row of a captured key whose parent is missing on the target is no tenant's
    there, yet the copy wrote it (as replica, before catch-up brought its parent, which was then
    deleted on the source): it goes too, first.
    """
    staged = sql.SQL(" AND ").join(sql.SQL("s.{c} = k.{c}").format(c=sql.Identifier(c)) for c in table.primary_key)
    gone = sql.SQL("WHERE NOT EXISTS (SELECT 1 FROM {} s WHERE {})").format(stage, staged)
    statements = []
    if table.paths:
        match = sql.SQL(" AND ").join(sql.SQL("t.{c} = k.{c}").format(c=sql.Identifier(c)) for c in table.primary_key)
        statements.append(
            sql.SQL(
                "DELETE FROM {t} t USING {k} k WHERE {match} AND {orphan} AND NOT EXISTS"
                " (SELECT 1 FROM {s} s WHERE {staged})"
            ).format(
                t=table.ident,
                k=keys,
                match=match,
                orphan=parent_missing(table.paths, sql.Identifier("t")),
                s=stage,
                staged=staged,
            )
        )
    if table.partitions:
        rows = by_key(table, keys, tenants, sql.SQL("tableoid AS rel, ctid AS tid"))
        statements.append(
            sql.SQL(
                "DELETE FROM {} d USING (SELECT x.rel, x.tid FROM {} {}) g WHERE d.tableoid = g.rel AND d.ctid = g.tid"
            ).format(table.ident, rows, gone)
        )
    else:
        statements.append(
            sql.SQL("DELETE FROM {} WHERE ctid = ANY (ARRAY(SELECT x.ctid FROM {} {}))").format(
                table.ident, by_key(table, keys, tenants, sql.SQL("ctid")), gone
            )
        )
    return statements


@dataclass(frozen=True)
class Replay:
    """A move's replay of its captured changes over two open sessions, at most `batch` changes a
    round: the source's, which reads them, and the target's, which writes them (as copies)."""

    src: psycopg.Connection[Any]
    tgt: psycopg.Connection[Any]
    layout: Layout
    tenants: Cohort
    move_id: int
    batch: int

    def once(self) -> Applied:
        """Replay one round over idle sessions; commits on both."""
        try:
            changes, upserted, deleted = self._open()
            self._commit(changes)
        except BaseException:
            _roll_back(self.tgt, self.src)
            raise
        return Applied(len(changes), upserted, deleted)

    def drain(self) -> int:
        """Replay until nothing is pending (used while fenced, when nothing new can arrive), leaving
        the last round's transactions open: the caller proves the captured keys in them and commits
        both (the target first), so that no commit or mark of the drain's is spent inside the freeze.
        On failure the caller rolls them back; a round replayed again later is harmless.

        A round of fewer than `batch` changes took every one pending (in its snapshot, after
        `expand`), so no round is spent finding the log empty. Should one be missed after all, the
        freeze's proof of the captured keys finds its row unequal and the route is not flipped.
        """
        total = 0
        while True:
            changes, _, _ = self._open()
            total += len(changes)
            if len(changes) < self.batch:
                return total
            self._commit(changes)

    def _open(self) -> tuple[list[int], int, int]:
        """Replay one round, leaving both transactions open: the source's snapshot that read it and
        the target's that wrote it. Returns its change ids, and how many rows were upserted and deleted."""
        taken = _begin_batch(self.src, self.layout, self.move_id, self.batch)
        if not taken:
            return [], 0, 0
        keys: dict[str, list[list[str]]] = defaultdict(list)
        for _, table_name, pk in taken:
            keys[self.layout.owner_of(table_name)].append(list(pk))
        upserted, deleted = self._apply_keys(keys)
        return [change_id for change_id, _, _ in taken], upserted, deleted

    def _commit(self, changes: list[int]) -> None:
        """Commit a replayed round, the target first, then mark its changes applied. A crash before
        the mark only causes a harmless second replay."""
        self.tgt.commit()
        self.src.commit()
        if changes:
            with self.src.pipeline(), self.src.transaction():  # one round trip
                self.src.execute(
                    sql.SQL("UPDATE {}.changes SET applied = true WHERE id = ANY(%s)").format(sql.Identifier(SCHEMA)),
                    (changes,),
                )

    def _apply_keys(self, keys: dict[str, list[list[str]]]) -> tuple[int, int]:
        """Make the target's rows of these keys equal to the source's, inside both open transactions
        (the target's its own: its stages are empty at its start); returns (upserted, deleted).

        Inside the freeze each round trip waits for a busy CPU, so the stages are made ready in one,
        each table's rows take a COPY, and the upserts (parents first) and deletes (children first) go
        in one, but for a table that follows rows of another: those are inserted after the upserts
        before it, as they may reference them.
        """
        src, tgt, layout, tenants = self.src, self.tgt, self.layout, self.tenants
        tables = [(i, t) for i, t in enumerate(layout.tables) if keys.get(t.name)]
        found = {t.name: key_set(t, keys[t.name]) for _, t in tables}
        stages = {t.name: sql.Identifier(f"migrator_stage_{i}") for i, t in tables}  # one name per table: kept
        with tgt.pipeline():
            if any(t.cycle for t in layout.tables):  # a cycle's rows may reference each other in any order
                tgt.execute("SET CONSTRAINTS ALL DEFERRED")
            for _, table in tables:
                keep_stage(tgt, table, stages[table.name])
        upserted = 0
        upserts: list[Table] = []  # staged, not yet upserted
        for _, table in tables:
            select = sql.SQL("SELECT x.* FROM {}").format(by_key(table, found[table.name], tenants, table.cols()))
            copy_rows(src, tgt, table, select, stages[table.name])
            if table.follows:  # a user added during the move follows its membership
                upserted += _apply(tgt, upserts, [], stages)[0]
                upserts = []
                for fk, followed in table.follows:
                    values = follow.of_keys(table, fk, tenants, found[table.name])
                    follow.copy_missing(src, tgt, followed, [follow.referenced(table, fk, followed, values)])
            upserts.append(table)
        deletes = [s for _, t in reversed(tables) for s in _gone(t, tenants, found[t.name], stages[t.name])]
        more, deleted = _apply(tgt, upserts, deletes, stages)
        return upserted + more, deleted


def _apply(
    tgt: psycopg.Connection[Any], upserts: list[Table], deletes: list[sql.Composed], stages: dict[str, sql.Identifier]
) -> tuple[int, int]:
    """Upsert these tables' staged rows, then run the deletes, all in one round trip; returns how
    many rows each part wrote. A foreign key an upsert violates is named with its table's changes
    (the caller's transaction rolls back)."""
    cursors: list[psycopg.Cursor[Any]] = []
    try:
        with tgt.pipeline():
            cursors += [tgt.execute(_upsert(t, stages[t.name])) for t in upserts]
            cursors += [tgt.execute(statement) for statement in deletes]
    except psycopg.errors.ForeignKeyViolation as exc:
        failed = sum(1 for cur in cursors if cur.pgresult is not None)  # the statements before it have results
        if failed >= len(upserts):
            raise
        raise MigratorError(
            f"replaying the changes of {upserts[failed].label} on the target: {exc.diag.message_detail or ''} A row "
            "written during the move references a row that is not its tenant's (the target lacks it): fix that "
            "reference on the source, then resume the move, or abort it"
        ) from None
    rows = [max(cur.rowcount, 0) for cur in cursors]
    return sum(rows[: len(upserts)]), sum(rows[len(upserts) :])


def _roll_back(*conns: psycopg.Connection[Any]) -> None:
    """End the sessions' open transactions after a failure, where they can still be reached."""
    for conn in conns:
        if not conn.closed and conn.info.transaction_status != psycopg.pq.TransactionStatus.UNKNOWN:
            conn.rollback()


@dataclass(frozen=True)
class Goal:
    """Where catch-up stops: at most `backlog` changes pending (--cutover-backlog), or `deadline` (a
    `time.monotonic()` value) passed; it replays `batch` changes a round."""

    backlog: int
    deadline: float
    batch: int


class ReplaySessions:
    """A move's replay sessions, on its source and its target, kept for the whole run: a move catches
    up two or three times, and each catch-up opened both (tens of milliseconds a connect under load)
    and set the target's up again. A session found lost (a retried catch-up's) is opened afresh, one
    left in a transaction is rolled back (`ThreadSessions`); the replay's stages stay with the
    target's session (`keep_stage`)."""

    def __init__(self, source_dsn: str, target_dsn: str) -> None:
        self._sources = ThreadSessions(source_dsn, "the source")
        self._targets = ThreadSessions(target_dsn, "the target", setup=_replays_here)

    def pair(self) -> tuple[psycopg.Connection[Any], psycopg.Connection[Any]]:
        """The source's and the target's session, idle, the target's writing as copies past a fence."""
        return self._sources.session(autocommit=False), self._targets.session(autocommit=False)

    def close(self) -> None:
        self._sources.close()
        self._targets.close()


def _replays_here(tgt: psycopg.Connection[Any]) -> None:
    """A target session's setup for replays."""
    dsnlib.write_as_copies(tgt)  # replayed rows are copies: the target's triggers do not fire
    fence.bypass_for_replay(tgt)  # a revert's target is fenced until its flip


@STAMP_STEP.wraps
def catch_up(
    sessions: ReplaySessions,
    layout: Layout,
    tenants: Cohort,
    move_id: int,
    goal: Goal,
    observe: Callable[[int], None] = lambda pending: None,
) -> int:
    """Replay until the `goal` is reached; returns the backlog left, which the caller judges.
    `observe` sees each round's backlog.

    The sessions stay open across batches and catch-ups; a transient error reconnects and goes on
    (replay is idempotent) towards the same deadline, which the caller fixed before the first attempt.
    """
    src, tgt = sessions.pair()
    replay = Replay(src, tgt, layout, tenants, move_id, goal.batch)
    while True:
        pending = backlog(src, move_id)
        src.commit()
        observe(pending)
        if pending <= goal.backlog or time.monotonic() > goal.deadline:
            return pending
        replay.once()
