"""A stamp's structural fingerprint: what its application schemas contain, read from `pg_catalog` in one
statement, normalised, and hashed, so that stamps at the same revision can be told apart when a hand,
an incident or an old tool changed one of them.

Counted: tables and their partitioning, columns (type, nullability, default, generated, identity,
collation), constraints with their definitions, indexes (`pg_get_indexdef`), triggers, views and
materialized views, functions, sequences, types (enums, domains, composites, ranges), extensions with
their versions and row-level security (the tables' switches and their policies).

Normalised: columns are keyed by name (their physical order does not count); a partition is named by
its parent and bounds, never its own name; what PostgreSQL derives for partitions (their columns,
the indexes, constraints and triggers cloned from the parent) is left out; OIDs never appear. Left
out too: migrator's own `_migrator` schema and the guard triggers it installs on tenant tables,
objects that belong to an extension (the extension and its version count instead), ownership and
grants (`migrator stamp check` judges the privileges a move needs), and sequences' start values
(`keys stride` restarts them per stamp).

    found = fingerprint(conn)             # every application schema; or fingerprint(conn, ["public"])
    found.digest                          # 12 hex digits, equal on structurally equal stamps
    compare(found, other)                 # the objects that differ, each with the DDL of both sides

Used by `schema status` (one digest per stamp), `schema diff`, a move's preflight and `stamp create`.

`schema status` reads a stamp's digest through `cached_digest`: the digest last read there is kept in
the stamp (`_migrator.fingerprint`) with a marker of its catalog, the (ctid, xmin) of every row of the
catalogs the fingerprint reads. Any DDL writes, replaces or deletes such a row, and a row written
later has another xmin, so the marker is exact: equal markers, same catalog rows, same structure. It
costs a few scans of small catalogs instead of the fingerprint's deparsing, which in a new session
(every stamp's: a session serves one database) mostly fills catalog caches.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import errors, sql

import migrator
from migrator.db.locks import xact_lock
from migrator.stamps.access import DDL_LOCK, SCHEMA

logger = logging.getLogger(__name__)

DIGEST_LENGTH = 12  # hex digits: ample to tell the structures of a fleet apart
SHORT = 4  # hex digits `schema status` shows, unless two structures share them

# Kinds of objects, as messages name them.
TABLE, COLUMN, CONSTRAINT, INDEX, TRIGGER, POLICY = "table", "column", "constraint", "index", "trigger", "policy"
VIEW, FUNCTION, SEQUENCE, TYPE, EXTENSION = "view", "function", "sequence", "type", "extension"

# One row per object: kind, name, the table it belongs to (None for free-standing objects), whether
# it is a unique index, its DDL, and its normal form (what the digest counts) when that differs.
_OBJECTS = r"""
WITH RECURSIVE ns AS (
    SELECT oid, nspname FROM pg_namespace
    WHERE nspname <> %(own)s AND CASE WHEN %(schemas)s::text[] IS NULL
        THEN nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast') AND nspname NOT LIKE 'pg\_%%'
        ELSE nspname = ANY(%(schemas)s::text[]) END
),
rel AS (
    SELECT c.oid, c.relkind, c.relname, c.relispartition, c.relpersistence, c.relrowsecurity,
           c.relforcerowsecurity, c.relpartbound,
           CASE WHEN n.nspname = 'public' THEN c.relname::text ELSE n.nspname || '.' || c.relname END AS label
    FROM pg_class c JOIN ns n ON n.oid = c.relnamespace
    WHERE c.relkind IN ('r', 'p', 'f', 'v', 'm', 'S')
      AND NOT EXISTS (SELECT 1 FROM pg_depend m WHERE m.classid = 'pg_class'::regclass AND m.objid = c.oid
      AND m.deptype = 'e')
),
named (oid, name, parent) AS (  -- a partition is named by its parent and bounds, never its own name
    SELECT oid, label COLLATE "C", NULL::text COLLATE "C" FROM rel WHERE NOT relispartition
    UNION ALL
    SELECT r.oid, p.name || ' ' || pg_get_expr(r.relpartbound, r.oid), p.name
    FROM named p JOIN pg_inherits i ON i.inhparent = p.oid JOIN rel r ON r.oid = i.inhrelid AND r.relispartition
),
tab AS (SELECT r.*, n.name, n.parent FROM rel r JOIN named n USING (oid))
SELECT 'table', t.name, t.name, false, d.head || ' ' || t.label || d.body,
       CASE WHEN t.relispartition THEN d.head || d.body END
