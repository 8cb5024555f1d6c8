"""Which tables hold a tenant's rows, in which order to copy them, and how to key them.

Found by reflecting pg_catalog on the source stamp: the root table (whose key *is* the tenant id)
plus every table carrying the tenant column. Parents come before children in foreign-key order so
the target's constraints hold during the copy; tables with neither column are global and left alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from migrator.config import Tenancy
from migrator.errors import PreflightError


def _label(schema: str, name: str) -> str:
    """A table's display name: only the public schema is left out (names are shown as stored)."""
    return name if schema == "public" else f"{schema}.{name}"


@dataclass(frozen=True)
class Column:
    name: str
    type: str
    generated: bool
    identity: bool
    nullable: bool
    sequence: str | None


@dataclass(frozen=True)
class Table:
    """A table holding tenant rows; `key` is the tenant column (or the root column on the root table).

    `primary_key` is the row key every batch, cursor, replay and delete goes by: the primary key, or
    when the table has none, the columns of a NOT NULL unique index (`key_index` names it; None for a PK).
    """

    schema: str
    name: str
    key: str
    columns: tuple[Column, ...]
    primary_key: tuple[str, ...]
    parents: tuple[str, ...]
    key_index: str | None = None

    @property
    def ident(self) -> sql.Identifier:
        return sql.Identifier(self.schema, self.name)

    @property
    def label(self) -> str:
        """Qualified name for messages and progress (unquoted when plain)."""
        return _label(self.schema, self.name)

    @property
    def copy_columns(self) -> tuple[str, ...]:
        """Columns COPY may write: generated columns are recomputed by the target."""
        return tuple(c.name for c in self.columns if not c.generated)

    @property
    def pk_has_tenant(self) -> bool:
        """A key containing the tenant column cannot collide with another tenant's rows."""
        return self.key in self.primary_key

    def cols(self, names: tuple[str, ...] | None = None) -> sql.Composed:
        return sql.SQL(", ").join(sql.Identifier(n) for n in (names or self.copy_columns))

    def pk_cols(self) -> sql.Composed:
        return sql.SQL(", ").join(sql.Identifier(n) for n in self.primary_key)

    def pk_text(self) -> sql.Composed:
        """The primary key as text values, the portable form of a keyset cursor."""
        return sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(n)) for n in self.primary_key)


@dataclass(frozen=True)
class Layout:
    """The result of discovery: tenant tables in copy order, and what was left alone and why."""

    tables: tuple[Table, ...]
    global_tables: tuple[str, ...]
    excluded: tuple[str, ...]

    def table(self, label: str) -> Table:
        for table in self.tables:
            if table.label == label:
                return table
        raise KeyError(label)


_TABLES = """
SELECT c.oid, n.nspname, c.relname
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = %s AND c.relkind IN ('r', 'p') AND NOT c.relispartition
ORDER BY c.relname
"""

_COLUMNS = """
SELECT a.attrelid, a.attname, format_type(a.atttypid, a.atttypmod), a.attgenerated <> '', a.attidentity <> '',
       NOT a.attnotnull,
       pg_get_serial_sequence(quote_ident(n.nspname) || '.' || quote_ident(c.relname), a.attname)
FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = %s AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attrelid, a.attnum
"""

# Unique indexes usable as a row key when a table has no primary key: immediate, not partial, no
# expressions, every key column NOT NULL (so each row has exactly one key and ON CONFLICT can use it).
_UNIQUE_KEYS = """
SELECT i.indrelid, ic.relname, k.cols
FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid JOIN pg_namespace n ON n.oid = ic.relnamespace
CROSS JOIN LATERAL (
    SELECT array_agg(a.attname ORDER BY u.ord) AS cols, bool_and(a.attnotnull) AS notnull
    FROM unnest(i.indkey) WITH ORDINALITY u(attnum, ord)
    JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = u.attnum
    WHERE u.ord <= i.indnkeyatts
) k
WHERE n.nspname = %s AND i.indisunique AND i.indimmediate AND i.indisvalid AND i.indpred IS NULL
  AND i.indexprs IS NULL AND k.notnull
ORDER BY i.indrelid, i.indnkeyatts, ic.relname
"""

_CONSTRAINTS = """
SELECT con.conrelid, con.contype, con.confrelid,
       ARRAY(SELECT a.attname FROM unnest(con.conkey) WITH ORDINALITY k(attnum, ord)
             JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.attnum ORDER BY k.ord)
FROM pg_constraint con JOIN pg_namespace n ON n.oid = con.connamespace
WHERE n.nspname = %s AND con.contype IN ('p', 'f')
"""


