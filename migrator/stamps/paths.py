"""Tables that reach the tenant only through foreign keys (invoice lines under invoices), and the SQL
that finds a tenant's rows in them.

A table without the tenant column belongs to tenants when a foreign key leads from it to a tenant
table, directly or through other such tables (a *path table*). A row's tenant is its parent's
tenant; a row whose path columns are all NULL belongs to no tenant, like a NULL tenant column. A
table may have several paths (nullable `task_id` and `comment_id`): a row belongs to the tenant any
of its non-NULL paths leads to, and preflight refuses rows whose paths lead to different tenants.

The SQL is built from the paths alone, so every step of a move (copy, capture, verify, cleanup)
asks "is this row the tenant's" the same way:
- `member_filter`: nested correlated EXISTS, `EXISTS (SELECT FROM invoice_lines p2 WHERE (p2.id) =
  (notes.line_id) AND EXISTS (SELECT FROM invoices p1 WHERE (p1.id) = (p2.invoice_id) AND
  p1.account_id = 7))`. Where it is the whole condition, PostgreSQL makes it a semi-join and hashes
  the tenant's parent keys once: a path table copies and verifies at about the speed of a table
  carrying the tenant column (see `scripts/bench move --schema paths`). Under OR (several paths) or
  NOT (cleanup's proof) it is run per row: by one hash of the parents where they fit in hash_mem
  (work_mem x hash_mem_multiplier), else by an index probe per hop. An uncorrelated IN there,
  once the parents outgrew hash_mem, rescanned all of them for every row.
- `owner_text`: the tenant of one row as text, by one index probe per hop (the guard trigger's
  lookup, and per-tenant figures of a cohort).
"""

from __future__ import annotations

from dataclasses import dataclass

from psycopg import sql

MAX_PATHS = 16  # paths of one table; more is a schema a move should not guess its way through
MAX_HOPS = 8


@dataclass(frozen=True)
class Hop:
    """One foreign key on a path: `columns` of the table reference `parent_columns` of `parent`.

    `constraint` names the foreign key, or the `[tenancy.references]` entry that declares it.
    """

    constraint: str
    columns: tuple[str, ...]
    parent_schema: str
    parent: str
    parent_columns: tuple[str, ...]

    @property
    def parent_ident(self) -> sql.Identifier:
        return sql.Identifier(self.parent_schema, self.parent)


@dataclass(frozen=True)
class Path:
    """Foreign keys from a path table up to a table carrying the tenant column `key` (the last hop's parent)."""

    hops: tuple[Hop, ...]
    key: str

    @property
    def columns(self) -> tuple[str, ...]:
        """The path table's own columns this path starts from."""
        return self.hops[0].columns

    def describe(self, table: str) -> str:
        """`invoice_lines.invoice_id -> invoices.account_id`: how a row of `table` reaches its tenant."""
        steps = [f"{table}.{','.join(self.hops[0].columns)}"]
        steps += [f"{hop.parent}.{','.join(nxt.columns)}" for hop, nxt in zip(self.hops, self.hops[1:], strict=False)]
        steps.append(f"{self.hops[-1].parent}.{self.key}")
        return " -> ".join(steps)


def qualified(alias: str | sql.Composable, columns: tuple[str, ...]) -> sql.Composed:
    """`a.c1, a.c2`: columns qualified by a table alias (a name, or SQL such as plpgsql's NEW)."""
    prefix = sql.Identifier(alias) if isinstance(alias, str) else alias
    return sql.SQL(", ").join(sql.SQL("{}.{}").format(prefix, sql.Identifier(c)) for c in columns)


def _row_cols(alias: sql.Composable, columns: tuple[str, ...]) -> sql.Composed:
    """`(a.c1, a.c2)`: a row's columns, qualified by `alias`."""
    return sql.SQL("({})").format(qualified(alias, columns))


def tenants_match(key: sql.Composable, tenants: tuple[str, ...]) -> sql.Composed:
    """`key = 'a'` or `key IN ('a', 'b')`, the tenants as literals of unknown type (typed by the column).

    COPY statements cannot take server-side parameters; PostgreSQL infers a literal's type from the
    column (bigint, uuid, text...), which `= ANY(array)` would not: the array would be text[].
    """
    if len(tenants) == 1:
        return sql.SQL("{} = {}").format(key, sql.Literal(tenants[0]))
    return sql.SQL("{} IN ({})").format(key, sql.SQL(", ").join(sql.Literal(t) for t in tenants))


def _path_exists(hops: tuple[Hop, ...], key: str, tenants: tuple[str, ...], row: sql.Composable) -> sql.Composed:
    """The row (its columns qualified by `row`) has its parent on the path, of one of `tenants`."""
    hop, depth = hops[0], len(hops)
    inner = sql.Identifier(f"migrator_p{depth}")
    condition = (
        tenants_match(sql.SQL("{}.{}").format(inner, sql.Identifier(key)), tenants)
        if depth == 1
        else _path_exists(hops[1:], key, tenants, inner)
    )
    return sql.SQL("EXISTS (SELECT FROM {} {} WHERE {} = {} AND {})").format(
        hop.parent_ident, inner, _row_cols(inner, hop.parent_columns), _row_cols(row, hop.columns), condition
    )


