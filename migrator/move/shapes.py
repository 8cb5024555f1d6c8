"""Preflight's checks of a schema's shape: whatever a move could not copy exactly is found before its first write.

Each check returns problems, one sentence each naming the table, the problem and what to do,
instead of raising: preflight reports every problem of a move in one run, not one per attempt.
They read both stamps and change nothing (temporary tables live in rolled-back transactions).

- `unmovable`: what binary COPY of the tenancy schema's tables cannot carry: large objects (`oid`
  and `lo` columns point into pg_largeobject), foreign tables holding the tenant column (their rows
  live elsewhere), and tables of other schemas whose foreign keys reference tenant tables (their
  rows would be left behind, and would block the cleanup). Views and materialized views hold no
  rows of their own; they are listed as skipped.
- `compare_structures`: the two stamps' fingerprints (`migrator.stamps.fingerprint`): a difference in
  the tenant tables (their columns, constraints, unique indexes, triggers) or the types their columns
  use is refused, any other (a plain index, say) only noted; columns are compared by name, so their
  physical order may differ.
- `foreign_tenant_references`: rows of the moving tenant whose foreign keys point to rows of another
  tenant (or of none): the target would lack the parents.
- `unique_collisions`: every unique index of the target (primary keys, unique constraints, unique
  indexes on expressions, partial ones with their predicate evaluated on both sides) that does not
  contain the tenant column, against the moving tenant's rows on the source.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql

from migrator import stamps
from migrator.catalog import Cohort, Stamp, name_tenants
from migrator.config import Tenancy
from migrator.move.integrity import MAX_KEYS, shown_keys, unresolved
from migrator.stamps import fingerprint as structure
from migrator.stamps.discovery import ForeignKey, Layout, Table, inspect, label, tenant_filter
from migrator.stamps.paths import qualified

_LARGE_OBJECTS = """
SELECT n.nspname, c.relname, a.attname, format_type(a.atttypid, a.atttypmod)
FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_type t ON t.oid = a.atttypid
WHERE n.nspname = ANY(%s) AND c.relname = ANY(%s) AND a.attnum > 0 AND NOT a.attisdropped
  AND (CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END) = 'oid'::regtype
ORDER BY 1, 2, 3
"""

_OUTSIDE_REFERRERS = """
SELECT rn.nspname, rc.relname, con.conname, n.nspname, c.relname
FROM pg_constraint con JOIN pg_class rc ON rc.oid = con.conrelid JOIN pg_namespace rn ON rn.oid = rc.relnamespace
JOIN pg_class c ON c.oid = con.confrelid JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE con.contype = 'f' AND con.conparentid = 0 AND n.nspname = ANY(%(s)s) AND c.relname = ANY(%(t)s)
  AND rn.nspname <> ALL(%(s)s)
ORDER BY 1, 2, 3
"""

_FOREIGN_TABLES = """
SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = ANY(%s) AND c.relkind = 'f'
  AND EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attname = %s AND NOT a.attisdropped)
ORDER BY 1, 2
"""

_VIEWS = """
SELECT CASE c.relkind WHEN 'v' THEN 'view ' ELSE 'materialized view ' END || c.relname
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = ANY(%s) AND c.relkind IN ('v', 'm')
ORDER BY c.relname
"""

# Unique indexes of a table whose key does not contain the tenant column: each key column or
# expression and the predicate as the server deparses them (valid SQL over the table's columns).
_UNIQUE_INDEXES = """
SELECT ic.relname, i.indisprimary, i.indnullsnotdistinct,
       ARRAY(SELECT pg_get_indexdef(i.indexrelid, k, true) FROM generate_series(1, i.indnkeyatts) k ORDER BY k),
       pg_get_expr(i.indpred, i.indrelid, true)
FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid
WHERE i.indrelid = %s::regclass AND i.indisunique AND i.indisvalid
  AND NOT EXISTS (SELECT 1 FROM unnest(i.indkey) WITH ORDINALITY u(attnum, ord)
                  JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = u.attnum
                  WHERE u.ord <= i.indnkeyatts AND a.attname = %s)
