"""Everything a move checks before its first write; each failure is one clear line and changes nothing."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from migrator import stamps
from migrator.catalog import Catalog, Cohort, Move, Route, Stamp, describe_move, name_tenants, policy
from migrator.config import Tenancy
from migrator.db import dsn as dsnlib
from migrator.db.alembic import read_revision
from migrator.db.dsn import WriteMode
from migrator.errors import BadInput, PreflightError
from migrator.move import follow, integrity, shapes
from migrator.stamps import checks
from migrator.stamps.checks import Problems
from migrator.stamps.discovery import Layout, Table, inspect, tenant_filter, tenant_text

log = logging.getLogger("migrator.preflight")


@dataclass(frozen=True)
class Checked:
    """What preflight established, handed to the copy so nothing is looked up twice."""

    tenants: Cohort
    routes: list[Route]  # in the cohort's order; the flip compare-and-sets each one's version
    source: Stamp
    target: Stamp
    layout: Layout
    revision: str | None
    rows: dict[str, int]
    write_mode: tuple[WriteMode, str]
    """How migrator's writes will run on the target, and why (`dsn.write_mode`), recorded on the move."""
    null_tenant_rows: dict[str, int] = field(default_factory=dict)
    """Rows of nullable tenant columns holding NULL, per table: they belong to no tenant and stay put."""
    skipped: tuple[str, ...] = ()
    """Views and materialized views of the tenancy schema: no rows of their own, not copied."""
    overridden: tuple[str, ...] = ()
    """The placement policy's violations that --override-policy allowed (the move records them)."""

    @property
    def total_rows(self) -> int:
        return sum(self.rows.values())


def check_schema_unchanged(
    src: psycopg.Connection[Any], tgt: psycopg.Connection[Any], move: Move, source: str, target: str, advice: str
) -> None:
    """Both stamps still at the revision the move started at: checked on resume and again inside the
    freeze before the flip; `advice` says what happens now (`not flipped`, or how to abort)."""
    now, expected = (read_revision(src), read_revision(tgt)), move.schema_revision
    if now != (expected, expected):
        raise PreflightError(
            f"schema changed during move {move.id}: {source} is at {now[0]}, {target} at {now[1]}, "
            f"the move started at {expected}; {advice}"
        )


def resolve(catalog: Catalog, tenants: Cohort, target_name: str) -> tuple[list[Route], Stamp, Stamp]:
    """Catalog-only checks: known tenants, listed once, all on one source stamp, and a different,
    active target."""
    if not tenants:
        raise BadInput("no tenant to move")
    repeated = sorted({t for t in tenants if tenants.count(t) > 1})
    if repeated:
        raise BadInput(f"tenant(s) {', '.join(repeated)} listed more than once")
    routes = catalog.routes_of(tenants)
    unknown = sorted(set(tenants) - {r.tenant for r in routes}, key=lambda t: (len(t), t))
    if len(unknown) == 1:
        catalog.route(unknown[0])  # raises the one-tenant message
    if unknown:
        raise BadInput(
            f"unknown tenant(s) {', '.join(unknown[:10])}{', ...' if len(unknown) > 10 else ''} (no route in the "
            "catalog; register them with `migrator route set` or `migrator route import`)"
        )
    for window in catalog.open_windows(tenants):  # its capture on the target would fight a new move's
        raise BadInput(
            f"{describe_move(window)} keeps a revert window open on {window.target} (since "
            f"{window.window_opened_at:%Y-%m-%d %H:%M:%S %Z}): take it back with `migrator move revert {window.id}`, "
            f"or close it with `migrator cleanup --move {window.id}`, first"
        )
    homes = sorted({r.stamp for r in routes})
    if len(homes) > 1:
        where = "; ".join(f"{home}: {', '.join(r.tenant for r in routes if r.stamp == home)}" for home in homes)
        raise PreflightError(f"a cohort moves from one stamp, these tenants live on {len(homes)} ({where})")
    target = catalog.stamp(target_name)
    source = catalog.stamp(homes[0])
    if source.name == target.name:
        raise PreflightError(
            f"{name_tenants(tenants)} already {'lives' if len(tenants) == 1 else 'live'} on stamp {target.name}; "
            "source and target are the same"
        )
    if target.state != "active":
        raise PreflightError(f"target stamp {target.name} is {target.state}; only active stamps receive tenants")
    return routes, source, target


