"""Guessing `[tenancy]` from an existing application's database, for `migrator init --from-stamp`.

Only a proposal, printed with its reasons for the operator to confirm: the tenant column is the
tenant-key-like name that most tables share, and the root table is the one whose primary key that
column references by foreign key (by name, `account_id` -> `accounts`, when no foreign key says so).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from migrator import config as configlib
from migrator.config import Tenancy
from migrator.db import dsn as dsnlib
from migrator.errors import BadInput, PreflightError
from migrator.stamps import sequences
from migrator.stamps.access import connect_dsn
from migrator.stamps.discovery import Layout, inspect

# Names applications give the tenant key, best first (ties between equally common names go to the earlier).
CANDIDATES = (
    "tenant_id",
    "account_id",
    "organization_id",
    "organisation_id",
    "org_id",
    "workspace_id",
    "customer_id",
    "company_id",
    "team_id",
    "client_id",
    "tenant",
)
_ALEMBIC = "alembic_version"
# Names of a root table's column that says where a tenant's data must live, best first.
RESIDENCY_CANDIDATES = ("residency", "data_residency", "data_region", "residency_region", "home_region", "region")

_TABLES = """
SELECT c.oid, n.nspname, c.relname
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
  AND n.nspname NOT IN ('pg_catalog', 'information_schema', '_migrator') AND n.nspname NOT LIKE 'pg\\_%'
"""

_COLUMNS = """
SELECT a.attrelid, a.attname FROM pg_attribute a
WHERE a.attrelid = ANY(%s) AND a.attnum > 0 AND NOT a.attisdropped
"""

# Single-column primary keys, and single-column foreign keys with the column each one references.
_KEYS = """
SELECT con.contype, con.conrelid, a.attname, con.confrelid, fa.attname
FROM pg_constraint con
JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = con.conkey[1]
LEFT JOIN pg_attribute fa ON fa.attrelid = con.confrelid AND fa.attnum = con.confkey[1]
WHERE con.conrelid = ANY(%s) AND con.contype IN ('p', 'f') AND cardinality(con.conkey) = 1
"""


@dataclass(frozen=True)
class Guess:
    """The proposed tenancy, why (one line per choice), and whether the stamp uses Alembic."""

    tenancy: Tenancy
    reasons: tuple[str, ...]
    alembic: bool


def _candidate(name: str) -> bool:
    return name.lower() in CANDIDATES or "tenant" in name.lower()


def _rank(name: str) -> int:
    return CANDIDATES.index(name.lower()) if name.lower() in CANDIDATES else len(CANDIDATES)


def guess_tenancy(conn: psycopg.Connection[Any]) -> Guess:
    """Reflect the database and propose its `[tenancy]`; the defaults, with a reason, when nothing fits."""
    tables = {oid: (schema, name) for oid, schema, name in conn.execute(_TABLES).fetchall()}
    alembic = any(name == _ALEMBIC for _, name in tables.values())
    tables = {oid: t for oid, t in tables.items() if t[1] != _ALEMBIC}
    columns: dict[int, set[str]] = {oid: set() for oid in tables}
    for oid, column in conn.execute(_COLUMNS, (list(tables),)).fetchall():
        columns[oid].add(column)
    primary: dict[int, str] = {}
    references: list[tuple[int, str, int, str]] = []  # (table, column) -> (referenced table, its column)
    for kind, oid, column, ref, ref_column in conn.execute(_KEYS, (list(tables),)).fetchall():
        if kind == "p":
            primary[oid] = column
        elif ref in tables:
            references.append((oid, column, ref, ref_column))

    # How many tables of each schema carry each candidate column.
    shared = Counter((tables[oid][0], c) for oid, cols in columns.items() for c in cols if _candidate(c))
    if not shared:
        names = ", ".join(CANDIDATES[:4])
        return Guess(
            Tenancy(),
            (f"no tenant key column found (looked for names like {names}); [tenancy] holds the defaults: edit it",),
            alembic,
        )
    (schema, column), count = min(
        shared.items(), key=lambda item: (-item[1], _rank(item[0][1]), item[0][0] != "public", item[0])
    )
    in_schema = [oid for oid, (s, _) in tables.items() if s == schema]
    where = "" if schema == "public" else f" of schema {schema}"
    reasons = [f"tenancy column {column}: present in {count} of {len(in_schema)} tables{where}"]
    others = [
        f"{c if s == schema else f'{s}.{c}'} ({n})"
        for (s, c), n in sorted(shared.items(), key=lambda i: -i[1])
        if (s, c) != (schema, column)
    ]
    if others:
        reasons.append(f"  other candidates, in fewer tables: {', '.join(others[:3])}")

    # The root table: the one whose primary key the tenant column references most often.
    roots = Counter(
        (tables[ref][1], ref_column)
        for oid, col, ref, ref_column in references
        if col == column and tables[oid][0] == schema and tables[ref][0] == schema and primary.get(ref) == ref_column
    )
    if roots:
        (root, root_column), fks = min(roots.items(), key=lambda item: (-item[1], item[0]))
        reasons.append(f"root table {root} ({root_column}), referenced by {fks} foreign key{'s' * (fks != 1)}")
        return Guess(Tenancy(column, root, root_column, schema), tuple(reasons), alembic)
    stem = column.lower().removesuffix("_id")
    by_name = sorted(
        (tables[oid][1], primary[oid])
        for oid in in_schema
        if tables[oid][1].lower() in (stem, f"{stem}s") and oid in primary and column not in columns[oid]
    )
    if by_name:
        root, root_column = by_name[0]
        reasons.append(f"root table {root} ({root_column}): no foreign key references it by {column}, guessed by name")
        return Guess(Tenancy(column, root, root_column, schema), tuple(reasons), alembic)
    default = Tenancy()
    reasons.append(f"no root table found for {column}; [tenancy] root_table is left at {default.root_table!r}: edit it")
    return Guess(Tenancy(column, default.root_table, default.root_column, schema), tuple(reasons), alembic)


def placement(conn: psycopg.Connection[Any], tenancy: Tenancy) -> list[str]:
    """How a move would find tenant rows in each table under `tenancy`, one line each, and the columns
    that look like references but are none; refused (before anything is written) when the tenancy
    finds tenants in no table but the root."""
    try:
        layout = inspect(conn, tenancy)
    except PreflightError as exc:  # no root table: the guess says so already
        return [f"tables not placed: {exc}"]
    root_only = [p for p in layout.problems if "finds tenants in no table but the root" in p]
    if root_only:
        raise BadInput(root_only[0])
    lines = ["tables, and how a move finds a tenant's rows in each:"]
    lines += [f"  {table.label}: by {table.reach}" for table in sorted(layout.tables, key=lambda t: t.label)]
    lines += [f"  {name}: global (no tenant column, no foreign key to a tenant table)" for name in layout.global_tables]
    lines += [f"  {name}: excluded" for name in layout.excluded]
    if layout.suspects:
        lines.append("these look like references to tenant tables but are no foreign key; if they are, declare them")
        lines.append('in [tenancy.references] ("table.column" = "parent.column") or their rows stay behind:')
        lines += [f"  {suspect}" for suspect in layout.suspects]
    return lines + _sequence_keys(conn, layout)


def residency_column(conn: psycopg.Connection[Any], tenancy: Tenancy) -> str | None:
    """The root table's column that looks like each tenant's residency (`RESIDENCY_CANDIDATES`), if any."""
    found = {
        row[0].lower(): row[0]
        for row in conn.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_schema = %s AND table_name = %s",
            (tenancy.db_schema, tenancy.root_table),
        )
    }
    return next((found[name] for name in RESIDENCY_CANDIDATES if name in found), None)


def onboarding(column: str | None, tenancy: Tenancy) -> list[str]:
    """The step after `catalog init` and `stamp add` that routes a stamp's tenants with their residency."""
    if column is None:
        return [
            f"no residency column in {tenancy.root_table} (looked for {', '.join(RESIDENCY_CANDIDATES[:3])}, ...):",
            "  once a stamp is added, `migrator route import --stamp NAME` routes its tenants"
            " (--residency R[,R] gives them all one)",
        ]
    return [
        f"residency column {column} of {tenancy.root_table}: once a stamp is added, route its tenants each with",
        "  its residency (values name stamp regions: eu, or eu,us; empty: anywhere) with",
        f"  migrator route import --stamp NAME --residency-column {column}",
    ]