FROM tab t, LATERAL (SELECT
    'CREATE ' || CASE t.relpersistence WHEN 'u' THEN 'UNLOGGED ' ELSE '' END
    || CASE t.relkind WHEN 'f' THEN 'FOREIGN ' ELSE '' END || 'TABLE' AS head,
    CASE WHEN t.relispartition THEN ' PARTITION OF ' || t.parent || ' ' || pg_get_expr(t.relpartbound, t.oid)
         ELSE '' END
    || CASE WHEN t.relkind = 'p' THEN ' PARTITION BY ' || pg_get_partkeydef(t.oid) ELSE '' END
    || CASE WHEN t.relrowsecurity THEN '; ROW LEVEL SECURITY ENABLED' ELSE '' END
    || CASE WHEN t.relforcerowsecurity THEN '; ROW LEVEL SECURITY FORCED' ELSE '' END AS body) d
WHERE t.relkind IN ('r', 'p', 'f')
UNION ALL
SELECT 'column', t.name || '.' || a.attname, t.name, false,
       format_type(a.atttypid, a.atttypmod)
       || CASE WHEN a.attcollation <> 0 AND a.attcollation <> ty.typcollation
               THEN ' COLLATE ' || a.attcollation::regcollation::text ELSE '' END
       || CASE WHEN a.attnotnull THEN ' NOT NULL' ELSE '' END
       || CASE WHEN a.attgenerated = 's' THEN ' GENERATED ALWAYS AS (' || pg_get_expr(d.adbin, d.adrelid) || ') STORED'
               WHEN d.adbin IS NOT NULL THEN ' DEFAULT ' || pg_get_expr(d.adbin, d.adrelid) ELSE '' END
       || CASE a.attidentity WHEN 'a' THEN ' GENERATED ALWAYS AS IDENTITY'
                             WHEN 'd' THEN ' GENERATED BY DEFAULT AS IDENTITY' ELSE '' END,
       NULL
FROM tab t JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum > 0 AND NOT a.attisdropped
JOIN pg_type ty ON ty.oid = a.atttypid
LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
WHERE t.relkind IN ('r', 'p', 'f') AND NOT t.relispartition
UNION ALL
SELECT 'constraint', t.name || '.' || c.conname, t.name, false, pg_get_constraintdef(c.oid), NULL
FROM tab t JOIN pg_constraint c ON c.conrelid = t.oid
WHERE c.conparentid = 0 AND c.conislocal
UNION ALL
SELECT 'index', CASE WHEN t.relispartition THEN t.name || '.' || i.relname
                    WHEN n.nspname = 'public' THEN i.relname::text ELSE n.nspname || '.' || i.relname END,
       t.name, x.indisunique, pg_get_indexdef(x.indexrelid), NULL
FROM tab t JOIN pg_index x ON x.indrelid = t.oid JOIN pg_class i ON i.oid = x.indexrelid
JOIN pg_namespace n ON n.oid = i.relnamespace
WHERE NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = x.indexrelid AND c.contype IN ('p', 'u', 'x'))
  AND NOT EXISTS (SELECT 1 FROM pg_inherits h WHERE h.inhrelid = x.indexrelid)