def check_move(
    catalog: Catalog,
    tenancy: Tenancy,
    tenants: Cohort,
    target_name: str,
    *,
    allow_triggers: bool = False,
    override_policy: bool = False,
) -> Checked:
    """All preflight checks of a new move of a cohort, read-only on the catalog and both stamps.

    The catalog's checks come first (without a valid source and target nothing else can be
    checked), the placement policy's among them (refused unless `override_policy`); every problem
    found on the stamps, for every tenant, is then reported together.
    """
    routes, source, target = resolve(catalog, tenants, target_name)
    overridden = tuple(policy.check(catalog, tenants, target.name))
    if overridden and not override_policy:
        raise BadInput(
            f"the placement policy refuses the move of {name_tenants(tenants)} to {target.name}: "
            f"{'; '.join(overridden)} (`migrator tenant set`, `migrator stamp update --kind`; or "
            "--override-policy --reason TEXT, recorded in the audit trail)"
        )
    problems = Problems()
    with stamps.connect(source) as src, stamps.connect(target) as tgt:
        sides = _Sides(source, target, src, tgt)
        src_rev, tgt_rev = read_revision(src), read_revision(tgt)
        same_schema = src_rev == tgt_rev  # two stamps without Alembic (None) count as the same schema
        if not same_schema:
            problems.add(
                [
                    f"schema revisions differ: {source.name} is at {_rev(src_rev)}, {target.name} at {_rev(tgt_rev)}; "
                    "run `migrator schema upgrade` first"
                ]
            )
        layout = inspect(src, tenancy)  # raises only without a root table: nothing else can be judged
        problems.add(list(layout.problems))
        # At different revisions the structures differ as the revisions do: that is refused above.
        differences, notes = (
            shapes.compare_structures(
                src, tgt, layout, tenancy, (source.name, target.name), allow_triggers=allow_triggers
            )
            if same_schema
            else (None, [])
        )
        problems.add(differences or [])
        rows: dict[str, int] = {}
        nulls: dict[str, int] = {}
        skipped: tuple[str, ...] = ()
        # Where row-level security applies, reading the tenant's rows fails (row_security = off): that
        # is reported with the other side effects below, and the checks of the rows wait for its fix.
        if not (checks.rls_tables(src, layout) or checks.rls_tables(tgt, layout)):
            with problems.check():
                rows, nulls, skipped = _check_rows(problems, sides, layout, tenancy, tenants, differences)
        problems.add(_move_problems(sides, layout, allow_triggers))
        write_mode = dsnlib.write_mode(tgt)
    problems.raise_any(f"preflight refused the move of {name_tenants(tenants)} to {target.name}")
    for note in notes:  # said only of a move that goes ahead, like the lines below
        log.warning("%s and %s differ where a move neither writes nor checks: %s", source.name, target.name, note)
    for suspect in layout.suspects:
        log.warning("%s looks like a reference to a tenant table but is no foreign key: it stays global", suspect)
    for label, count in nulls.items():  # said only of a move that goes ahead: a refusal stays one line
        key = layout.table(label).key
        log.warning("table %s has %d rows with NULL %s; they are not moved", label, count, key)
    return Checked(tenants, routes, source, target, layout, src_rev, rows, write_mode, nulls, skipped, overridden)


@dataclass(frozen=True)
class _Sides:
    """The move's two stamps and the read session preflight holds on each."""

    source: Stamp
    target: Stamp
    src: psycopg.Connection[Any]
    tgt: psycopg.Connection[Any]