def _sequence_keys(conn: psycopg.Connection[Any], layout: Layout) -> list[str]:
    """The keys fed by sequences, and whether this stamp's are strided (in a block of their own)."""
    found = sequences.read(conn, layout)
    if not found:
        return []
    lines = ["keys fed by sequences (every stamp starts its own at 1: the same ids on every stamp):"]
    for key in found:
        risk = "unique on its own: collides when tenants move" if key.unique else "cannot collide (not unique alone)"
        lines.append(f"  {key.label} ({key.type}, {risk}; next id {key.next_value})")
    blocks = {sequences.block_of(k.next_value) for k in found if not k.narrow}
    if blocks and 0 not in blocks:
        lines.append(f"  this stamp's sequences are strided (block {', '.join(map(str, sorted(blocks)))})")
    elif any(k.unique for k in found):
        lines.append("  not strided: once the stamps are added, `migrator keys check` shows collisions and")
        lines.append("  `migrator keys stride` gives each stamp its own block of new ids")
    lines += [f"  {k.label} is {k.type}: too narrow to split across a fleet" for k in found if k.narrow]
    return lines


# `catalog_url` when `init` is not given one: the file must parse, and this says plainly what to change.
PLACEHOLDER_CATALOG = "postgresql://migrator@localhost:5432/migrator_catalog"


@dataclass(frozen=True)
class Written:
    """What `init_config` wrote: the file, and the notes atop it (what was guessed and why), to print."""

    path: Path
    notes: tuple[str, ...]


def init_config(path: Path, catalog_url: str | None, from_stamp: str | None, force: bool) -> Written:
    """`migrator init`: a commented migrator.toml, with the tenancy guessed from `from_stamp` if given.

    Checks the path before connecting anywhere, so a refusal changes nothing and costs nothing.
    """
    configlib.refuse_existing(path, force)
    guess = None
    notes: list[str] = []
    if from_stamp is not None:
        with connect_dsn(from_stamp, "the stamp given by --from-stamp") as conn:
            guess = guess_tenancy(conn)
            placed = placement(conn, guess.tenancy)
            residency = residency_column(conn, guess.tenancy)
        notes = [f"[tenancy] guessed from the stamp {dsnlib.mask(from_stamp)}:", *(f"  {r}" for r in guess.reasons)]
        notes += placed + onboarding(residency, guess.tenancy)
    if catalog_url is None:
        notes.append("catalog_url is a placeholder: set it (or pass --catalog, or $MIGRATOR_CATALOG_URL)")
    text = configlib.render(
        catalog_url or PLACEHOLDER_CATALOG,
        guess.tenancy if guess else Tenancy(),
        None,
        notes=notes,
        schema_hint=bool(guess and guess.alembic),
    )
    return Written(configlib.write(path, text, force=force), tuple(notes))