UNION ALL
SELECT 'trigger', t.name || '.' || g.tgname, t.name, false,
       pg_get_triggerdef(g.oid)
       || CASE g.tgenabled WHEN 'D' THEN '; DISABLED' WHEN 'A' THEN '; ENABLED ALWAYS'
                           WHEN 'R' THEN '; ENABLED REPLICA' ELSE '' END,
       NULL
FROM tab t JOIN pg_trigger g ON g.tgrelid = t.oid JOIN pg_proc p ON p.oid = g.tgfoid
JOIN pg_namespace pn ON pn.oid = p.pronamespace
WHERE NOT g.tgisinternal AND g.tgparentid = 0 AND pn.nspname <> %(own)s
UNION ALL
SELECT 'policy', t.name || '.' || p.polname, t.name, false,
       format('CREATE POLICY %%I ON %%s AS %%s FOR %%s TO %%s', p.polname, t.label,
              CASE WHEN p.polpermissive THEN 'PERMISSIVE' ELSE 'RESTRICTIVE' END,
              CASE p.polcmd WHEN 'r' THEN 'SELECT' WHEN 'a' THEN 'INSERT' WHEN 'w' THEN 'UPDATE'
                            WHEN 'd' THEN 'DELETE' ELSE 'ALL' END,
              (SELECT string_agg(CASE WHEN r = 0 THEN 'public' ELSE quote_ident(pg_get_userbyid(r)) END, ', '
                                 ORDER BY 1)
               FROM unnest(p.polroles) r))
       || coalesce(' USING (' || pg_get_expr(p.polqual, p.polrelid) || ')', '')
       || coalesce(' WITH CHECK (' || pg_get_expr(p.polwithcheck, p.polrelid) || ')', ''),
       NULL
FROM tab t JOIN pg_policy p ON p.polrelid = t.oid
UNION ALL
SELECT 'view', t.name, NULL, false,
       'CREATE ' || CASE t.relkind WHEN 'm' THEN 'MATERIALIZED ' ELSE '' END || 'VIEW ' || t.label
       || ' AS ' || pg_get_viewdef(t.oid),
       NULL
FROM tab t WHERE t.relkind IN ('v', 'm')
UNION ALL
SELECT 'sequence', t.name, NULL, false,
       format('CREATE SEQUENCE %%s AS %%s INCREMENT BY %%s MINVALUE %%s MAXVALUE %%s CACHE %%s%%s', t.label,
              format_type(s.seqtypid, NULL), s.seqincrement, s.seqmin, s.seqmax, s.seqcache,
              CASE WHEN s.seqcycle THEN ' CYCLE' ELSE '' END),
       NULL
FROM tab t JOIN pg_sequence s ON s.seqrelid = t.oid
UNION ALL
SELECT 'function',
       CASE WHEN n.nspname = 'public' THEN '' ELSE n.nspname || '.' END || p.proname
       || '(' || pg_get_function_identity_arguments(p.oid) || ')',
       NULL, false,
       CASE WHEN p.prokind = 'a' THEN 'CREATE AGGREGATE ' || p.oid::regprocedure::text
            ELSE pg_get_functiondef(p.oid) END,
       NULL
FROM pg_proc p JOIN ns n ON n.oid = p.pronamespace
WHERE NOT EXISTS (SELECT 1 FROM pg_depend m WHERE m.classid = 'pg_proc'::regclass AND m.objid = p.oid
      AND m.deptype = 'e')
