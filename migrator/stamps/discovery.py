"""Which tables hold a tenant's rows, in which order to copy them, and how to key them.

Found by reflecting pg_catalog on the source stamp: the root table (whose key *is* the tenant id)
plus every table carrying the tenant column. Parents come before children in foreign-key order so
the target's constraints hold during the copy; tables with neither column are global and left alone.

Foreign keys between tenant tables may form a cycle only through DEFERRABLE constraints: the
tables of such a cycle (`Table.cycle`) are ordered by their NOT DEFERRABLE foreign keys and copied,
replayed and deleted together in one transaction with the others deferred. A cycle through NOT
DEFERRABLE constraints alone cannot be copied and is refused. A table's foreign keys into itself
(`Table.self_references`, trees) are ordered row by row by `migrator.move.tree`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from migrator.catalog.models import Cohort
from migrator.config import Tenancy
from migrator.errors import PreflightError
from migrator.stamps.paths import MAX_HOPS, MAX_PATHS, Hop, Path, member_filter, owner_text, tenants_match


def label(schema: str, name: str) -> str:
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

    @property
    def base_type(self) -> str:
        """The type without its modifiers: `numeric(10,6)` is numeric, `timestamp(3) with time zone`
        is timestamp with time zone."""
        return re.sub(r"\(\d+(,\d+)?\)", "", self.type)


@dataclass(frozen=True)
class ForeignKey:
    """A foreign key from one tenant table to another (or to itself), with the columns it matches."""

    name: str
    columns: tuple[str, ...]
    parent: str
    parent_columns: tuple[str, ...]
    deferrable: bool
    parent_schema: str = "public"

    @property
    def parent_ident(self) -> sql.Identifier:
        return sql.Identifier(self.parent_schema, self.parent)

    @property
    def parent_label(self) -> str:
        return label(self.parent_schema, self.parent)


@dataclass(frozen=True)
class Table:
    """A table holding tenant rows; `key` is the tenant column (or the root column on the root table),
    None for a path table, whose rows reach their tenant through the foreign keys of `paths`.

    `primary_key` is the row key every batch, cursor, replay and delete goes by: the primary key, or
    when the table has none, the columns of a NOT NULL unique index (`key_index` names it; None for a PK).
    """

    schema: str
    name: str
    key: str | None
    columns: tuple[Column, ...]
    primary_key: tuple[str, ...]
    parents: tuple[str, ...]
    key_index: str | None = None
    foreign_keys: tuple[ForeignKey, ...] = ()
    cycle: tuple[str, ...] = ()
    """Names of the tables of its (deferrable) foreign-key cycle, in copy order; empty when in none."""
    partitions: tuple[str, ...] = ()
    """Names of its partitions at every level (a partitioned table): the guard trigger fires on them."""
    shared_keys: tuple[ForeignKey, ...] = ()
    """Foreign keys into tables without tenant rows (reference data each stamp holds for itself)."""
    paths: tuple[Path, ...] = ()
    """A path table's ways to its tenant (see `migrator.stamps.paths`); empty for a table with the key."""
    follows: tuple[tuple[ForeignKey, Table], ...] = ()
    """Its foreign keys into `[tenancy] follow` tables, with those tables (see `migrator.move.follow`)."""

    @property
    def reach(self) -> str:
        """How the tenant's rows are found in this table, for `move --dry-run` and `init`."""
        if self.key is not None:
            return f"column {self.key}"
        return "path " + "; ".join(p.describe(self.name) for p in self.paths)

    @property
    def self_references(self) -> tuple[ForeignKey, ...]:
        """Foreign keys into the table itself (a tree: parents must reach the target before children)."""
        return tuple(fk for fk in self.foreign_keys if fk.parent == self.name)

    @property
    def ident(self) -> sql.Identifier:
        return sql.Identifier(self.schema, self.name)

    @property
    def label(self) -> str:
        """Qualified name for messages and progress (unquoted when plain)."""
        return label(self.schema, self.name)

    @property
    def copy_columns(self) -> tuple[str, ...]:
        """Columns COPY may write: generated columns are recomputed by the target."""
        return tuple(c.name for c in self.columns if not c.generated)

    @property
    def pk_has_tenant(self) -> bool:
        """A key containing the tenant column cannot collide with another tenant's rows."""
        return self.key is not None and self.key in self.primary_key

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
    problems: tuple[str, ...] = ()
    """Why a move cannot copy this layout (tables without a row key, NOT DEFERRABLE cycles); see `inspect`."""
    followed: tuple[Table, ...] = ()
    """`[tenancy] follow`: global tables whose rows referenced by the tenants' rows travel with them
    (copied where the target lacks them, never deleted); see `migrator.move.follow`."""
    suspects: tuple[str, ...] = ()
    """Global tables' columns that look like references to tenant tables but are no foreign key
    (`invoice_lines.invoice_id` beside `invoices`): declare them in [tenancy.references], or they stay global."""

    def table(self, label: str) -> Table:
        for table in self.tables:
            if table.label == label:
                return table
        raise KeyError(label)

    def owner_of(self, name: str) -> str:
        """The tenant table a partition belongs to (a row trigger reports the partition's name)."""
        return next((t.name for t in self.tables if name in t.partitions), name)

    def cycle_of(self, table: Table) -> tuple[Table, ...]:
        """The tables of `table`'s foreign-key cycle in copy order (itself alone when in none)."""
        return tuple(t for t in self.tables if t.name in table.cycle) or (table,)