def first_parents(path: Path, tenants: tuple[str, ...]) -> sql.Composed:
    """SELECT of the referenced columns of the tenants' rows in the path's first parent table."""
    hop, inner = path.hops[0], sql.Identifier("migrator_p0")
    rest = (
        tenants_match(sql.SQL("{}.{}").format(inner, sql.Identifier(path.key)), tenants)
        if len(path.hops) == 1
        else _path_exists(path.hops[1:], path.key, tenants, inner)
    )
    return sql.SQL("SELECT {} FROM {} {} WHERE {}").format(
        sql.SQL(", ").join(sql.SQL("{}.{}").format(inner, sql.Identifier(c)) for c in hop.parent_columns),
        hop.parent_ident,
        inner,
        rest,
    )


def member_filter(paths: tuple[Path, ...], tenants: tuple[str, ...], row: sql.Composable) -> sql.Composed:
    """The rows of a path table that belong to one of `tenants`: any of their paths leads there.

    `row` qualifies the row's columns (the table's alias, or its name): inside EXISTS an unqualified
    `id` would be the parent's.
    """
    parts = [_path_exists(p.hops, p.key, tenants, row) for p in paths]
    return sql.SQL("({})").format(sql.SQL(" OR ").join(parts))


def owner_text(paths: tuple[Path, ...], row: sql.Composable, text: sql.SQL | None = None) -> sql.Composed:
    """The tenant (as text) of the row whose columns `row` qualifies (a table alias, or plpgsql's NEW):
    the first of its paths that resolves; NULL when none does (its path columns NULL, or a parent gone).

    `text` formats the tenant column into text; `{}::text` by default, as the rest of migrator reads
    tenant keys (preflight requires a tenant's spelling to equal that text).
    """
    lookups = _lookups(paths, row, text)
    return sql.SQL("COALESCE({})").format(sql.SQL(", ").join(lookups)) if len(lookups) > 1 else lookups[0]


def owner_texts(paths: tuple[Path, ...], row: sql.Composable, text: sql.SQL | None = None) -> sql.Composed:
    """The tenant each path of the row leads to, as an array (NULL where one does not resolve): the
    guard fences and captures a write for every tenant any of its paths touches."""
    return sql.SQL("ARRAY[{}]").format(sql.SQL(", ").join(_lookups(paths, row, text)))


def _lookups(paths: tuple[Path, ...], row: sql.Composable, text: sql.SQL | None) -> list[sql.Composed]:
    """Per path, a scalar subquery of the row's tenant: one index probe per hop."""
    fmt = text if text is not None else sql.SQL("{}::text")
    lookups = []
    for path in paths:
        aliases = [sql.Identifier(f"migrator_o{i}") for i in range(len(path.hops))]
        joins = sql.SQL("").join(
            sql.SQL(" JOIN {} {} ON {} = {}").format(
                path.hops[i].parent_ident,
                aliases[i],
                _row_cols(aliases[i], path.hops[i].parent_columns),
                _row_cols(aliases[i - 1], path.hops[i].columns),
            )
            for i in range(1, len(path.hops))
        )
        lookups.append(
            sql.SQL("(SELECT {} FROM {} {}{} WHERE {} = {})").format(
                _format(fmt, aliases[-1], path.key),
                path.hops[0].parent_ident,
                aliases[0],
                joins,
                _row_cols(aliases[0], path.hops[0].parent_columns),
                _row_cols(row, path.columns),
            )
        )
    return lookups


def _format(fmt: sql.SQL, alias: sql.Identifier, key: str) -> sql.Composed:
    return fmt.format(sql.SQL("{}.{}").format(alias, sql.Identifier(key)))


def any_path_set(paths: tuple[Path, ...], row: sql.Composable) -> sql.Composed:
    """True when some path of the row has all its columns set (it points at a parent, present or not)."""
    return sql.SQL("({})").format(
        sql.SQL(" OR ").join(
            sql.SQL("({})").format(
                sql.SQL(" AND ").join(sql.SQL("{}.{} IS NOT NULL").format(row, sql.Identifier(c)) for c in path.columns)
            )
            for path in paths
        )
    )


def parent_missing(paths: tuple[Path, ...], row: sql.Composable) -> sql.Composed:
    """True when the row has a path set whose first parent is not there: a row no tenant owns here.

    A foreign key keeps the application from writing one; a copy as `replica` may, when it takes a
    child before catch-up brings its parent (see `cleanup.delete_debris`).
    """
    return sql.SQL("({})").format(
        sql.SQL(" OR ").join(
            sql.SQL("({} AND NOT EXISTS (SELECT 1 FROM {} migrator_parent WHERE {} = {}))").format(
                sql.SQL(" AND ").join(
                    sql.SQL("{}.{} IS NOT NULL").format(row, sql.Identifier(c)) for c in path.columns
                ),
                path.hops[0].parent_ident,
                _row_cols(sql.Identifier("migrator_parent"), path.hops[0].parent_columns),
                _row_cols(row, path.columns),
            )
            for path in paths
        )
    )