UNION ALL
SELECT 'type', CASE WHEN n.nspname = 'public' THEN '' ELSE n.nspname || '.' END || ty.typname, NULL, false,
       CASE ty.typtype
           WHEN 'e' THEN format('CREATE TYPE %%s AS ENUM (%%s)', ty.oid::regtype,
               (SELECT string_agg(quote_literal(e.enumlabel), ', ' ORDER BY e.enumsortorder)
                FROM pg_enum e WHERE e.enumtypid = ty.oid))
           WHEN 'd' THEN format('CREATE DOMAIN %%s AS %%s', ty.oid::regtype, format_type(ty.typbasetype, ty.typtypmod))
               || CASE WHEN ty.typnotnull THEN ' NOT NULL' ELSE '' END
               || coalesce(' DEFAULT ' || ty.typdefault, '')
               || coalesce((SELECT string_agg(' CONSTRAINT ' || quote_ident(c.conname) || ' '
                                              || pg_get_constraintdef(c.oid), '' ORDER BY c.conname)
                            FROM pg_constraint c WHERE c.contypid = ty.oid), '')
           WHEN 'c' THEN format('CREATE TYPE %%s AS (%%s)', ty.oid::regtype,
               (SELECT string_agg(quote_ident(a.attname) || ' ' || format_type(a.atttypid, a.atttypmod), ', '
                                  ORDER BY a.attnum)
                FROM pg_attribute a WHERE a.attrelid = ty.typrelid AND a.attnum > 0 AND NOT a.attisdropped))
           WHEN 'r' THEN format('CREATE TYPE %%s AS RANGE (SUBTYPE = %%s)', ty.oid::regtype,
               (SELECT format_type(r.rngsubtype, NULL) FROM pg_range r WHERE r.rngtypid = ty.oid))
           ELSE 'CREATE TYPE ' || ty.oid::regtype::text
       END,
       NULL
FROM pg_type ty JOIN ns n ON n.oid = ty.typnamespace
WHERE ty.typtype IN ('e', 'd', 'c', 'r', 'b')
  AND (ty.typrelid = 0 OR (SELECT c.relkind FROM pg_class c WHERE c.oid = ty.typrelid) = 'c')
  AND NOT EXISTS (SELECT 1 FROM pg_type el WHERE el.typarray = ty.oid)
  AND NOT EXISTS (SELECT 1 FROM pg_depend m WHERE m.classid = 'pg_type'::regclass AND m.objid = ty.oid
      AND m.deptype = 'e')
UNION ALL
SELECT 'extension', e.extname, NULL, false,
       format('CREATE EXTENSION %%I VERSION %%L SCHEMA %%I', e.extname, e.extversion, n.nspname), NULL
FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
"""


@dataclass(frozen=True)
class SchemaObject:
    """One object of a stamp's structure, named as messages name it (`notes.body`, `tasks_due_idx`)."""

    kind: str
    name: str
    table: str | None  # the table it belongs to (a column's, an index's...), None for free-standing objects
    ddl: str  # what it is: a column's type and modifiers, the CREATE statement of anything else
    normal: str  # what the digest counts: the DDL without what may differ between equal stamps
    unique: bool = False  # a unique index

    @property
    def key(self) -> tuple[str, str]:
        return self.kind, self.name


@dataclass(frozen=True)
class Fingerprint:
    """A stamp's structure: its objects by (kind, name), and their digest."""

    objects: Mapping[tuple[str, str], SchemaObject]
    digest: str

    @classmethod
    def of(cls, objects: Iterable[SchemaObject]) -> Fingerprint:
        found = {o.key: o for o in objects}
        lines = sorted(f"{kind}\x1f{name}\x1f{o.normal}\x1f{o.unique}" for (kind, name), o in found.items())
        digest = hashlib.sha256("\x1e".join(lines).encode()).hexdigest()[:DIGEST_LENGTH]
        return cls(found, digest)


def fingerprint(conn: psycopg.Connection[Any], schemas: Sequence[str] | None = None) -> Fingerprint:
    """The stamp's fingerprint over `schemas` (default: every schema but PostgreSQL's and `_migrator`);
    one statement, read-only."""
    rows = conn.execute(_OBJECTS, {"schemas": list(schemas) if schemas is not None else None, "own": SCHEMA})
    return Fingerprint.of(
        SchemaObject(kind, name, table, ddl, normal if normal is not None else ddl, unique)
        for kind, name, table, unique, ddl, normal in rows.fetchall()
    )