_TABLES = """
SELECT c.oid, n.nspname, c.relname
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = ANY(%s) AND c.relkind IN ('r', 'p') AND NOT c.relispartition
ORDER BY c.relname
"""

_PARTITIONS = """
SELECT c.oid, ARRAY(SELECT p.relname FROM pg_partition_tree(c.oid) t JOIN pg_class p ON p.oid = t.relid
                    WHERE t.level > 0 ORDER BY p.relname)
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = ANY(%s) AND c.relkind = 'p' AND NOT c.relispartition
"""

_COLUMNS = """
SELECT a.attrelid, a.attname, format_type(a.atttypid, a.atttypmod), a.attgenerated <> '', a.attidentity <> '',
       NOT a.attnotnull,
       pg_get_serial_sequence(quote_ident(n.nspname) || '.' || quote_ident(c.relname), a.attname)
FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = ANY(%s) AND a.attnum > 0 AND NOT a.attisdropped
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
WHERE n.nspname = ANY(%s) AND i.indisunique AND i.indimmediate AND i.indisvalid AND i.indpred IS NULL
  AND i.indexprs IS NULL AND k.notnull
ORDER BY i.indrelid, i.indnkeyatts, ic.relname
"""

_CONSTRAINTS = """
SELECT con.conrelid, con.contype, con.confrelid,
       ARRAY(SELECT a.attname FROM unnest(con.conkey) WITH ORDINALITY k(attnum, ord)
             JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.attnum ORDER BY k.ord),
       ARRAY(SELECT a.attname FROM unnest(con.confkey) WITH ORDINALITY k(attnum, ord)
             JOIN pg_attribute a ON a.attrelid = con.confrelid AND a.attnum = k.attnum ORDER BY k.ord),
       con.conname, con.condeferrable
FROM pg_constraint con JOIN pg_namespace n ON n.oid = con.connamespace
WHERE n.nspname = ANY(%s) AND con.contype IN ('p', 'f') AND con.conparentid = 0
ORDER BY con.conname
"""


def discover(conn: psycopg.Connection[Any], tenancy: Tenancy) -> Layout:
    """Reflect the stamp's schema into a Layout; refuses layouts a move cannot copy safely."""
    layout = inspect(conn, tenancy)
    if layout.problems:
        raise PreflightError(problems_message(layout.problems))
    return layout


def problems_message(problems: tuple[str, ...] | list[str]) -> str:
    """All of preflight's findings in one line: the operator fixes them in one round, not one per attempt."""
    if len(problems) == 1:
        return problems[0]
    return f"{len(problems)} problems: " + " ".join(f"({i}) {p};" for i, p in enumerate(problems, 1)).rstrip(";")


