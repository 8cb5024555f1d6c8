"""Rows of a self-referencing table (folders, comment threads, sub-tasks) in an order its foreign key accepts.

A NOT DEFERRABLE foreign key is checked at the end of each statement, so one batch may hold a child
and its parent in any order, but a child must never be in an earlier batch than its parent,
whatever the keys (children have smaller keys than their parents as well as larger). `order_rows`
numbers the tenant's rows parents first: the depth of each row is its longest path from a root
(a row referencing no other row of the tenant), computed by a recursive query over every foreign
key of the table into itself; `seq` runs by (depth, row key). Rows that no root reaches (a cycle
made by updates, and everything hanging below one) get no depth and come last, all in one batch,
where the end-of-statement check accepts them together.

Why the copy is exact: the order and every batch are read in one REPEATABLE READ snapshot of the
source, so the rows a batch copies see exactly the parents the order was computed from, all of
them in earlier batches or the same one. Everything committed after that snapshot is captured (the
guard is installed before the copy starts; offline, the tenant is fenced and nothing changes), so
catch-up replays it. Why it is resumable: a batch and its cursor commit together on the target,
but a new session (a retry, a resume after kill -9) cannot see the old snapshot, and re-parenting
meanwhile may have moved any row to another depth. So it computes the order afresh and goes through
all of it again, inserting with ON CONFLICT DO NOTHING on the row key: rows copied before stay as
they were (any later change of theirs is captured), the missing ones are added parents first.

Deletes (cleanup, abort) use the same order backwards: the rows no root reaches in one statement
(only rows of their own group reference them), then by descending depth, children before parents.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
from psycopg import sql

from migrator.catalog import Cohort
from migrator.stamps.discovery import Table, tenant_filter

ORDER = sql.Identifier("migrator_tree_order")


def _columns(table: Table) -> tuple[str, ...]:
    """The row key, then every column a self-reference matches on either side, once each."""
    wanted = [*table.primary_key]
    for fk in table.self_references:
        wanted += [*fk.parent_columns, *fk.columns]
    return tuple(dict.fromkeys(wanted))


def _same(table: Table, a: str, b: str) -> sql.Composed:
    return sql.SQL(" AND ").join(
        sql.SQL("{}.{} = {}.{}").format(sql.Identifier(a), sql.Identifier(c), sql.Identifier(b), sql.Identifier(c))
        for c in table.primary_key
    )


def _refers(table: Table, child: str, parent: str) -> sql.Composed:
    """`child` references `parent` through some self-reference, and is another row."""
    each = sql.SQL(" OR ").join(
        sql.SQL("({})").format(
            sql.SQL(" AND ").join(
                sql.SQL("{}.{} = {}.{}").format(
                    sql.Identifier(child), sql.Identifier(c), sql.Identifier(parent), sql.Identifier(p)
                )
                for c, p in zip(fk.columns, fk.parent_columns, strict=True)
            )
        )
        for fk in table.self_references
    )
    return sql.SQL("({}) AND NOT ({})").format(each, _same(table, child, parent))


def order_rows(conn: psycopg.Connection[Any], table: Table, tenants: Cohort) -> tuple[int, int]:
    """Number the tenant's rows parents first in a temporary table ORDER (in the caller's transaction).

    Returns (rows with a depth, all rows); the rows past the first count have none and go last.
    """
    cols = sql.SQL(", ").join(map(sql.Identifier, _columns(table)))
    pk = table.pk_cols()
    conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(ORDER))
    conn.execute(
        sql.SQL(
            "CREATE TEMPORARY TABLE {o} AS"
            " SELECT {cols}, NULL::integer AS depth, NULL::bigint AS seq FROM {t} WHERE {f}"
        ).format(o=ORDER, cols=cols, t=table.ident, f=tenant_filter(table, tenants))
    )
    conn.execute(sql.SQL("CREATE INDEX ON {} ({})").format(ORDER, pk))
    for fk in table.self_references:
        conn.execute(
            sql.SQL("CREATE INDEX ON {} ({})").format(ORDER, sql.SQL(", ").join(map(sql.Identifier, fk.columns)))
        )
    conn.execute(sql.SQL("ANALYZE {}").format(ORDER))
    row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(ORDER)).fetchone()
    total = int(row[0]) if row else 0
    walk_pk = sql.SQL(", ").join(sql.SQL("c.{}").format(sql.Identifier(c)) for c in table.primary_key)
    root_pk = sql.SQL(", ").join(sql.SQL("r.{}").format(sql.Identifier(c)) for c in table.primary_key)
    # UNION (not ALL) keeps one row per (row, depth); the cap ends walks around a cycle reachable from a root.
    conn.execute(
        sql.SQL(
            "WITH RECURSIVE walk AS ("
            " SELECT {root_pk}, 0 AS depth FROM {o} r WHERE NOT EXISTS (SELECT 1 FROM {o} p WHERE {r_p})"
            " UNION SELECT {walk_pk}, w.depth + 1 FROM walk w JOIN {o} p ON {w_p} JOIN {o} c ON {c_p}"
            " WHERE w.depth < %(cap)s)"
            " UPDATE {o} r SET depth = d.depth FROM (SELECT {pk}, max(depth) AS depth FROM walk GROUP BY {pk}) d"
            " WHERE {r_d}"
        ).format(
            o=ORDER,
            root_pk=root_pk,
            walk_pk=walk_pk,
            pk=pk,
            r_p=_refers(table, "r", "p"),
            w_p=_same(table, "w", "p"),
            c_p=_refers(table, "c", "p"),
            r_d=_same(table, "r", "d"),
        ),
        {"cap": total},
    )
    # A row keeps its depth only if every row it references has a smaller one (not so around a cycle).
    demote = sql.SQL(
        "UPDATE {o} c SET depth = NULL WHERE c.depth IS NOT NULL AND EXISTS"
        " (SELECT 1 FROM {o} p WHERE {c_p} AND (p.depth IS NULL OR p.depth >= c.depth))"
    ).format(o=ORDER, c_p=_refers(table, "c", "p"))
    while conn.execute(demote).rowcount:
        pass
    conn.execute(
        sql.SQL(
            "UPDATE {o} r SET seq = s.n FROM"
            " (SELECT {pk}, row_number() OVER (ORDER BY depth NULLS LAST, {pk}) AS n FROM {o}) s WHERE {r_s}"
        ).format(o=ORDER, pk=pk, r_s=_same(table, "r", "s"))
    )
    conn.execute(sql.SQL("CREATE INDEX ON {} (seq)").format(ORDER))
    row = conn.execute(sql.SQL("SELECT count(depth) FROM {}").format(ORDER)).fetchone()
    return (int(row[0]) if row else 0), total


def batches(ordered: int, total: int, batch_rows: int) -> Iterator[tuple[int, int]]:
    """Ranges (after, upto] of `seq`, parents first: rows with a depth in batches, the rest in one."""
    after = 0
    while after < ordered:
        upto = min(after + batch_rows, ordered)
        yield after, upto
        after = upto
    if total > ordered:
        yield ordered, total


def rows_between(table: Table, tenants: Cohort, after: int, upto: int) -> sql.Composed:
    """SELECT of the copy columns of the rows numbered (after, upto], by one key probe each, in order."""
    return sql.SQL(
        "SELECT x.* FROM {o} o CROSS JOIN LATERAL (SELECT {cols} FROM {t} WHERE {match} AND {f} LIMIT 1) x"
        " WHERE o.seq > {a} AND o.seq <= {u} ORDER BY o.seq"
    ).format(
        o=ORDER,
        cols=table.cols(),
        t=table.ident,
        match=_matches(table, "o"),
        f=tenant_filter(table, tenants),
        a=sql.Literal(after),
        u=sql.Literal(upto),
    )


def numbered(table: Table, after: int, upto: int) -> sql.Composed:
    """A WHERE condition: the rows numbered (after, upto] by `order_rows` (a batch's, for its checksum)."""
    return sql.SQL("EXISTS (SELECT 1 FROM {o} o WHERE o.seq > {a} AND o.seq <= {u} AND {match})").format(
        o=ORDER, a=sql.Literal(after), u=sql.Literal(upto), match=_matches(table, "o")
    )


def staged_in(table: Table, stage: sql.Identifier) -> sql.Composed:
    """A WHERE condition: rows whose key is in a staging table of the batch (see `copy`)."""
    return sql.SQL("EXISTS (SELECT 1 FROM {} s WHERE {})").format(stage, _matches(table, "s"))


def _matches(table: Table, alias: str) -> sql.Composed:
    """The table's row has the key of `alias`'s row."""
    return sql.SQL(" AND ").join(
        sql.SQL("{t}.{c} = {a}.{c}").format(t=table.ident, a=sql.Identifier(alias), c=sql.Identifier(c))
        for c in table.primary_key
    )


def delete_between(table: Table, tenants: Cohort, after: int, upto: int) -> sql.Composed:
    """DELETE of the tenant's rows numbered (after, upto]."""
    match = _matches(table, "o")
    return sql.SQL("DELETE FROM {t} USING {o} o WHERE {match} AND {f} AND o.seq > {a} AND o.seq <= {u}").format(
        t=table.ident,
        o=ORDER,
        match=match,
        f=tenant_filter(table, tenants, table.ident),
        a=sql.Literal(after),
        u=sql.Literal(upto),
    )
