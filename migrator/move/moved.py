"""What a move moved, recorded at its flip, and cleanup's proof that it deletes nothing else.

Cleanup deletes a tenant's rows on its old stamp. Those rows are only safe to delete if they are
the rows the move copied and proved equal: a table the move never copied (the tenancy changed, a
`[tenancy.references]` entry was added, discovery now follows a path it did not), or rows that
changed since, would be lost. So once a move has flipped, while its source is fenced and equal to
what the flip verified, the source's checksum of each table is recorded per tenant in the
catalog's `move_tables`. Before any delete, `prove` recomputes them and refuses, naming the
tables, where the tables or the rows differ, and where a row that stays would reference one that
goes (in `replica` mode nothing else checks that).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any

import psycopg
from psycopg import sql

from migrator import stamps
from migrator.catalog import Catalog, Cohort, Move, Stamp, TableProgress, name_tenants
from migrator.catalog.models import FLIPPED
from migrator.db.retry import STAMP_STEP
from migrator.errors import PreflightError
from migrator.move import fence, proof
from migrator.move.integrity import MAX_KEYS, shown_keys
from migrator.move.verify import EMPTY, Checksum, tenant_checksums
from migrator.stamps.discovery import Layout, Table, label, problems_message, tenant_filter
from migrator.stamps.paths import qualified


@STAMP_STEP.wraps
def record(catalog: Catalog, source: Stamp, layout: Layout, move: Move, copied: dict[str, Checksum]) -> None:
    """After the flip: each table's checksum per tenant on the (fenced) source, in `move_tables`, with
    the rows moved beside the count at the start (rows written during the move make the difference).

    Where a move of one tenant changed no row of a table while it ran (its change log names none)
    and the copy's batches read as many rows as the table holds now, the sum of the batches' source
    checksums (`copied`, see `proof.copied_sums`) is that checksum: every row was read by exactly one
    batch and has not changed since. Those tables are counted, not hashed again. The caller deletes
    the change log, kept for this, once the record is saved.
    """
    at_start = {t.table_name: t.rows_total for t in catalog.tables(move.id)}
    rows = []
    with stamps.connect(source) as src:
        changed = _logged_tables(src, layout, move)
        for position, table in enumerate(layout.tables):
            sums = _sums_at_flip(
                src, table, move.tenants, copied.get(table.label) if table.name not in changed else None
            )
            total = sum(c.rows for c in sums.values())
            text = json.dumps({t: [c.rows, str(c.high), str(c.low)] for t, c in sorted(sums.items())})
            rows.append(
                TableProgress(move.id, table.label, position, at_start.get(table.label, total), total, True, text, None)
            )
    catalog.save_tables(move.id, rows)


def _logged_tables(src: psycopg.Connection[Any], layout: Layout, move: Move) -> set[str]:
    """The tenant tables (by name) the move's change log names on the source: rows changed while it ran."""
    rows = fence.own_rows(src, "changes", "SELECT DISTINCT table_name FROM {} WHERE move_id = %s", (move.capture_id,))
    return {layout.owner_of(name) for (name,) in rows}


def _sums_at_flip(
    src: psycopg.Connection[Any], table: Table, tenants: Cohort, copied: Checksum | None
) -> dict[str, Checksum]:
    """`tenant_checksums` of the table on the source, or the copy's sum where it is exactly that (see `record`)."""
    if copied is not None and len(tenants) == 1 and proof.counts(src, table, tenants)[0] == copied.rows:
        return {tenants[0]: copied} if copied.rows else {}
    return tenant_checksums(src, table, tenants)


def _recorded(progress: TableProgress, tenant: str) -> Checksum | None:
    """The tenant's checksum of the table as its move recorded it at the flip (None: nothing recorded)."""
    if progress.source_checksum is None:
        return None
    rows, high, low = json.loads(progress.source_checksum).get(tenant, [0, "0", "0"])
    return Checksum(int(rows), int(high), int(low))