def inspect(conn: psycopg.Connection[Any], tenancy: Tenancy) -> Layout:
    """Reflect the stamp's schema into a Layout, listing in `problems` every reason a move cannot copy it.

    Tables without a usable row key are left out of `tables` (and named in `problems`); only a missing
    root table is raised at once, as nothing else can be judged without it.
    """
    schema, searched = tenancy.db_schema, tenancy.searched
    found = conn.execute(_TABLES, (searched,)).fetchall()
    names = {oid: name for oid, _, name in found}
    schema_of = {oid: nsp for oid, nsp, _ in found}
    columns: dict[int, list[Column]] = {oid: [] for oid in names}
    for oid, name, typ, generated, identity, nullable, seq in conn.execute(_COLUMNS, (searched,)).fetchall():
        if oid in columns:
            columns[oid].append(Column(name, typ, generated, identity, nullable, seq))
    pkeys: dict[int, tuple[str, ...]] = {}
    foreign: dict[int, list[tuple[int, ForeignKey]]] = {oid: [] for oid in names}
    for oid, kind, ref, cols, ref_cols, conname, deferrable in conn.execute(_CONSTRAINTS, (searched,)).fetchall():
        if oid not in names:
            continue
        if kind == "p":
            pkeys[oid] = tuple(cols)
        elif ref in names:
            fk = ForeignKey(conname, tuple(cols), names[ref], tuple(ref_cols), deferrable, schema_of[ref])
            foreign[oid].append((ref, fk))

    if not any(n == tenancy.root_table and schema_of[o] == schema for o, n in names.items()):
        raise PreflightError(f"root table {tenancy.root_table!r} not found in schema {schema!r}")
    problems = _same_names(names, schema_of)
    for oid, fk in _declared(conn, tenancy, names, schema_of, columns, problems):
        same = (fk.columns, fk.parent, fk.parent_columns)
        if all((k.columns, k.parent, k.parent_columns) != same for _, k in foreign[oid]):  # not a constraint already
            foreign[oid].append((next(o for o, n in names.items() if n == fk.parent), fk))
    tenant_oids: dict[int, str | None] = {}
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

    followed = _followed(tenancy, names, tenant_oids, pkeys, problems)
    candidates = {
        oid for oid, name in names.items() if oid not in tenant_oids and name not in tenancy.exclude
    } - followed
    path_of = _find_paths(candidates, tenant_oids, foreign, names, schema_of, problems)
    global_tables = [name for oid, name in names.items() if oid in candidates and oid not in path_of]
    if len(tenant_oids) == 1 and not path_of:
        problems.append(
            f"the tenancy finds tenants in no table but the root {tenancy.root_table}: no other table of "
            f"{' or '.join(repr(n) for n in searched)} has the column {tenancy.column!r} or a foreign key leading "
            "to a tenant table; check [tenancy] column (a move would copy the root row alone)"
        )
    elif len(tenant_oids) == 1:
        # Tables found through foreign keys alone hide a typo: those holding the key without one stay behind.
        problems.append(
            f"[tenancy] column {tenancy.column!r} is in no table of {' or '.join(repr(n) for n in searched)}: "
            "check its spelling (tables that carry the tenant key without a foreign key would be left behind)"
        )
    unique_keys: dict[int, tuple[str, tuple[str, ...]]] = {}
    for oid, index, cols in conn.execute(_UNIQUE_KEYS, (searched,)).fetchall():
        unique_keys.setdefault(oid, (index, tuple(cols)))  # fewest columns first, then by name
    key_index: dict[int, str | None] = {}
    owned = {**tenant_oids, **dict.fromkeys(path_of)}
    for oid in sorted(owned, key=lambda o: names[o]):
        if oid in pkeys:
            key_index[oid] = None
        elif oid in unique_keys:
            key_index[oid], pkeys[oid] = unique_keys[oid]
        else:
            problems.append(
                f"table {label(schema_of[oid], names[oid])} has no primary key and no unique index on NOT NULL "
                "columns; a move needs one to copy in resumable batches"
            )
    partitions = {oid: tuple(parts) for oid, parts in conn.execute(_PARTITIONS, (searched,)).fetchall()}
    keyed = {oid: key for oid, key in owned.items() if oid in pkeys}
    edges = {oid: [(ref, fk) for ref, fk in foreign[oid] if ref in keyed] for oid in keyed}
    ordered, cycles = _copy_order(edges, names, schema_of, problems)
    follow_tables = {
        oid: Table(schema_of[oid], names[oid], None, tuple(columns[oid]), pkeys[oid], ())
        for oid in sorted(followed, key=lambda o: names[o])
    }
    tables = tuple(
        Table(
            schema=schema_of[oid],
            name=names[oid],
            key=keyed[oid],
            columns=tuple(columns[oid]),
            primary_key=pkeys[oid],
            parents=tuple(sorted({names[ref] for ref, _ in edges[oid] if ref != oid})),
            key_index=key_index[oid],
            foreign_keys=tuple(fk for _, fk in edges[oid]),
            cycle=cycles.get(oid, ()),
            partitions=partitions.get(oid, ()),
            shared_keys=tuple(fk for ref, fk in foreign[oid] if ref not in owned),
            paths=path_of.get(oid, ()),
            follows=tuple((fk, follow_tables[ref]) for ref, fk in foreign[oid] if ref in follow_tables),
        )
        for oid in ordered
    )
    return Layout(
        tables=tables,
        global_tables=tuple(sorted(global_tables)),
        excluded=tuple(sorted(excluded)),
        problems=tuple(problems),
        suspects=_suspects(global_tables, [t.name for t in tables], columns, foreign, names),
        followed=tuple(follow_tables.values()),
    )


