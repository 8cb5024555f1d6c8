"""Foreign keys of a tenant's rows that the database did not check: proved by one anti-join each.

Where migrator's role may, its write sessions on the target run as `replica` (`dsn.write_as_copies`):
application triggers stay quiet, and so do foreign-key checks. Verify proves the tenant's rows equal
to the source's, which covers references between them; it cannot see a reference into a row that is
not the tenant's (reference data each stamp holds for itself, such as billing plans) or a parent
removed from the target while the copy ran. So before a route flips, every foreign key of the
tenant's rows on the target is proved to resolve there (`dangling`), and before the first write,
every reference into shared tables is proved to have its row on the target (`missing_shared`).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from queue import Empty, SimpleQueue
from typing import Any

import psycopg
from psycopg import sql

from migrator.catalog import Cohort
from migrator.stamps.access import connect_dsn
from migrator.stamps.discovery import ForeignKey, Layout, Table, tenant_filter, tenant_text

MAX_KEYS = 5  # keys named per problem


def shown_keys(keys: list[list[str]] | list[tuple[str, ...]]) -> str:
    """Keys as a problem names them: `(7, 12); (7, 13)`."""
    return "; ".join("(" + ", ".join(key) + ")" for key in keys)


def _referenced(fk: ForeignKey) -> sql.Composed:
    """The rows whose key `fk` is set: a NULL column leaves a foreign key unchecked (MATCH SIMPLE)."""
    return sql.SQL(" AND ").join(sql.SQL("c.{} IS NOT NULL").format(sql.Identifier(c)) for c in fk.columns)


def _match(fk: ForeignKey) -> sql.Composed:
    return sql.SQL(" AND ").join(
        sql.SQL("p.{} = c.{}").format(sql.Identifier(p), sql.Identifier(c))
        for c, p in zip(fk.columns, fk.parent_columns, strict=True)
    )


def unresolved(
    conn: psycopg.Connection[Any],
    table: Table,
    fk: ForeignKey,
    tenants: Cohort,
    parent: Table | None = None,
) -> list[list[str]]:
    """Keys (as text) of the tenant's rows of `table` whose foreign key `fk` finds no parent row, at most
    MAX_KEYS: no row at all, or (given the `parent` tenant table) no row of the child row's own tenant."""
    of_tenant = (
        sql.SQL(" AND {} = {}").format(
            tenant_text(parent, sql.Identifier("p")), tenant_text(table, sql.Identifier("c"))
        )
        if parent
        else sql.SQL("")
    )
    query = sql.SQL(
        "SELECT ARRAY[{key}] FROM {t} c WHERE {tenants} AND {set}"
        " AND NOT EXISTS (SELECT 1 FROM {p} p WHERE {match}{of_tenant}) LIMIT {n}"
    ).format(
        key=sql.SQL(", ").join(sql.SQL("c.{}::text").format(sql.Identifier(c)) for c in table.primary_key),
        t=table.ident,
        tenants=tenant_filter(table, tenants, sql.Identifier("c")),
        set=_referenced(fk),
        p=fk.parent_ident,
        match=_match(fk),
        of_tenant=of_tenant,
        n=sql.Literal(MAX_KEYS),
    )
    return [list(row[0]) for row in conn.execute(query).fetchall()]


def dangling(target_dsn: str, layout: Layout, tenants: Cohort, jobs: int = 1) -> list[str]:
    """On the target: the tenant's rows whose foreign keys find no parent row, one problem per key.

    One anti-join per foreign key, `jobs` at a time: each of the `jobs` sessions takes the next check
    until none is left, so a move opens `jobs` sessions here, not one per foreign key (a session costs
    more than most of these checks).
    """
    checks: SimpleQueue[tuple[int, Table, ForeignKey]] = SimpleQueue()
    count = 0
    for table in layout.tables:
        for fk in (*table.foreign_keys, *table.shared_keys):
            checks.put((count, table, fk))
            count += 1
    found: dict[int, str] = {}

    def session() -> None:
        with connect_dsn(target_dsn, "the target", autocommit=True) as conn:
            while True:
                try:
                    position, table, fk = checks.get_nowait()
                except Empty:
                    return
                keys = unresolved(conn, table, fk, tenants)
                if keys:
                    found[position] = (
                        f"rows {shown_keys(keys)} of {table.label} reference no row of {fk.parent_label} "
                        f"(foreign key {fk.name})"
                    )

    if not count:
        return []
    sessions = max(1, min(jobs, count))
    with ThreadPoolExecutor(max_workers=sessions, thread_name_prefix="references") as pool:
        for ended in [pool.submit(session) for _ in range(sessions)]:
            ended.result()
    return [found[position] for position in sorted(found)]


def missing_shared(
    src: psycopg.Connection[Any], tgt: psycopg.Connection[Any], layout: Layout, tenants: Cohort, target_name: str
) -> list[str]:
    """Before any write: values the tenant's rows reference in shared tables that the target lacks.

    The referenced values are read on the source (distinct, as text) and looked up on the target;
    without this, the copy would stop half-way on a foreign-key violation, or (as replica) leave
    references to nothing.
    """
    problems = []
    followed = {t.name for t in layout.followed}  # copied by the move where the target lacks them (`follow`)
    for table in layout.tables:
        for fk in (k for k in table.shared_keys if k.parent not in followed):
            cols = sql.SQL(", ").join(sql.SQL("c.{}::text").format(sql.Identifier(c)) for c in fk.columns)
            values = src.execute(
                sql.SQL("SELECT DISTINCT {cols} FROM {t} c WHERE {tenants} AND {set}").format(
                    cols=cols,
                    t=table.ident,
                    tenants=tenant_filter(table, tenants, sql.Identifier("c")),
                    set=_referenced(fk),
                )
            ).fetchall()
            if not values:
                continue
            columns = list(zip(*values, strict=True))
            names = [sql.Identifier(f"v{i}") for i in range(len(fk.columns))]
            query = sql.SQL(
                "SELECT {shown} FROM unnest({arrays}) AS c({names})"
                " WHERE NOT EXISTS (SELECT 1 FROM {p} p WHERE {match}) LIMIT {n}"
            ).format(
                shown=sql.SQL(", ").join(sql.SQL("c.{}").format(n) for n in names),
                arrays=sql.SQL(", ").join(sql.SQL("%s::text[]") for _ in names),
                names=sql.SQL(", ").join(names),
                p=fk.parent_ident,
                match=sql.SQL(" AND ").join(
                    sql.SQL("p.{}::text = c.{}").format(sql.Identifier(p), n)
                    for p, n in zip(fk.parent_columns, names, strict=True)
                ),
                n=sql.Literal(MAX_KEYS),
            )
            absent = tgt.execute(query, [list(column) for column in columns]).fetchall()
            if absent:
                problems.append(
                    f"rows of {table.label} reference {shown_keys(absent)} in {fk.parent_label} "
                    f"(foreign key {fk.name}), which target {target_name} does not hold: add those rows there first, "
                    f"or, if tenants share them (users of several organisations), add {fk.parent} to [tenancy] follow "
                    "so a move copies them"
                )
    return problems