# The catalogs the fingerprint reads, directly or through the deparsers (pg_get_viewdef reads pg_rewrite;
# pg_get_indexdef and pg_get_constraintdef name operator classes, operators and collations; pg_get_expr
# names text search configurations; pg_get_functiondef names languages), with, for the three large
# ones, the column whose values under 16384 (PostgreSQL's FirstNormalObjectId) are initdb's own objects,
# which only a superuser could change: they are left out of the marker. Any other row counts.
WATCHED: dict[str, str | None] = {
    "pg_namespace": None,
    "pg_extension": None,
    "pg_class": None,
    "pg_attribute": "attrelid",
    "pg_attrdef": None,
    "pg_constraint": None,
    "pg_index": None,
    "pg_inherits": None,
    "pg_partitioned_table": None,
    "pg_trigger": None,
    "pg_policy": None,
    "pg_rewrite": None,
    "pg_sequence": None,
    "pg_proc": "oid",
    "pg_type": None,
    "pg_enum": None,
    "pg_range": None,
    "pg_depend": "objid",
    "pg_collation": None,
    "pg_opclass": None,
    "pg_operator": None,
    "pg_am": None,
    "pg_language": None,
    "pg_ts_config": None,
    "pg_ts_dict": None,
}
FIRST_NORMAL_OID = 16384
CACHE = "fingerprint"  # `_migrator.fingerprint`: one row, the digest last read and the marker it was read at
# What else decides the digest: this query and migrator's version (a newer one may count otherwise).
_READER = hashlib.sha256(f"{migrator.__version__}\x1e{_OBJECTS}".encode()).hexdigest()[:12]


def _marker() -> sql.Composed:
    """One row: the marker of the session's view of the catalog. Besides the rows' versions, the roles
    policies name (pg_authid cannot be read) and the settings the deparsers follow: the search path
    (which names they qualify) and the server's version. Rows are hashed in scan order: another order
    only changes the marker, which costs a fingerprint read in full, never a stale digest."""
    parts: list[sql.Composable] = [
        sql.SQL("SELECT {name}, md5(string_agg(ctid::text || xmin::text, ',')) FROM {table}{where}").format(
            name=sql.Literal(table),
            table=sql.Identifier("pg_catalog", table),
            where=sql.SQL(" WHERE {} >= {}").format(sql.Identifier(column), sql.Literal(FIRST_NORMAL_OID))
            if column
            else sql.SQL(""),
        )
        for table, column in WATCHED.items()
    ]
    parts.append(sql.SQL("SELECT 'roles', string_agg(r::regrole::text, ',') FROM pg_policy, unnest(polroles) r"))
    return sql.SQL(
        "SELECT md5(string_agg(part || ':' || coalesce(hash, ''), ',') || current_setting('search_path')"
        " || current_setting('server_version_num')) || ':' || {reader} FROM ({parts}) m (part, hash)"
    ).format(reader=sql.Literal(_READER), parts=sql.SQL(" UNION ALL ").join(parts))


_MARKER = _marker()
_CACHED = sql.SQL(
    "SELECT m.marker, (SELECT f.digest FROM {cache} f WHERE f.marker = m.marker) FROM ({marker}) m (marker)"
).format(cache=sql.Identifier(SCHEMA, CACHE), marker=_MARKER)


def cached_digest(conn: psycopg.Connection[Any]) -> str:
    """`fingerprint(conn).digest`, from the stamp's cache when its catalog has not changed since it was
    read (one statement), else read in full and kept there. Without the right to keep it (no CREATE on
    the database, a read-only server) the fingerprint is read in full every time. `conn`: autocommit."""
    try:
        row = conn.execute(_CACHED).fetchone()
        marker, digest = (row[0], row[1]) if row else (None, None)
    except (errors.UndefinedTable, errors.InvalidSchemaName):  # the stamp's first: make the cache
        marker, digest = _make_cache(conn), None
    except errors.InsufficientPrivilege as exc:
        logger.info("fingerprint cache not readable: %s", exc)
        marker, digest = None, None
    if digest is not None:
        return str(digest)
    found = fingerprint(conn).digest  # after the marker: a change in between only makes the marker older
    if marker is not None:
        _keep(conn, str(marker), found)
    return found