Edges = dict[int, list[tuple[int, ForeignKey]]]


def _same_names(names: dict[int, str], schema_of: dict[int, str]) -> list[str]:
    """Tables of one name in two searched schemas: a move names tables by name (its change log does, as
    triggers report TG_TABLE_NAME), so they are refused rather than confused."""
    seen: dict[str, list[str]] = {}
    for oid, name in names.items():
        seen.setdefault(name, []).append(schema_of[oid])
    return [
        f"table name {name} is in schemas {', '.join(sorted(schemas))}: a move needs table names unique across "
        "[tenancy] schemas"
        for name, schemas in sorted(seen.items())
        if len(schemas) > 1
    ]


def _followed(
    tenancy: Tenancy,
    names: dict[int, str],
    tenant_oids: dict[int, str | None],
    pkeys: dict[int, tuple[str, ...]],
    problems: list[str],
) -> set[int]:
    """The `[tenancy] follow` tables: global ones with a primary key (never path tables, whatever they reference)."""
    oids = {name: oid for oid, name in names.items()}
    found = set()
    for name in tenancy.follow:
        oid = oids.get(name)
        if oid is None:
            problems.append(
                f"[tenancy] follow names {name}, which is no table of {' or '.join(map(repr, tenancy.searched))}"
            )
        elif oid in tenant_oids:
            problems.append(f"[tenancy] follow names {name}, which holds the tenant column: its rows are moved anyway")
        elif oid not in pkeys:
            problems.append(f"[tenancy] follow names {name}, which has no primary key to copy its rows by")
        else:
            found.add(oid)
    return found


def _suspects(
    global_tables: list[str], owned: list[str], columns: dict[int, list[Column]], foreign: Edges, names: dict[int, str]
) -> tuple[str, ...]:
    """`x_id` columns of global tables, in no foreign key, named after a tenant table (`x`, `xs`, `xes`, `xies`)."""
    found = []
    for oid, name in sorted(names.items(), key=lambda item: item[1]):
        if name not in global_tables:
            continue
        keyed = {c for _, fk in foreign[oid] for c in fk.columns}
        for column in columns[oid]:
            stem = column.name.lower().removesuffix("_id")
            if stem == column.name.lower() or column.name in keyed:
                continue
            plural = {stem, f"{stem}s", f"{stem}es", f"{stem[:-1]}ies"}
            parent = next((t for t in owned if t.lower() in plural), None)
            if parent is not None:
                found.append(f"{name}.{column.name} (like {parent})")
    return tuple(found)


# Column sets of each unique index (and primary key) that is valid, immediate and not partial.
_UNIQUE_SETS = """
SELECT i.indrelid, ARRAY(SELECT a.attname FROM unnest(i.indkey) u(attnum)
                         JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = u.attnum ORDER BY a.attname)
FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = ANY(%s) AND i.indisunique AND i.indisvalid AND i.indpred IS NULL AND i.indexprs IS NULL
"""


