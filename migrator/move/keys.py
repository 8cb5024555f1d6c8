"""Rows by primary key: key relations (temporary key tables, or key sets written into a statement)
and the SQL that reaches a tenant's rows through them.

Catch-up (`capture`) replays captured keys, the freeze (`cutover`) re-verifies them and `verify`
hashes them; all three select the rows the same way, from here. `copy_rows` carries selected
source rows into a staging table on the target, byte-exact by binary COPY: one `keep_stage` keeps
for the session (a replay's, every round), one `new_stage` makes for a transaction (the copy's
batches, followed rows).
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from migrator.catalog import Cohort
from migrator.stamps.discovery import Table, tenant_filter


def keys_table(index: int) -> sql.Identifier:
    """The temporary key table of the layout's `index`-th table (one name per table of a transaction)."""
    return sql.Identifier(f"migrator_keys_{index}")


def load_keys(conn: psycopg.Connection[Any], table: Table, keys: list[list[str]], name: sql.Identifier) -> None:
    """A temporary table `name`, typed like the table's key, holding the given text keys.

    Keys are logged in their text form; jsonb_populate_recordset parses them back with each type's
    own input function, so every key type (bigint, uuid, text, timestamptz...) round-trips. The
    three statements go in one pipeline (one round trip: this runs inside the cutover's freeze).
    Lives until the caller's transaction ends.
    """
    rows = Jsonb([dict(zip(table.primary_key, key, strict=True)) for key in keys])
    with conn.pipeline():
        conn.execute(
            sql.SQL("CREATE TEMPORARY TABLE {} ON COMMIT DROP AS SELECT {} FROM {} WITH NO DATA").format(
                name, table.pk_cols(), table.ident
            )
        )
        conn.execute(
            sql.SQL("INSERT INTO {keys} SELECT DISTINCT * FROM jsonb_populate_recordset(NULL::{keys}, %s)").format(
                keys=name
            ),
            (rows,),
        )
        conn.execute(sql.SQL("ANALYZE {}").format(name))  # real row counts, so the planner hashes the keys


def key_set(table: Table, keys: list[list[str]]) -> sql.Composed:
    """The given text keys as a relation typed like the table's key, written into the statement itself.

    For the few keys of a replay or of the freeze's proof: a temporary table (`load_keys`) costs its
    creation, ANALYZE and drop in the catalog, 2 to 5 ms each, about 30 ms of a freeze that drains
    and proves three tables on two sides; this costs nothing but the parse. Keys parse back as in
    `load_keys`. The planner guesses 100 rows, which `by_key`'s index probe per key does not mind;
    a large set compared against a whole tenant (an anti-join) wants `load_keys`' real counts.
    """
    rows = Jsonb([dict(zip(table.primary_key, key, strict=True)) for key in keys])
    return sql.SQL("(SELECT DISTINCT {} FROM jsonb_populate_recordset(NULL::{}, {}))").format(
        table.pk_cols(), table.ident, sql.Literal(rows)
    )


def by_key(table: Table, keys: sql.Composable, tenants: Cohort, select: sql.Composable) -> sql.Composed:
    """A FROM clause: `select` over the tenant's row of each key in a key relation (a temporary key
    table, or a `key_set`), as `x`.

    One index probe per key (LATERAL ... LIMIT 1; a key names at most one row), never a plain join:
    given a few thousand keys the planner hashes them against a scan of the whole tenant, which in
    the cutover's freeze costs time in proportion to the tenant's size rather than to its changes.
    """
    match = sql.SQL(" AND ").join(sql.SQL("t.{c} = k.{c}").format(c=sql.Identifier(c)) for c in table.primary_key)
    return sql.SQL("{} k CROSS JOIN LATERAL (SELECT {} FROM {} t WHERE {} AND {} LIMIT 1) x").format(
        keys, select, table.ident, match, tenant_filter(table, tenants, sql.Identifier("t"))
    )


def outside_keys(table: Table, keys: sql.Identifier) -> sql.Composed:
    """Rows whose key is not in a temporary key table such as capture's (an anti-join over the tenant)."""
    match = sql.SQL(" AND ").join(
        sql.SQL("k.{} = {}").format(sql.Identifier(c), sql.Identifier(table.schema, table.name, c))
        for c in table.primary_key
    )
    return sql.SQL("NOT EXISTS (SELECT 1 FROM {} k WHERE {})").format(keys, match)