@dataclass(frozen=True)
class Proof:
    """Rows cleanup may delete, per table, summed over the tenants (what `cleanup --dry-run` shows)."""

    rows: dict[str, int]


PROVEN = "proven by cleanup"
"""`move_tables.target_checksum` of a move whose leftovers a cleanup has proven: a cleanup resumed after
an interruption finds fewer rows than recorded, never others (the source stays fenced meanwhile), so
it finishes deleting instead of refusing."""


def prove(catalog: Catalog, stamp: Stamp, layout: Layout, tenants: Cohort, *, mark: bool = True) -> Proof:
    """Refuse, before any delete, leftovers that are not exactly what a flipped move from `stamp` recorded;
    `mark` records the proof (not for a dry run)."""
    problems: list[str] = []
    by_move: dict[int, tuple[Move, list[str]]] = {}
    for tenant in tenants:
        move = _flipped_from(catalog, tenant, stamp.name)
        if move is None:
            problems.append(
                f"no flipped move of tenant {tenant} from {stamp.name} records its rows: cleanup deletes only "
                "rows a move copied and proved equal"
            )
        else:
            by_move.setdefault(move.id, (move, []))[1].append(tenant)
    rows: dict[str, int] = {}
    recorded = {move_id: {p.table_name: p for p in catalog.tables(move_id)} for move_id in by_move}
    with stamps.connect(stamp) as conn:
        for move, cohort in by_move.values():
            problems += _prove_move(catalog, conn, layout, move, tuple(cohort), recorded[move.id], rows)
        if not problems:
            problems += _references_into(conn, layout, tenants)
    if problems:
        raise PreflightError(problems_message(problems))
    for move_id, tables in recorded.items() if mark else ():
        catalog.save_tables(move_id, [replace(p, target_checksum=PROVEN) for p in tables.values()])
    return Proof(rows)


def _prove_move(
    catalog: Catalog,
    conn: psycopg.Connection[Any],
    layout: Layout,
    move: Move,
    tenants: Cohort,
    recorded: dict[str, TableProgress],
    rows: dict[str, int],
) -> list[str]:
    """The problems of these tenants' leftovers against their move's record; adds the proven rows to `rows`."""
    resumed = bool(recorded) and all(p.target_checksum == PROVEN for p in recorded.values())
    problems = []
    for table in layout.tables:
        now = tenant_checksums(conn, table, tenants)  # one pass for the tenants of the move
        progress = recorded.get(table.label)
        for tenant in tenants:
            found = now.get(tenant, EMPTY)
            if progress is None:
                if found.rows:
                    problems.append(
                        f"table {table.label} holds {found.rows} rows of tenant {tenant} that move {move.id} did not "
                        f"copy (it is a tenant table now: {table.reach}); move them first"
                    )
                continue
            expected = _recorded(progress, tenant) or _on_target(catalog, move, table, tenant)
            if not resumed and found != expected:
                what = "" if _recorded(progress, tenant) else " (no checksum was recorded: compared with the target)"
                problems.append(
                    f"rows of tenant {tenant} in {table.label} differ from what move {move.id} copied and verified "
                    f"({found.rows} rows now, {expected.rows} then){what}"
                )
            rows[table.label] = rows.get(table.label, 0) + found.rows
    current = {t.label for t in layout.tables}
    for name, progress in recorded.items():
        for tenant in tenants:
            copied = _recorded(progress, tenant)
            if name not in current and copied is not None and copied.rows:
                problems.append(
                    f"move {move.id} copied {copied.rows} rows of tenant {tenant} in {name}, which the tenancy "
                    "no longer finds; restore the [tenancy] the move ran with"
                )
    return problems


def _on_target(catalog: Catalog, move: Move, table: Table, tenant: str) -> Checksum:
    """Without a record (a move of an earlier migrator, or one killed right after its flip): the
    target's rows of the tenant now, standing in for it only where they still equal the source's."""
    with stamps.connect(catalog.stamp(move.target)) as tgt:
        return tenant_checksums(tgt, table, (tenant,)).get(tenant, EMPTY)