def _declared(
    conn: psycopg.Connection[Any],
    tenancy: Tenancy,
    names: dict[int, str],
    schema_of: dict[int, str],
    columns: dict[int, list[Column]],
    problems: list[str],
) -> list[tuple[int, ForeignKey]]:
    """`[tenancy.references]` as foreign keys, each checked like one: tables and columns that exist,
    and parent columns that are unique (a row has one parent, so one tenant)."""
    if not tenancy.references:
        return []
    oids = {name: oid for oid, name in names.items()}
    unique = {(oid, tuple(cols)) for oid, cols in conn.execute(_UNIQUE_SETS, (tenancy.searched,)).fetchall()}
    found = []
    for ref in tenancy.references:
        missing = [
            f"{table}.{col}" if table in oids else table
            for table, cols in ((ref.table, ref.columns), (ref.parent, ref.parent_columns))
            for col in cols
            if table not in oids or col not in {c.name for c in columns[oids[table]]}
        ]
        if missing:
            where = " or ".join(repr(s) for s in tenancy.searched)
            problems.append(f"{ref.name}: no {', '.join(dict.fromkeys(missing))} in schema {where}")
        elif (oids[ref.parent], tuple(sorted(ref.parent_columns))) not in unique:
            problems.append(
                f"{ref.name}: {ref.parent}.{','.join(ref.parent_columns)} is not a unique key, so a row could have "
                "parents of several tenants; name the parent's primary key or a unique key"
            )
        else:
            parent_schema = schema_of[oids[ref.parent]]
            fk = ForeignKey(ref.name, ref.columns, ref.parent, ref.parent_columns, True, parent_schema)
            found.append((oids[ref.table], fk))
    return found


def _find_paths(
    candidates: set[int],
    tenant_oids: dict[int, str | None],
    foreign: Edges,
    names: dict[int, str],
    schema_of: dict[int, str],
    problems: list[str],
) -> dict[int, tuple[Path, ...]]:
    """Every simple path of foreign keys from each candidate table to a table with the tenant column.

    A table that reaches none stays global. Every foreign key into a tenant or path table counts (not
    only the shortest way): a row whose only non-NULL reference is a longer one still belongs to a
    tenant. Self-references are left to `tree` (a row's parent has the row's tenant: preflight proves it).
    """
    reaching: set[int] = set()
    while grown := {
        oid
        for oid in candidates - reaching
        if any(ref in tenant_oids or ref in reaching for ref, _ in foreign[oid] if ref != oid)
    }:
        reaching |= grown

    def walk(oid: int, seen: frozenset[int]) -> list[Path]:
        found: list[Path] = []
        for ref, fk in foreign[oid]:
            if ref in seen or ref == oid or not (ref in tenant_oids or ref in reaching):
                continue
            hop = Hop(fk.name, fk.columns, schema_of[ref], names[ref], fk.parent_columns)
            key = tenant_oids.get(ref)
            if key is not None:
                found.append(Path((hop,), key))
            elif len(seen) < MAX_HOPS:
                found += [Path((hop, *p.hops), p.key) for p in walk(ref, seen | {ref})]
        return found

    paths: dict[int, tuple[Path, ...]] = {}
    for oid in sorted(reaching, key=lambda o: names[o]):
        found = walk(oid, frozenset({oid}))
        if not found:
            problems.append(
                f"table {label(schema_of[oid], names[oid])} reaches tenant tables only through more than "
                f"{MAX_HOPS} foreign keys; a move does not follow paths that long"
            )
        elif len(found) > MAX_PATHS:
            problems.append(
                f"table {label(schema_of[oid], names[oid])} reaches tenant tables by {len(found)} foreign-key "
                f"paths, more than the {MAX_PATHS} a move follows; exclude it or declare fewer references"
            )
        paths[oid] = tuple(found)
    return paths