def _make_cache(conn: psycopg.Connection[Any]) -> str | None:
    """Create `_migrator.fingerprint` under migrator's DDL lock; the marker after it (its own rows
    count), or None when this role may not."""
    try:
        with conn.transaction():
            xact_lock(conn, DDL_LOCK)
            conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(SCHEMA)))
            conn.execute(
                sql.SQL(
                    "CREATE TABLE IF NOT EXISTS {} (one boolean PRIMARY KEY DEFAULT true CHECK (one),"
                    " marker text NOT NULL, digest text NOT NULL, read_at timestamptz NOT NULL DEFAULT now())"
                ).format(sql.Identifier(SCHEMA, CACHE))
            )
    except (errors.InsufficientPrivilege, errors.ReadOnlySqlTransaction) as exc:
        logger.info("no fingerprint cache: %s", exc)
        return None
    row = conn.execute(_MARKER).fetchone()
    return str(row[0]) if row else None


def _keep(conn: psycopg.Connection[Any], marker: str, digest: str) -> None:
    try:
        conn.execute(
            sql.SQL(
                "INSERT INTO {} (marker, digest) VALUES (%s, %s)"
                " ON CONFLICT (one) DO UPDATE SET marker = excluded.marker, digest = excluded.digest, read_at = now()"
            ).format(sql.Identifier(SCHEMA, CACHE)),
            (marker, digest),
        )
    except (errors.InsufficientPrivilege, errors.ReadOnlySqlTransaction) as exc:
        logger.info("fingerprint not kept: %s", exc)


@dataclass(frozen=True)
class Difference:
    """One object that differs between two stamps: missing on one side (None), or defined otherwise."""

    kind: str
    name: str
    ours: SchemaObject | None
    theirs: SchemaObject | None

    @property
    def table(self) -> str | None:
        side = self.ours if self.ours is not None else self.theirs
        return side.table if side is not None else None

    def describe(self, ours: str, theirs: str) -> str:
        """`index tasks_due_idx: only on eu-7 (CREATE INDEX …)`, `column notes.body: text on eu-1,
        character varying(2000) on eu-7`: one line, whatever the DDL's own lines."""
        if self.theirs is None:
            return f"{self.kind} {self.name}: only on {ours} ({_one_line(self.ours)})"
        if self.ours is None:
            return f"{self.kind} {self.name}: only on {theirs} ({_one_line(self.theirs)})"
        return f"{self.kind} {self.name}: {_one_line(self.ours)} on {ours}, {_one_line(self.theirs)} on {theirs}"


def _one_line(found: SchemaObject | None) -> str:
    return " ".join(found.ddl.split()) if found is not None else ""


def compare(ours: Fingerprint, theirs: Fingerprint) -> list[Difference]:
    """Every object that differs, in kind and name order."""
    found = []
    for key in sorted(set(ours.objects) | set(theirs.objects)):
        a, b = ours.objects.get(key), theirs.objects.get(key)
        if a is None or b is None or (a.normal, a.unique) != (b.normal, b.unique):
            found.append(Difference(key[0], key[1], a, b))
    return found


def short_length(digests: Iterable[str]) -> int:
    """How many leading hex digits tell these digests apart (at least SHORT): what `schema status` shows."""
    distinct = set(digests)
    for length in range(SHORT, DIGEST_LENGTH):
        if len({d[:length] for d in distinct}) == len(distinct):
            return length
    return DIGEST_LENGTH
