"""Shared rows that follow their tenants (`[tenancy] follow`): a `users` row linked to several
organisations through `memberships` is no organisation's, yet an organisation moved to a stamp that
lacks its users cannot work there.

A move copies the rows of followed tables that its tenants' rows reference and the target lacks
(before the bulk copy, and with every replayed batch, so a user added during the move follows
too), and preflight proves equal those the target already has: the same key holding another row is
refused, naming it, since one of the two stamps would then be wrong about that user. Cleanup never
deletes them (they are not the tenant's); `moved.prove` refuses a cleanup that would leave one of
them referencing a deleted row.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql

from migrator.catalog import Cohort
from migrator.move.integrity import MAX_KEYS, shown_keys
from migrator.move.keys import by_key, copy_rows, load_keys, new_stage
from migrator.stamps.discovery import ForeignKey, Layout, Table, tenant_filter
from migrator.stamps.paths import qualified


def references(layout: Layout) -> list[tuple[Table, ForeignKey, Table]]:
    """(tenant table, its foreign key, followed table) for every key into a followed table."""
    return [(t, fk, followed) for t in layout.tables for fk, followed in t.follows]


def copy_for_batch(
    src: psycopg.Connection[Any], tgt: psycopg.Connection[Any], table: Table, batch: sql.Composable
) -> int:
    """The followed rows that a copy batch (a SELECT of `table`'s copy columns on the source) references and
    the target lacks: rows referenced since the copy of followed rows began (a user added meanwhile)."""
    copied = 0
    for fk, followed in table.follows:
        values = sql.SQL("SELECT {} FROM ({}) b").format(qualified("b", fk.columns), batch)
        copied += copy_missing(src, tgt, followed, [referenced(table, fk, followed, values)])
    return copied


def referenced(table: Table, fk: ForeignKey, followed: Table, values: sql.Composable) -> sql.Composed:
    """The followed table's rows whose key `fk` matches a row of `values` (a subquery of fk's columns)."""
    return sql.SQL("SELECT {} FROM {} f WHERE ({}) IN ({})").format(
        qualified("f", followed.copy_columns), followed.ident, qualified("f", fk.parent_columns), values
    )


def of_tenants(table: Table, fk: ForeignKey, tenants: Cohort) -> sql.Composed:
    """fk's values in the tenants' rows of `table`."""
    return sql.SQL("SELECT {} FROM {} c WHERE {}").format(
        qualified("c", fk.columns), table.ident, tenant_filter(table, tenants, sql.Identifier("c"))
    )


def of_keys(table: Table, fk: ForeignKey, tenants: Cohort, keys: sql.Composable) -> sql.Composed:
    """fk's values in the tenants' rows of `table` whose keys are in `keys` (a replayed batch's `key_set`)."""
    select = sql.SQL(", ").join(sql.Identifier(c) for c in fk.columns)
    return sql.SQL("SELECT {} FROM {}").format(qualified("x", fk.columns), by_key(table, keys, tenants, select))


def copy_missing(
    src: psycopg.Connection[Any], tgt: psycopg.Connection[Any], followed: Table, selects: list[sql.Composable]
) -> int:
    """Insert on the target, inside both open transactions, the followed rows `selects` return on the
    source that the target lacks (by primary key); returns how many."""
    stage = sql.Identifier(f"migrator_follow_{followed.name}"[:63])
    union = sql.SQL(" UNION ").join(selects)
    new_stage(tgt, followed, stage)
    copy_rows(src, tgt, followed, union, stage)
    inserted = tgt.execute(
        sql.SQL("INSERT INTO {} ({}) OVERRIDING SYSTEM VALUE SELECT {} FROM {} ON CONFLICT ({}) DO NOTHING").format(
            followed.ident, followed.cols(), followed.cols(), stage, followed.pk_cols()
        )
    ).rowcount
    tgt.execute(sql.SQL("DROP TABLE {}").format(stage))  # another table of the same batch may stage it again
    return inserted


def copy_for_tenants(
    src: psycopg.Connection[Any], tgt: psycopg.Connection[Any], layout: Layout, tenants: Cohort
) -> int:
    """Before the bulk copy: every followed row the tenants reference that the target lacks."""
    copied = 0
    for followed in layout.followed:
        if selects := _of_tenants_rows(layout, followed, tenants):
            copied += copy_missing(src, tgt, followed, selects)
    return copied


def _of_tenants_rows(layout: Layout, followed: Table, tenants: Cohort) -> list[sql.Composable]:
    """SELECTs of the followed table's rows that the tenants' rows reference, one per foreign key."""
    return [referenced(t, fk, f, of_tenants(t, fk, tenants)) for t, fk, f in references(layout) if f is followed]


def conflicts(
    src: psycopg.Connection[Any], tgt: psycopg.Connection[Any], layout: Layout, tenants: Cohort, target: str
) -> list[str]:
    """Preflight: followed rows the tenants reference that the target holds with other content."""
    problems = []
    for followed in layout.followed:
        selects = _of_tenants_rows(layout, followed, tenants)
        if not selects:
            continue
        by_name = sorted(followed.copy_columns)
        digest = sql.SQL("md5(ROW({})::text)").format(qualified("r", tuple(by_name)))
        pk_text = sql.SQL(", ").join(sql.SQL("r.{}::text").format(sql.Identifier(c)) for c in followed.primary_key)
        rows = {
            tuple(key): value
            for key, value in src.execute(
                sql.SQL("SELECT ARRAY[{}], {} FROM ({}) r").format(pk_text, digest, sql.SQL(" UNION ").join(selects))
            ).fetchall()
        }
        if not rows:
            continue
        keys = sql.Identifier("migrator_follow_keys")
        with tgt.transaction(force_rollback=True):
            load_keys(tgt, followed, [list(k) for k in rows], keys)
            match = sql.SQL(" AND ").join(
                sql.SQL("r.{c} = k.{c}").format(c=sql.Identifier(c)) for c in followed.primary_key
            )
            held = tgt.execute(
                sql.SQL("SELECT ARRAY[{}], {} FROM {} k JOIN {} r ON {}").format(
                    pk_text, digest, keys, followed.ident, match
                )
            ).fetchall()
        differ = sorted(tuple(key) for key, value in held if rows.get(tuple(key)) != value)
        if differ:
            problems.append(
                f"rows {shown_keys(differ[:MAX_KEYS])} of {followed.label} (followed) differ between the source and "
                f"target {target}: the same key holds another row there; make them equal, or stop following "
                f"{followed.label}"
            )
    return problems