ORDER BY ic.relname
"""


def unmovable(conn: psycopg.Connection[Any], tenancy: Tenancy, layout: Layout) -> tuple[list[str], tuple[str, ...]]:
    """What COPY cannot carry (problems), and the views and materialized views left alone (skipped)."""
    searched, names = tenancy.searched, [t.name for t in layout.tables]
    problems = [
        f"table {label(schema, table)} column {column} is of type {typ}: it points to large objects, which live "
        "in pg_largeobject and are not copied with the rows; store the bytes in a bytea column, or exclude the table"
        for schema, table, column, typ in conn.execute(_LARGE_OBJECTS, (searched, names)).fetchall()
    ]
    problems += [
        f"foreign table {label(schema, name)} has the tenant column {tenancy.column} but its rows live on "
        "another server, which a move cannot copy; move them by other means and add it to [tenancy] exclude"
        for schema, name in conn.execute(_FOREIGN_TABLES, (searched, tenancy.column)).fetchall()
    ]
    outside = conn.execute(_OUTSIDE_REFERRERS, {"s": searched, "t": names}).fetchall()
    problems += [
        f"table {other_schema}.{other} references tenant table {label(schema, table)} (foreign key {conname}) "
        f"from outside schema {' and '.join(searched)}: its rows would stay behind and block the cleanup; add "
        f"{other_schema} to [tenancy] schemas, move the table, or drop the foreign key"
        for other_schema, other, conname, schema, table in outside
    ]
    skipped = tuple(row[0] for row in conn.execute(_VIEWS, (searched,)).fetchall())
    return problems, skipped


def between(source: Stamp, target: Stamp, tenancy: Tenancy) -> list[str]:
    """The problems of the schemas that would refuse any move from `source` to `target` (for plans:
    a tenant's own rows, such as unique values taken on the target, are judged by each move's preflight)."""
    with stamps.connect(source) as src, stamps.connect(target) as tgt:
        layout = inspect(src, tenancy)
        problems = [*layout.problems, *unmovable(src, tenancy, layout)[0]]
        return problems + compare_structures(src, tgt, layout, tenancy, (source.name, target.name))[0]


def compare_structures(
    src: psycopg.Connection[Any],
    tgt: psycopg.Connection[Any],
    layout: Layout,
    tenancy: Tenancy,
    names: tuple[str, str],
    *,
    allow_triggers: bool = False,
) -> tuple[list[str], list[str]]:
    """The two stamps' fingerprints compared: the differences that change what a move writes or checks
    (refused), and the others (noted). Refused: a tenant table missing on one side (a table with the
    tenant column counts), its columns (type, nullability, default, generated, identity), constraints,
    unique indexes, triggers (unless `allow_triggers`: the operator vouches for them, as for those
    `checks` finds) and row-level security, and a type one of its columns uses; noted: the rest, such
    as a plain index or a function."""
    ours, theirs = structure.fingerprint(src), structure.fingerprint(tgt)
    one_sided = set(ours.objects).symmetric_difference(theirs.objects)
    tenant_tables = {t.label for t in layout.tables} | {
        name for kind, name in one_sided
        if kind == structure.TABLE and ((structure.COLUMN, f"{name}.{tenancy.column}") in one_sided)
    }  # fmt: skip  # a table on one side only is a tenant table when it has the tenant column
    used_types = {
        o.ddl.split(" ")[0].removesuffix("[]")
        for o in (*ours.objects.values(), *theirs.objects.values())
        if o.kind == structure.COLUMN and _owner(o.table) in tenant_tables
    }
    refused, noted = [], []
    source, target = names
    for difference in structure.compare(ours, theirs):
        line = difference.describe(source, target)
        trigger = difference.kind == structure.TRIGGER
        if not _changes_a_move(difference, tenant_tables, used_types) or (trigger and allow_triggers):
            noted.append(line)
            continue
        vouch = "; --allow-triggers for a trigger known to be harmless" if trigger else ""
        refused.append(f"{line} (`migrator schema diff {source} {target}` shows every difference{vouch})")
    return refused, noted


_MOVED_WITH_THE_TABLE = (structure.TABLE, structure.COLUMN, structure.CONSTRAINT, structure.TRIGGER, structure.POLICY)


def _changes_a_move(difference: structure.Difference, tenant_tables: set[str], used_types: set[str]) -> bool:
    if difference.kind == structure.TYPE:
        return difference.name in used_types
    if _owner(difference.table) not in tenant_tables:
        return False
    sides = (difference.ours, difference.theirs)
    return difference.kind in _MOVED_WITH_THE_TABLE or any(o is not None and o.unique for o in sides)


def _owner(table: str | None) -> str | None:
    """The table a partition belongs to (partitions are named by their parent and bounds)."""
    return table.split(" ", 1)[0] if table else None


def unique_collisions(
    src: psycopg.Connection[Any],
    tgt: psycopg.Connection[Any],
    layout: Layout,
    tenants: Cohort,
    target_name: str,
    rows: dict[str, int],
) -> list[str]:
    """For each unique index on the target not containing the tenant column, the tenant's values on the
    source that rows already on the target hold (another tenant's: the tenant has none there)."""
    problems = []
    for table in layout.tables:
        if not rows.get(table.label):
            continue
        indexes = tgt.execute(_UNIQUE_INDEXES, (table.ident.as_string(tgt), table.key)).fetchall()
        for name, primary, nulls_equal, exprs, predicate in indexes:
            keys = _colliding(src, tgt, table, tenants, exprs, predicate, nulls_equal)
            if not keys:
                continue
            shown = "; ".join("(" + ", ".join("NULL" if v is None else v for v in k) + ")" for k in keys)
            if primary:
                problems.append(
                    f"primary key collision in {table.label}: key {shown} of {name_tenants(tenants)} already exists "
                    f"on {target_name} (another tenant's row){_KEYS_HINT if _sequence_fed(table, exprs) else ''}"
                )
                continue
            where = f" WHERE {predicate}" if predicate else ""
            problems.append(
                f"unique index {name} on {table.label} ({', '.join(exprs)}){where}: values {shown} of "
                f"{name_tenants(tenants)} are already taken on {target_name} by other tenants' rows; "
                "change them on one side first"
            )
    return problems


# Ids from per-stamp sequences: every stamp hands out the same ones.
_KEYS_HINT = (
    "; its ids come from a sequence each stamp starts at 1: `migrator keys check` names every tenant whose "
    "ids collide, `migrator keys stride` gives each stamp its own block of new ids"
)


def _sequence_fed(table: Table, exprs: list[str]) -> bool:
    """A key of one column fed by a sequence (serial, bigserial, identity)."""
    return len(exprs) == 1 and any(c.sequence and exprs[0] in (c.name, f'"{c.name}"') for c in table.columns)


def _colliding(
    src: psycopg.Connection[Any],
    tgt: psycopg.Connection[Any],
    table: Table,
    tenants: Cohort,
    exprs: list[str],
    predicate: str | None,
    nulls_equal: bool,
) -> list[list[str | None]]:
    """Stream the tenant's index values into a temporary table on the target and find those taken there.

    The key expressions and the predicate are SQL text deparsed by the server from the index
    (`pg_get_indexdef`, `pg_get_expr`), not input: they are the only SQL here not built by psycopg.sql.
    """
    values = [sql.SQL(e) for e in exprs]  # deparsed by PostgreSQL from the index
    names = [sql.Identifier(f"migrator_k{i}") for i in range(len(exprs))]
    where = sql.SQL(f"({predicate})") if predicate else sql.SQL("true")
    keys = sql.Identifier("migrator_unique_keys")
    equal = sql.SQL(" IS NOT DISTINCT FROM " if nulls_equal else " = ")
    with tgt.transaction(force_rollback=True), tgt.cursor() as tcur, src.cursor() as scur:
        tcur.execute(
            sql.SQL("CREATE TEMPORARY TABLE {} ON COMMIT DROP AS SELECT {} FROM {} WITH NO DATA").format(
                keys,
                sql.SQL(", ").join(sql.SQL("{} AS {}").format(v, n) for v, n in zip(values, names, strict=True)),
                table.ident,
            )
        )
        copy_out = sql.SQL("COPY (SELECT {} FROM {} WHERE {} AND {}) TO STDOUT (FORMAT BINARY)").format(
            sql.SQL(", ").join(values), table.ident, tenant_filter(table, tenants), where
        )
        with (
            scur.copy(copy_out) as out,
            tcur.copy(sql.SQL("COPY {} FROM STDIN (FORMAT BINARY)").format(keys)) as inp,
        ):
            for block in out:
                inp.write(block)
        match = sql.SQL(" AND ").join(
            sql.SQL("{}{}k.{}").format(v, equal, n) for v, n in zip(values, names, strict=True)
        )
        found = tcur.execute(
            sql.SQL("SELECT ARRAY[{}] FROM {} k WHERE EXISTS (SELECT 1 FROM {} WHERE {} AND {}) LIMIT {}").format(
                sql.SQL(", ").join(sql.SQL("k.{}::text").format(n) for n in names),
                keys,
                table.ident,
                where,
                match,
                sql.Literal(MAX_KEYS),
            )
        ).fetchall()
    return [list(row[0]) for row in found]


def _same_tenant_by_construction(table: Table, parent: Table, fk: ForeignKey) -> bool:
    """A key that matches the tenant column with the parent's, or a path table's one way to its tenant,
    cannot lead to another tenant's row."""
    if table.key is not None:
        return any(c == table.key and p == parent.key for c, p in zip(fk.columns, fk.parent_columns, strict=True))
    return len(table.paths) == 1 and table.paths[0].hops[0].constraint == fk.name


def foreign_tenant_references(conn: psycopg.Connection[Any], layout: Layout, tenants: Cohort) -> list[str]:
    """Foreign keys between tenant tables whose rows of a tenant reference rows not of that tenant.

    A key that matches the tenant column with the parent's cannot cross tenants and is not scanned.
    """
    problems = []
    whose = f"tenant {tenants[0]}'s" if len(tenants) == 1 else "their own tenant's"
    for table in layout.tables:
        for fk in table.foreign_keys:
            parent = layout.table(fk.parent_label)
            if _same_tenant_by_construction(table, parent, fk):
                continue
            keys = unresolved(conn, table, fk, tenants, parent)
            if keys:
                problems.append(
                    f"rows {shown_keys(keys)} of {table.label} reference rows of {parent.label} that are not "
                    f"{whose} (foreign key {fk.name}); a move copies one tenant's rows only: "
                    "fix those references first"
                )
    problems += _rows_below_a_tree_only(conn, layout, tenants)
    return problems


def _rows_below_a_tree_only(conn: psycopg.Connection[Any], layout: Layout, tenants: Cohort) -> list[str]:
    """Rows of a path table that is a tree whose paths are all NULL, under a parent row of the tenants.

    Such a row belongs to its parent's tenant, but only through its own table: the paths a move
    follows lead to other tables, so it would be left behind (and orphaned by cleanup).
    """
    problems = []
    for table in layout.tables:
        if table.key is not None or not table.self_references:
            continue
        unset = sql.SQL(" AND ").join(
            sql.SQL("c.{} IS NULL").format(sql.Identifier(col)) for path in table.paths for col in path.columns
        )
        below = sql.SQL(" OR ").join(
            sql.SQL("({}) IN (SELECT {} FROM {} p WHERE {})").format(
                qualified("c", fk.columns),
                qualified("p", fk.parent_columns),
                table.ident,
                tenant_filter(table, tenants, sql.Identifier("p")),
            )
            for fk in table.self_references
        )
        keys = conn.execute(
            sql.SQL("SELECT ARRAY[{}] FROM {} c WHERE {} AND ({}) LIMIT {}").format(
                sql.SQL(", ").join(sql.SQL("c.{}::text").format(sql.Identifier(col)) for col in table.primary_key),
                table.ident,
                unset,
                below,
                sql.Literal(MAX_KEYS),
            )
        ).fetchall()
        if keys:
            columns = ", ".join(sorted({col for path in table.paths for col in path.columns}))
            problems.append(
                f"rows {shown_keys([list(k[0]) for k in keys])} of {table.label} reach their tenant only through their "
                f"parent row in {table.label} ({columns} NULL): a move follows paths to other tables; set "
                f"{columns} on those rows first"
            )
    return problems