def discover(conn: psycopg.Connection[Any], tenancy: Tenancy) -> Layout:
    """Reflect the stamp's schema into a Layout; refuses layouts a move cannot copy safely."""
    schema = tenancy.db_schema
    names = {oid: name for oid, _, name in conn.execute(_TABLES, (schema,)).fetchall()}
    columns: dict[int, list[Column]] = {oid: [] for oid in names}
    for oid, name, typ, generated, identity, nullable, seq in conn.execute(_COLUMNS, (schema,)).fetchall():
        if oid in columns:
            columns[oid].append(Column(name, typ, generated, identity, nullable, seq))
    pkeys: dict[int, tuple[str, ...]] = {}
    parents: dict[int, set[int]] = {oid: set() for oid in names}
    for oid, kind, ref, cols in conn.execute(_CONSTRAINTS, (schema,)).fetchall():
        if oid not in names:
            continue
        if kind == "p":
            pkeys[oid] = tuple(cols)
        elif ref in names and ref != oid:
            parents[oid].add(ref)

    if tenancy.root_table not in names.values():
        raise PreflightError(f"root table {tenancy.root_table!r} not found in schema {schema!r}")
    tenant_oids: dict[int, str] = {}
    global_tables: list[str] = []
    excluded: list[str] = []
    for oid, name in names.items():
        colnames = {c.name for c in columns[oid]}
        if name in tenancy.exclude:
            excluded.append(name)
        elif name == tenancy.root_table:
            if tenancy.root_column not in colnames:
                raise PreflightError(f"root table {name!r} has no column {tenancy.root_column!r}")
            tenant_oids[oid] = tenancy.root_column
        elif tenancy.column in colnames:
            tenant_oids[oid] = tenancy.column
        else:
            global_tables.append(name)

    unique_keys: dict[int, tuple[str, tuple[str, ...]]] = {}
    for oid, index, cols in conn.execute(_UNIQUE_KEYS, (schema,)).fetchall():
        unique_keys.setdefault(oid, (index, tuple(cols)))  # fewest columns first, then by name
    key_index: dict[int, str | None] = {}
    for oid in sorted(tenant_oids, key=lambda o: names[o]):
        if oid in pkeys:
            key_index[oid] = None
        elif oid in unique_keys:
            key_index[oid], pkeys[oid] = unique_keys[oid]
        else:
            raise PreflightError(
                f"table {_label(schema, names[oid])} has no primary key and no unique index on NOT NULL columns; "
                "a move needs one to copy in resumable batches"
            )

    ordered = _parents_first(tenant_oids, parents, names)
    tables = tuple(
        Table(
            schema=schema,
            name=names[oid],
            key=tenant_oids[oid],
            columns=tuple(columns[oid]),
            primary_key=pkeys[oid],
            parents=tuple(sorted(names[p] for p in parents[oid] if p in tenant_oids)),
            key_index=key_index[oid],
        )
        for oid in ordered
    )
    return Layout(tables=tables, global_tables=tuple(sorted(global_tables)), excluded=tuple(sorted(excluded)))


def _parents_first(tenant_oids: dict[int, str], parents: dict[int, set[int]], names: dict[int, str]) -> list[int]:
    """Topological order over tenant tables (ties by name, so every run copies in the same order)."""
    pending = {oid: {p for p in parents[oid] if p in tenant_oids} for oid in tenant_oids}
    ordered: list[int] = []
    while pending:
        ready = sorted((oid for oid, deps in pending.items() if not deps), key=lambda o: names[o])
        if not ready:
            cycle = ", ".join(sorted(names[o] for o in pending))
            raise PreflightError(f"foreign keys form a cycle between tenant tables ({cycle}); cannot order the copy")
        for oid in ready:
            ordered.append(oid)
            del pending[oid]
        for deps in pending.values():
            deps.difference_update(ready)
    return ordered


def tenant_filter(table: Table, tenant: str) -> sql.Composed:
    """`"key" = 'tenant'` as a composable, with the tenant passed as a literal of unknown type.

    COPY statements cannot take server-side parameters, so the tenant is bound as an SQL literal;
    PostgreSQL infers its type from the column (bigint, uuid, text...).
    """
    return sql.SQL("{} = {}").format(sql.Identifier(table.key), sql.Literal(tenant))


def key_after(table: Table, cursor: list[str] | None) -> sql.Composable:
    """Keyset condition `(pk) > (cursor)`; true when there is no cursor yet."""
    if cursor is None:
        return sql.SQL("true")
    return sql.SQL("({}) > ({})").format(table.pk_cols(), sql.SQL(", ").join(sql.Literal(v) for v in cursor))


def key_upto(table: Table, bound: list[str] | None) -> sql.Composable:
    """Keyset condition `(pk) <= (bound)`; true when unbounded."""
    if bound is None:
        return sql.SQL("true")
    return sql.SQL("({}) <= ({})").format(table.pk_cols(), sql.SQL(", ").join(sql.Literal(v) for v in bound))