def key_quantiles(conn: psycopg.Connection[Any], table: Table, rows: sql.Composable, step: int) -> list[list[str]]:
    """Every `step`-th key, in key order, of the rows matching `rows` (a WHERE condition): the bounds
    that cut them into ranges of exactly `step` rows (verify's narrowing of a small differing range)."""
    query = sql.SQL(
        "SELECT k FROM (SELECT ARRAY[{}] AS k, row_number() OVER (ORDER BY {}) AS n FROM {} WHERE {}) s"
        " WHERE n %% %s = 0 ORDER BY n"
    ).format(table.pk_text(), table.pk_cols(), table.ident, rows)
    return [list(r[0]) for r in conn.execute(query, (step,)).fetchall()]


SAMPLE_PAGES = 2_000  # pages a sample for range bounds reads at most, whatever the table's size


def _sample(conn: psycopg.Connection[Any], table: Table) -> sql.Composed:
    """TABLESAMPLE of at most SAMPLE_PAGES pages of the table, the same pages on every call (REPEATABLE)."""
    row = conn.execute(
        "SELECT pg_relation_size(c.oid) / current_setting('block_size')::bigint FROM pg_class c"
        " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relname = %s",
        (table.schema, table.name),
    ).fetchone()
    fraction = min(1.0, SAMPLE_PAGES / max(1, int(row[0]) if row else 1))
    return sql.SQL("{} TABLESAMPLE SYSTEM ({}) REPEATABLE (0)").format(table.ident, sql.Literal(100 * fraction))


def range_bounds(conn: psycopg.Connection[Any], table: Table, tenants: Cohort, pieces: int) -> list[list[str]]:
    """Up to `pieces - 1` keys cutting the tenant's rows into ranges of about even size, picked in
    the database from a sample of the table's pages. Exact quantiles (`key_quantiles`) cost more
    than checksumming the rows (0.71 s against 0.48 s on 1.4M rows); the sample costs 0.14 s there,
    and any bounds cut the rows exactly, only less evenly."""
    if pieces < 2:
        return []
    query = sql.SQL(
        "SELECT k FROM (SELECT ARRAY[{}] AS k, row_number() OVER (ORDER BY {}) AS n, count(*) OVER () AS c"
        " FROM {} WHERE {}) s WHERE n < c AND (n * %(p)s) / c <> ((n - 1) * %(p)s) / c ORDER BY n"
    ).format(table.pk_text(), table.pk_cols(), _sample(conn, table), tenant_filter(table, tenants))
    return [list(r[0]) for r in conn.execute(query, {"p": pieces}).fetchall()]


def keep_stage(tgt: psycopg.Connection[Any], table: Table, stage: sql.Identifier) -> None:
    """A temporary table `stage` on the target, empty, for `copy_rows`: unlike `new_stage`'s, kept
    for the session and emptied at every commit (ON COMMIT DELETE ROWS) and here, so that a replay,
    which stages each table in every round, does not create and drop it each time (2 to 5 ms a
    round of the freeze's drain). Only a name that always stages the same table in a session may
    be kept. Two statements the caller may pipeline."""
    tgt.execute(
        sql.SQL(
            "CREATE TEMPORARY TABLE IF NOT EXISTS {} ON COMMIT DELETE ROWS AS SELECT {} FROM {} WITH NO DATA"
        ).format(stage, table.cols(), table.ident)
    )
    tgt.execute(sql.SQL("DELETE FROM {}").format(stage))


def new_stage(tgt: psycopg.Connection[Any], table: Table, stage: sql.Identifier) -> None:
    """A temporary table `stage` on the target for `copy_rows`, until its transaction ends."""
    tgt.execute(
        sql.SQL("CREATE TEMPORARY TABLE {} ON COMMIT DROP AS SELECT {} FROM {} WITH NO DATA").format(
            stage, table.cols(), table.ident
        )
    )


def copy_rows(
    src: psycopg.Connection[Any],
    tgt: psycopg.Connection[Any],
    table: Table,
    select: sql.Composable,
    stage: sql.Identifier,
) -> int:
    """Append the rows `select` returns on the source to the target's table `stage`, byte-exact
    (binary COPY); returns how many."""
    out = sql.SQL("COPY ({}) TO STDOUT (FORMAT BINARY)").format(select)
    with src.cursor() as scur, tgt.cursor() as tcur:
        with (
            scur.copy(out) as reader,
            tcur.copy(sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(stage, table.cols())) as writer,
        ):
            for block in reader:
                writer.write(block)
        return max(tcur.rowcount, 0)