def _move_problems(sides: _Sides, layout: Layout, allow_triggers: bool) -> list[str]:
    """A move's trigger and row-level security problems: the target takes copies, replays and abort's
    deletes; the source later takes cleanup's deletes and is read throughout."""
    return [
        *checks.stamp_problems(sides.tgt, layout, sides.target.name, checks.TARGET_WRITES, allow_triggers),
        *checks.stamp_problems(sides.src, layout, sides.source.name, checks.DELETES, allow_triggers),
    ]


def _check_rows(
    problems: Problems,
    sides: _Sides,
    layout: Layout,
    tenancy: Tenancy,
    tenants: Cohort,
    differences: list[str] | None,
) -> tuple[dict[str, int], dict[str, int], tuple[str, ...]]:
    """The checks of the tenants' rows and of what the schema lets a copy carry: each tenant's
    spelling, its rows on the source, none on the target, no value of a unique index taken there,
    nothing COPY cannot move; returns the cohort's row counts, the rows of no tenant per table, and the
    views left alone. `differences` are the structures' refused differences (None at different
    revisions): the target's rows are judged only where the tables match."""
    source, target, src, tgt = sides.source, sides.target, sides.src, sides.tgt
    root = next((t for t in layout.tables if t.name == tenancy.root_table), None)
    if root is None:  # the root table has no row key: named among the layout's problems
        return {}, {}, ()
    before = len(problems.found)
    _check_spellings(problems, src, root, tenants, source.name)
    if len(problems.found) > before:  # no value of the key, or spelled otherwise: counting would mislead
        return {}, {}, ()
    counts = {table.label: _counts(src, table, tenants) for table in layout.tables}
    rows = {label: sum(per_tenant.values()) for label, per_tenant in counts.items()}
    for tenant in tenants:
        if not counts[root.label].get(tenant):
            problems.add([f"tenant {tenant} has no row in {root.label} on its stamp {source.name}"])
    if len(problems.found) > before:  # a tenant that is not there: the rest would mislead
        return rows, {}, ()
    nulls = null_tenant_rows(src, layout)
    unmovable, skipped = shapes.unmovable(src, tenancy, layout)
    problems.add(list(unmovable))
    problems.add(list(shapes.foreign_tenant_references(src, layout, tenants)))
    if differences is None:  # the target's tables may not match the source's
        return rows, nulls, skipped
    held: dict[str, list[str]] = {}
    for table in layout.tables:
        on_target = _counts(tgt, table, tenants)
        for tenant in (t for t in tenants if t in on_target):
            held.setdefault(tenant, []).append(table.label)
    for tenant, tables in held.items():
        problems.add([f"target {target.name} already holds rows of tenant {tenant} in {', '.join(tables)}"])
    if not (differences or held):  # other tenants' rows only, in tables known to match
        problems.add(list(shapes.unique_collisions(src, tgt, layout, tenants, target.name, rows)))
    if not differences:
        problems.add(integrity.missing_shared(src, tgt, layout, tenants, target.name))
        problems.add(follow.conflicts(src, tgt, layout, tenants, target.name))
    return rows, nulls, skipped


def check_resume(source: Stamp, target: Stamp, layout: Layout, *, allow_triggers: bool = False) -> None:
    """A resumed move's side-effect checks: triggers and row-level security may have changed since it began."""
    problems = Problems()
    with stamps.connect(source) as src, stamps.connect(target) as tgt:
        problems.add(_move_problems(_Sides(source, target, src, tgt), layout, allow_triggers))
    problems.raise_any(f"resuming the move to {target.name} was refused")


def check_deletes(stamp: Stamp, layout: Layout, *, allow_triggers: bool, what: str) -> None:
    """Before cleanup or abort deletes a tenant's rows on `stamp`: triggers and row-level security."""
    problems = Problems()
    with stamps.connect(stamp) as conn:
        problems.add(checks.stamp_problems(conn, layout, stamp.name, checks.DELETES, allow_triggers))
    problems.raise_any(f"{what} was refused")


def _rev(revision: str | None) -> str:
    return revision if revision is not None else "no Alembic revision"