def _flipped_from(catalog: Catalog, tenant: str, stamp: str) -> Move | None:
    """The tenant's latest move away from `stamp` that flipped (or was cleaned before)."""
    moves = [m for m in catalog.moves(tenant) if m.source == stamp and m.phase in FLIPPED]
    return max(moves, key=lambda m: m.id, default=None)


def _references_into(conn: psycopg.Connection[Any], layout: Layout, tenants: Cohort) -> list[str]:
    """Rows that stay on the stamp but reference rows cleanup would delete, through any foreign key."""
    owned = {t.name: t for t in layout.tables}
    problems = []
    for child_schema, child, name, cols, parent, parent_cols in conn.execute(
        _REFERENCES, (sorted({t.schema for t in layout.tables}), list(owned))
    ):
        target = owned[parent]
        child_table = owned.get(child)
        if child_table is not None and child_table.schema != child_schema:  # another schema's table of that name
            child_table = None
        query = _references_query(
            sql.Identifier(child_schema, child), child_table, tuple(cols), target, tuple(parent_cols), tenants
        )
        found = [list(r[0]) for r in conn.execute(query).fetchall()]
        if found:
            problems.append(
                f"rows of {label(child_schema, child)} that stay reference rows of {name_tenants(tenants)} in "
                f"{target.label} through {name} (values {shown_keys(found)}); cleanup would leave them dangling"
            )
    return problems


def _references_query(
    child: sql.Identifier,
    child_table: Table | None,
    cols: tuple[str, ...],
    target: Table,
    parent_cols: tuple[str, ...],
    tenants: Cohort,
) -> sql.Composed:
    """The first rows of `child` (`child_table` where it is a tenant table) that stay but reference,
    through `cols`, rows of `target` that cleanup deletes."""
    stays = (
        sql.SQL("NOT coalesce({}, false)").format(tenant_filter(child_table, tenants, sql.Identifier("c")))
        if child_table is not None
        else sql.SQL("true")
    )
    return sql.SQL(
        "SELECT ARRAY[{shown}] FROM {child} c WHERE {stays} AND ({cols}) IN"
        " (SELECT {refs} FROM {parent} p WHERE {gone}) LIMIT {n}"
    ).format(
        shown=sql.SQL(", ").join(sql.SQL("c.{}::text").format(sql.Identifier(c)) for c in cols),
        child=child,
        stays=stays,
        cols=qualified("c", cols),
        refs=qualified("p", parent_cols),
        parent=target.ident,
        gone=tenant_filter(target, tenants, sql.Identifier("p")),
        n=sql.Literal(MAX_KEYS),
    )


# Every foreign key into the tenancy schema's tables named, from any schema.
_REFERENCES = """
SELECT rn.nspname, rc.relname, con.conname,
       ARRAY(SELECT a.attname FROM unnest(con.conkey) WITH ORDINALITY k(attnum, ord)
             JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.attnum ORDER BY k.ord),
       pc.relname,
       ARRAY(SELECT a.attname FROM unnest(con.confkey) WITH ORDINALITY k(attnum, ord)
             JOIN pg_attribute a ON a.attrelid = con.confrelid AND a.attnum = k.attnum ORDER BY k.ord)
FROM pg_constraint con
JOIN pg_class rc ON rc.oid = con.conrelid JOIN pg_namespace rn ON rn.oid = rc.relnamespace
JOIN pg_class pc ON pc.oid = con.confrelid JOIN pg_namespace pn ON pn.oid = pc.relnamespace
WHERE con.contype = 'f' AND con.conparentid = 0 AND pn.nspname = ANY(%s) AND pc.relname = ANY(%s)
ORDER BY rn.nspname, rc.relname, con.conname
"""