def _copy_order(
    edges: Edges, names: dict[int, str], schema_of: dict[int, str], problems: list[str]
) -> tuple[list[int], dict[int, tuple[str, ...]]]:
    """Parents first: the strongly connected components of the foreign-key graph in topological order
    (ties by name, so every run copies in the same order), each cycle's tables ordered by its NOT
    DEFERRABLE foreign keys. Returns the order and, per table of a cycle, the cycle's table names.

    A cycle whose NOT DEFERRABLE foreign keys still form a cycle is added to `problems`.
    """
    parents = {oid: {ref for ref, _ in out if ref != oid} for oid, out in edges.items()}
    components = _components(parents, names)
    owner = {oid: i for i, component in enumerate(components) for oid in component}
    pending = {i: {owner[p] for oid in c for p in parents[oid]} - {i} for i, c in enumerate(components)}
    ordered: list[int] = []
    cycles: dict[int, tuple[str, ...]] = {}
    while pending:
        ready = min((i for i, deps in pending.items() if not deps), key=lambda i: min(names[o] for o in components[i]))
        del pending[ready]
        for deps in pending.values():
            deps.discard(ready)
        members = components[ready]
        if len(members) == 1:
            ordered.extend(members)
            continue
        strict = {
            oid: {ref for ref, fk in edges[oid] if ref in members and ref != oid and not fk.deferrable}
            for oid in members
        }
        inner: list[int] = []
        while strict:
            free = sorted((o for o, deps in strict.items() if not deps), key=lambda o: names[o])
            if not free:
                tangled = sorted(strict, key=lambda o: names[o])
                through = ", ".join(
                    f"{fk.name} ({label(schema_of[o], names[o])} -> {fk.parent_label})"
                    for o in tangled
                    for ref, fk in edges[o]
                    if ref in strict and ref != o and not fk.deferrable
                )
                problems.append(
                    "foreign keys form a cycle between tenant tables "
                    f"({', '.join(label(schema_of[o], names[o]) for o in tangled)}) through NOT DEFERRABLE constraints "
                    f"{through}; make one of them DEFERRABLE (ALTER TABLE ... ALTER CONSTRAINT ... DEFERRABLE) so "
                    "the cycle can be copied in one transaction"
                )
                inner.extend(tangled)
                break
            inner.extend(free)
            for o in free:
                del strict[o]
            for deps in strict.values():
                deps.difference_update(free)
        ordered.extend(inner)
        for oid in inner:
            cycles[oid] = tuple(names[o] for o in inner)
    return ordered, cycles


def _components(parents: dict[int, set[int]], names: dict[int, str]) -> list[list[int]]:
    """Tarjan's strongly connected components of the graph child -> parents."""
    index: dict[int, int] = {}
    low: dict[int, int] = {}
    stack: list[int] = []
    on_stack: set[int] = set()
    found: list[list[int]] = []

    def visit(oid: int) -> None:
        index[oid] = low[oid] = len(index)
        stack.append(oid)
        on_stack.add(oid)
        for ref in sorted(parents[oid], key=lambda o: names[o]):
            if ref not in index:
                visit(ref)
                low[oid] = min(low[oid], low[ref])
            elif ref in on_stack:
                low[oid] = min(low[oid], index[ref])
        if low[oid] == index[oid]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == oid:
                    break
            found.append(component)

    for oid in sorted(parents, key=lambda o: names[o]):
        if oid not in index:
            visit(oid)
    return found


def tenant_filter(table: Table, tenants: Cohort, alias: sql.Composable | None = None) -> sql.Composed:
    """The tenants' rows of `table`: `"key" = 'tenant'` (`IN (...)` for a cohort), or for a path table
    its paths' EXISTS (`paths.member_filter`). `alias` qualifies the row's columns: required where
    the query reads the table under an alias; without one, a path table's columns are qualified by
    the table's name (its paths' subqueries read parents with columns of the same names)."""
    if table.key is None:
        return member_filter(table.paths, tuple(tenants), alias if alias is not None else table.ident)
    key = sql.SQL("{}.{}").format(alias, sql.Identifier(table.key)) if alias is not None else sql.Identifier(table.key)
    return tenants_match(key, tuple(tenants))


def tenant_text(table: Table, alias: sql.Composable) -> sql.Composed:
    """The tenant of a row of `table` (qualified by `alias`) as text: its key column's, or its paths'."""
    if table.key is None:
        return owner_text(table.paths, alias)
    return sql.SQL("{}.{}::text").format(alias, sql.Identifier(table.key))


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