def _check_spellings(
    problems: Problems, conn: psycopg.Connection[Any], root: Table, tenants: Cohort, stamp: str
) -> None:
    """Each tenant of the cohort spelled as its root row's key is stored (`_check_spelling`), read in one
    query for the cohort: a cohort of 100 tenants pays one round trip, not 100. A tenant not found by
    its exact spelling (absent, spelled otherwise, or no value of the key's type) is looked up alone,
    to be named."""
    try:
        with conn.transaction():
            stored = {row[0]: row for row in conn.execute(_spelling_query(root, tenants))}
    except psycopg.errors.DataError:  # a tenant is no value of the key's type: each is judged alone
        stored = {}
    for tenant in tenants:
        with problems.check():
            if tenant in stored:
                _judge_spelling(stored[tenant], tenant, root, stamp)
            else:
                _check_spelling(conn, root, tenant, stamp)


def _spelling_query(root: Table, tenants: Cohort) -> sql.Composed:
    """Each of the tenants' root rows' key as text, as JSON text and its type."""
    return sql.SQL("SELECT {k}::text, to_jsonb({k}) #>> '{{}}', pg_typeof({k})::text FROM {t} WHERE {f}").format(
        k=sql.Identifier(str(root.key)), t=root.ident, f=tenant_filter(root, tenants)
    )


def _check_spelling(conn: psycopg.Connection[Any], root: Table, tenant: str, stamp: str) -> None:
    """Refuse a tenant id spelled differently from its stored text form (`042` for 42, an upper-case uuid).

    The rows would match by value, but the fence and capture trigger compare the stored key's text
    with the guarded tenant's text: a different spelling would leave the tenant's writes unfenced.
    """
    try:
        with conn.transaction():
            row = conn.execute(_spelling_query(root, (tenant,)) + sql.SQL(" LIMIT 1")).fetchone()
    except psycopg.errors.DataError:
        raise PreflightError(f"tenant {tenant} is not a valid value of {root.label}.{root.key} on {stamp}") from None
    if row:
        _judge_spelling(row, tenant, root, stamp)


def _judge_spelling(row: tuple[Any, ...], tenant: str, root: Table, stamp: str) -> None:
    """Refuse the tenant's root row's key (text, JSON text, type) if it is stored otherwise than spelled, or
    if its type prints differently as JSON (which the fence compares)."""
    if row[0] == tenant and row[1] != tenant:
        raise PreflightError(
            f"tenant keys of type {row[2]} are not supported: the fence reads {row[0]} as {row[1]} "
            "(use a key type with one text form, such as bigint, uuid or text)"
        )
    if row[0] != tenant:
        raise PreflightError(
            f"tenant {tenant} is stored as {row[0]} in {root.label}.{root.key} on {stamp}; "
            "route and move it by that exact spelling"
        )


def null_tenant_rows(conn: psycopg.Connection[Any], layout: Layout) -> dict[str, int]:
    """Rows whose (nullable) tenant column is NULL, per table: no tenant owns them, so no move takes them."""
    found = {}
    for table in layout.tables:
        if table.key is None or not any(c.name == table.key and c.nullable for c in table.columns):
            continue  # a path table's rows with NULL paths are no tenant's either; preflight's counts show them
        row = conn.execute(
            sql.SQL("SELECT count(*) FROM {} WHERE {} IS NULL").format(table.ident, sql.Identifier(table.key))
        ).fetchone()
        if row and row[0]:
            found[table.label] = int(row[0])
    return found


def _counts(conn: psycopg.Connection[Any], table: Table, tenants: Cohort) -> dict[str, int]:
    """Rows of each tenant of the cohort in the table, in one pass (tenants without rows are absent)."""
    query = sql.SQL("SELECT {k}, count(*) FROM {t} WHERE {f} GROUP BY 1").format(
        k=tenant_text(table, table.ident), t=table.ident, f=tenant_filter(table, tenants)
    )
    return {tenant: int(count) for tenant, count in conn.execute(query).fetchall()}
