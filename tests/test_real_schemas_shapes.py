"""Real schema shapes: each moves exactly, or preflight refuses it before the first write, naming it.

Every test builds a bespoke plain-SQL schema (no Alembic) on two fresh stamps, hands its tables to a
non-superuser application owner role and runs migrator as a login role holding exactly README's
grants (`operator_grants`), as a new user would. Exact moves are checked with `tenant_digest`
(independent of migrator.verify) on both stamps, then cleanup (or abort) must leave no row of the
tenant and no migrator object; refusals must exit 2 with one line naming the table and change
nothing in the catalog or on either stamp.
"""

from __future__ import annotations

import itertools
import json
import random
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pytest
from click.testing import Result
from conftest import (
    Bespoke,
    BespokeFactory,
    RunsCli,
    catalog_snapshot,
    stamp_snapshot,
    tenant_digest,
)
from psycopg import sql

from migrator import config as configlib
from migrator.catalog import Catalog
from migrator.context import Context
from migrator.db import dsn as dsnlib
from migrator.local import pgserver
from migrator.move import MoveOptions, move_tenants
from migrator.move.fence import leftovers
from migrator.progress import Progress, Silent
from migrator.stamps.discovery import Layout, discover

TENANT, NEIGHBOUR = "42", "43"
STAMPS = ("eu-1", "eu-2")
ROOT = "CREATE TABLE tenants (id bigint PRIMARY KEY, name text NOT NULL)"
_ids = itertools.count(1)


@dataclass
class Shaped(RunsCli):
    """Two stamps holding a bespoke schema, a catalog, and a config that reaches them as the operator role."""

    server: pgserver.LocalServer
    config_path: Path
    catalog: Catalog  # the catalog's owner: routes for the test, snapshots
    admin: dict[str, str] = field(repr=False)  # superuser DSNs of the stamps
    operator_dsns: dict[str, str] = field(repr=False)
    password: str = field(repr=False)

    def context(self) -> Context:
        return Context.load(self.config_path)

    def execute(self, stamp: str, *statements: str | sql.Composable, params: Sequence[Any] | None = None) -> None:
        with dsnlib.connect(self.admin[stamp], autocommit=True) as conn:
            for statement in statements:
                conn.execute(statement, params)

    def query(self, stamp: str, statement: str, params: Sequence[Any] | None = None) -> list[tuple[Any, ...]]:
        with dsnlib.connect(self.admin[stamp], autocommit=True) as conn:
            return conn.execute(statement, params).fetchall()

    def layout(self, stamp: str = "eu-1") -> Layout:
        with dsnlib.connect(self.admin[stamp], autocommit=True) as conn:
            return discover(conn, configlib.Tenancy())

    def digest(self, stamp: str, layout: Layout, tenant: str = TENANT) -> dict[str, tuple[int, str]]:
        return tenant_digest(self.admin[stamp], layout, tenant, by_name=True)

    def snapshot(self) -> tuple[Any, ...]:
        return (
            catalog_snapshot(self),  # type: ignore[arg-type]  # reads only .catalog.url
            *(stamp_snapshot(self.admin[s]) for s in STAMPS),
        )

    def assert_clean(self, layout: Layout, stamp: str, tenant: str = TENANT) -> None:
        """No row of the tenant and no migrator object left on the stamp."""
        assert all(rows == 0 for rows, _ in self.digest(stamp, layout, tenant).values()), stamp
        with dsnlib.connect(self.admin[stamp], autocommit=True) as conn:
            assert leftovers(conn) == [], stamp


ShapedFactory = Callable[..., Shaped]


@pytest.fixture
def shaped(pg: pgserver.LocalServer, bespoke: BespokeFactory) -> ShapedFactory:
    """Builds a Shaped from DDL (the same on both stamps unless `target_ddl` is given); `bespoke` drops it all after."""

    def build(ddl: Sequence[str], target_ddl: Sequence[str] | None = None) -> Shaped:
        statements = dict(zip(STAMPS, (ddl, target_ddl if target_ddl is not None else ddl), strict=True))

        def schema(made: Bespoke, stamp: str) -> None:
            with dsnlib.connect(made.admin(stamp), autocommit=True) as conn:
                for statement in (ROOT, *statements[stamp]):
                    conn.execute(statement)
                relations = conn.execute(
                    "SELECT n.nspname, c.relname, c.relkind FROM pg_class c"
                    " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind IN ('r', 'p', 'f', 'v', 'm')"
                    " AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%'"
                ).fetchall()
                for namespace, name, kind in relations:
                    what = {"v": "VIEW", "m": "MATERIALIZED VIEW", "f": "FOREIGN TABLE"}.get(kind, "TABLE")
                    conn.execute(
                        sql.SQL("ALTER {} {} OWNER TO {}").format(
                            sql.SQL(what), sql.Identifier(namespace, name), sql.Identifier(made.owner)
                        )
                    )

        made = bespoke(f"shape{next(_ids)}", STAMPS, schema)
        admin = {stamp: made.admin(stamp) for stamp in STAMPS}
        operator_dsns = {stamp: made.operator_dsn(stamp) for stamp in STAMPS}
        return Shaped(pg, made.config_path, made.catalog, admin, operator_dsns, made.password)

    return build


def _tenants(fleet: Shaped, *tenants: str) -> None:
    for tenant in tenants:
        fleet.execute("eu-1", "INSERT INTO tenants VALUES (%s, %s)", params=(tenant, f"tenant {tenant}"))
        fleet.catalog.set_route(tenant, "eu-1")


def _assert_refused(fleet: Shaped, before: tuple[Any, ...], result: Result, *expected: str) -> str:
    """Exit 2, one line naming every expected problem, nothing changed anywhere."""
    assert result.exit_code == 2, result.output
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1, line
    for text in expected:
        assert text in line, (text, line)
    assert fleet.snapshot() == before
    return line


def _move_refused(fleet: Shaped, *expected: str, args: Sequence[str] = ("--yes",)) -> str:
    """Moving the tenant to eu-2 (with `args`) exits 2 naming every expected problem, and changes nothing."""
    before = fleet.snapshot()
    return _assert_refused(fleet, before, fleet.run("move", TENANT, "--to", "eu-2", *args), *expected)


class Writer(Progress, Protocol):
    """Progress that writes on the source during the copy, as the application would; `done` once it has."""

    done: bool


class WritesOnce(Silent):
    """The application writing during a move: `statements` in one transaction, once the copy has
    committed a batch (of `table`, when given)."""

    def __init__(self, dsn: str, *statements: str, table: str | None = None) -> None:
        self.dsn, self.statements, self.table, self.done = dsn, statements, table, False

    def advance(self, table: str, rows: int) -> None:
        if self.done or not rows or self.table not in (None, table):
            return
        self.done = True
        with dsnlib.connect(self.dsn, autocommit=True) as conn, conn.transaction():
            for statement in self.statements:
                conn.execute(statement)


def _moved_while_writing(fleet: Shaped, layout: Layout, writer: Writer, batch_rows: int) -> dict[str, tuple[int, str]]:
    """Move the tenant to eu-2 online while `writer` writes; the target must end up exactly as the source,
    whose digest is returned."""
    outcome = move_tenants(fleet.context(), (TENANT,), "eu-2", MoveOptions(batch_rows=batch_rows), writer)
    assert writer.done and [r.stamp for r in outcome.routes] == ["eu-2"]
    source = fleet.digest("eu-1", layout)
    assert fleet.digest("eu-2", layout) == source
    return source


def _abort_leaves_the_source_as_it_was(fleet: Shaped, layout: Layout, source: dict[str, tuple[int, str]]) -> None:
    """`move abort` of the tenant's open move removes its partial copy from eu-2 and changes nothing on eu-1."""
    move = fleet.catalog.open_move(TENANT)
    assert move is not None
    aborted = fleet.run("move", "abort", str(move.id), "--batch-rows", "2", "--yes")
    assert aborted.exit_code == 0, aborted.output
    fleet.assert_clean(layout, "eu-2")
    with dsnlib.connect(fleet.admin["eu-1"], autocommit=True) as conn:
        assert leftovers(conn) == []
    assert fleet.digest("eu-1", layout) == source


# -- self-referencing foreign keys -------------------------------------------------------------------------

TREE = (
    # A folder tree: nullable parent, keys assigned at random (children above and below their parents).
    "CREATE TABLE folders (id bigint PRIMARY KEY, tenant_id bigint NOT NULL REFERENCES tenants,"
    " parent_id bigint REFERENCES folders, name text NOT NULL)",
    # Comment threads: a NOT NULL composite self-reference (a thread's root is its own parent), RESTRICT.
    "CREATE TABLE comments (tenant_id bigint NOT NULL REFERENCES tenants, id bigint NOT NULL, parent_id bigint"
    " NOT NULL, body text, PRIMARY KEY (tenant_id, id),"
    " FOREIGN KEY (tenant_id, parent_id) REFERENCES comments (tenant_id, id) ON DELETE RESTRICT)",
    # Sub-tasks of folders: a child table of the tree, itself a tree.
    "CREATE TABLE tasks (id bigint PRIMARY KEY, tenant_id bigint NOT NULL, folder_id bigint NOT NULL"
    " REFERENCES folders ON DELETE CASCADE, parent_task bigint REFERENCES tasks ON DELETE CASCADE, title text)",
)
FOLDERS = 40


def _seed_tree(fleet: Shaped, tenant: str, seed: int) -> dict[int, int | None]:
    """A random tree of folders (key -> parent key), comment threads with a cycle made by updates, and tasks."""
    rng = random.Random(seed)
    base = int(tenant) * 10_000
    keys = [base + k for k in rng.sample(range(1, 1000), FOLDERS)]
    parents: dict[int, int | None] = {keys[0]: None}
    for i in range(1, FOLDERS):
        parents[keys[i]] = keys[rng.randrange(i)] if i > 3 else None  # four roots
    with dsnlib.connect(fleet.admin["eu-1"]) as conn:
        for key in keys:  # parents first
            conn.execute("INSERT INTO folders VALUES (%s, %s, %s, %s)", (key, tenant, parents[key], f"folder {key}"))
        for i, key in enumerate(keys):
            conn.execute(
                "INSERT INTO comments VALUES (%s, %s, %s, %s)",
                (tenant, key, key if i < 3 else keys[rng.randrange(i)] if i < 30 else keys[3], f"c{i}"),
            )
        # a cycle through updates: 901 -> 902 -> 901, and 903 hanging below it
        conn.execute(
            "INSERT INTO comments VALUES (%s, 901, 901, 'a'), (%s, 902, 901, 'b'), (%s, 903, 902, 'c')",
            (tenant, tenant, tenant),
        )
        conn.execute("UPDATE comments SET parent_id = 902 WHERE tenant_id = %s AND id = 901", (tenant,))
        for i, key in enumerate(keys):
            task_parent = None if i < 5 else base + 500_000 + rng.randrange(i)
            conn.execute(
                "INSERT INTO tasks VALUES (%s, %s, %s, %s, %s)",
                (base + 500_000 + i, tenant, key, task_parent, f"task {i}"),
            )
    assert any(p is not None and p > k for k, p in parents.items())
    assert any(p is not None and p < k for k, p in parents.items())
    return parents


def _depths(parents: dict[int, int | None]) -> dict[int, int]:
    def depth(key: int) -> int:
        parent = parents[key]
        return 0 if parent is None else 1 + depth(parent)

    return {key: depth(key) for key in parents}


class ReparentDuringCopy(Silent):
    """Once the copy of `folders` has committed a batch, writes on the source as the application would:
    a subtree hoisted to the top, a leaf moved under the deepest folder, a new folder with a smaller key
    than its parent holding a new task (whose sub-task sits in an old folder), a deleted leaf (cascading
    to its tasks), and a new reply in the comment cycle."""

    def __init__(self, dsn: str, parents: dict[int, int | None], tenant: str = TENANT) -> None:
        self.dsn, self.parents, self.tenant, self.done = dsn, parents, tenant, False

    def advance(self, table: str, rows: int) -> None:
        if self.done or table != "folders":
            return
        self.done = True
        depths = _depths(self.parents)
        children = {p for p in self.parents.values() if p is not None}
        leaves = sorted(k for k in self.parents if k not in children and self.parents[k] is not None)
        deepest = max(self.parents, key=lambda k: (depths[k], k))
        inner = next(k for k in sorted(self.parents) if depths[k] >= 2 and k in children)
        moved_leaf = next(k for k in leaves if k != deepest)
        gone_leaf = next(k for k in reversed(leaves) if k not in (deepest, moved_leaf))
        with dsnlib.connect(self.dsn) as conn:
            conn.execute("UPDATE folders SET parent_id = NULL WHERE id = %s", (inner,))
            conn.execute("UPDATE folders SET parent_id = %s WHERE id = %s", (deepest, moved_leaf))
            new_key = int(self.tenant) * 10_000  # below every other key of the tenant
            conn.execute("INSERT INTO folders VALUES (%s, %s, %s, 'late')", (new_key, self.tenant, deepest))
            # a task in the new folder and a sub-task of it in an old one: the copy of tasks meets both
            # before catch-up has brought the new folder
            task = new_key + 599_998
            conn.execute(
                "INSERT INTO tasks VALUES (%s, %s, %s, NULL, 'late'), (%s, %s, %s, %s, 'late sub')",
                (task, self.tenant, new_key, task + 1, self.tenant, deepest, task),
            )
            conn.execute("DELETE FROM folders WHERE id = %s", (gone_leaf,))
            conn.execute("INSERT INTO comments VALUES (%s, 1, 903, 'late reply')", (self.tenant,))
            conn.execute("UPDATE comments SET parent_id = 1 WHERE tenant_id = %s AND id = 901", (self.tenant,))


@pytest.mark.parametrize("batch_rows", [1, 7, MoveOptions().batch_rows], ids=["batch-1", "batch-7", "default"])
def test_self_referencing_trees_move_exactly_at_any_batch_size_with_reparenting_during_the_copy(
    shaped: ShapedFactory, batch_rows: int
) -> None:
    fleet = shaped(TREE)
    _tenants(fleet, TENANT, NEIGHBOUR)
    parents = _seed_tree(fleet, TENANT, seed=1)
    _seed_tree(fleet, NEIGHBOUR, seed=2)
    layout = fleet.layout()
    assert [t.name for t in layout.tables] == ["tenants", "comments", "folders", "tasks"]
    neighbour = fleet.digest("eu-1", layout, NEIGHBOUR)

    source = _moved_while_writing(fleet, layout, ReparentDuringCopy(fleet.admin["eu-1"], parents), batch_rows)
    assert source["folders"][0] == FOLDERS  # one inserted, one deleted
    verified = fleet.run("verify", TENANT, "--source", "eu-1", "--target", "eu-2", "--json")
    assert verified.exit_code == 0 and json.loads(verified.stdout)["equal"] is True, verified.output

    cleaned = fleet.run("cleanup", TENANT, "--stamp", "eu-1", "--batch-rows", "3", "--yes")
    assert cleaned.exit_code == 0, cleaned.output
    fleet.assert_clean(layout, "eu-1")
    assert fleet.digest("eu-1", layout, NEIGHBOUR) == neighbour
    assert fleet.digest("eu-2", layout) == source


def _copied(fleet: Shaped, table: str) -> int:
    """Rows the target's cursor says are copied of `table` (0 before the copy starts)."""
    if not fleet.query("eu-2", "SELECT to_regclass('_migrator.copy_progress') IS NOT NULL")[0][0]:
        return 0
    rows = fleet.query(
        "eu-2", "SELECT coalesce(sum(rows_copied), 0) FROM _migrator.copy_progress WHERE table_name = %s", (table,)
    )
    return int(rows[0][0])


def _kill_during_tree_copy(fleet: Shaped) -> None:
    """Start an online move at one row per batch, slowed down, and kill -9 it inside the copy of folders."""
    proc = fleet.popen("move", TENANT, "--to", "eu-2", "--batch-rows", "1", "--rate-limit", "8", "--yes")
    deadline = time.monotonic() + 60
    while _copied(fleet, "folders") < 5:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the copy of folders never started"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert 5 <= _copied(fleet, "folders") < FOLDERS


def test_self_referencing_copy_resumes_after_kill_9_with_reparenting_in_between(shaped: ShapedFactory) -> None:
    fleet = shaped(TREE)
    _tenants(fleet, TENANT)
    parents = _seed_tree(fleet, TENANT, seed=3)
    layout = fleet.layout()
    _kill_during_tree_copy(fleet)
    ReparentDuringCopy(fleet.admin["eu-1"], parents).advance("folders", 1)  # while the move lies dead

    resumed = fleet.run("move", TENANT, "--to", "eu-2", "--batch-rows", "1", "--yes", "--json")
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.stdout)["resumed"] is True
    assert fleet.digest("eu-2", layout) == fleet.digest("eu-1", layout)
    assert fleet.catalog.route(TENANT).stamp == "eu-2"


def test_abort_of_a_killed_tree_copy_removes_the_partial_copy_children_first(shaped: ShapedFactory) -> None:
    fleet = shaped(TREE)
    _tenants(fleet, TENANT)
    _seed_tree(fleet, TENANT, seed=4)
    layout = fleet.layout()
    source = fleet.digest("eu-1", layout)
    _kill_during_tree_copy(fleet)
    _abort_leaves_the_source_as_it_was(fleet, layout, source)
    assert fleet.catalog.route(TENANT).stamp == "eu-1"


# -- foreign-key cycles -------------------------------------------------------------------------------------

CYCLE = (
    "CREATE TABLE teams (id bigint PRIMARY KEY, tenant_id bigint NOT NULL REFERENCES tenants, lead_id bigint)",
    "CREATE TABLE members (id bigint PRIMARY KEY, tenant_id bigint NOT NULL REFERENCES tenants,"
    " team_id bigint NOT NULL REFERENCES teams DEFERRABLE, name text)",  # initially immediate, like teams_lead
    "ALTER TABLE teams ADD CONSTRAINT teams_lead FOREIGN KEY (lead_id) REFERENCES members DEFERRABLE",
    "CREATE TABLE badges (id bigint PRIMARY KEY, tenant_id bigint NOT NULL, member_id bigint NOT NULL"
    " REFERENCES members ON DELETE CASCADE)",
)


def _seed_cycle(fleet: Shaped, tenant: str) -> None:
    base = int(tenant) * 1000
    with dsnlib.connect(fleet.admin["eu-1"]) as conn:
        conn.execute("SET CONSTRAINTS ALL DEFERRED")
        for team in range(5):
            conn.execute("INSERT INTO teams VALUES (%s, %s, %s)", (base + team, tenant, base + 100 + team * 3))
            for m in range(3):
                conn.execute(
                    "INSERT INTO members VALUES (%s, %s, %s, %s)",
                    (base + 100 + team * 3 + m, tenant, base + team, f"m{m}"),
                )
                conn.execute(
                    "INSERT INTO badges VALUES (%s, %s, %s)",
                    (base + 500 + team * 3 + m, tenant, base + 100 + team * 3 + m),
                )


class WritesInTheCycle(Silent):
    """During the copy: a new team and its lead inserted together, a lead changed, a member deleted."""

    def __init__(self, dsn: str) -> None:
        self.dsn, self.done = dsn, False

    def advance(self, table: str, rows: int) -> None:
        if self.done or table != "teams":  # once the cycle's copy has committed
            return
        self.done = True
        base = int(TENANT) * 1000
        with dsnlib.connect(self.dsn) as conn:
            conn.execute("SET CONSTRAINTS ALL DEFERRED")
            conn.execute("INSERT INTO teams VALUES (%s, %s, %s)", (base + 99, TENANT, base + 199))
            conn.execute("INSERT INTO members VALUES (%s, %s, %s, 'new lead')", (base + 199, TENANT, base + 99))
            conn.execute("UPDATE teams SET lead_id = %s WHERE id = %s", (base + 101, base))
            conn.execute("DELETE FROM members WHERE id = %s", (base + 102,))


def test_deferrable_foreign_key_cycle_moves_exactly_and_cleans_up(shaped: ShapedFactory) -> None:
    fleet = shaped(CYCLE)
    _tenants(fleet, TENANT, NEIGHBOUR)
    _seed_cycle(fleet, TENANT)
    _seed_cycle(fleet, NEIGHBOUR)
    layout = fleet.layout()
    assert [t.name for t in layout.tables] == ["tenants", "members", "teams", "badges"]
    assert layout.table("teams").cycle == ("members", "teams")
    source = _moved_while_writing(fleet, layout, WritesInTheCycle(fleet.admin["eu-1"]), batch_rows=4)
    assert source["teams"][0] == 6 and source["members"][0] == 15
    cleaned = fleet.run("cleanup", TENANT, "--stamp", "eu-1", "--yes")
    assert cleaned.exit_code == 0, cleaned.output
    fleet.assert_clean(layout, "eu-1")
    assert fleet.digest("eu-1", layout, NEIGHBOUR)["members"][0] == 15


class FailAfter(Silent):
    """Progress that fails the move once `table` is copied (an interruption, as far as the move can tell)."""

    def __init__(self, table: str) -> None:
        self.table = table

    def finish(self, part: str) -> None:
        if part == self.table:
            raise RuntimeError(f"interrupted after {part}")


def test_abort_of_an_interrupted_deferrable_cycle_copy_removes_it(shaped: ShapedFactory) -> None:
    fleet = shaped(CYCLE)
    _tenants(fleet, TENANT)
    _seed_cycle(fleet, TENANT)
    layout = fleet.layout()
    source = fleet.digest("eu-1", layout)
    with pytest.raises(RuntimeError, match="interrupted after badges"):
        move_tenants(fleet.context(), (TENANT,), "eu-2", MoveOptions(batch_rows=2), FailAfter("badges"))
    assert fleet.digest("eu-2", layout) == source  # the whole copy is there, unverified
    _abort_leaves_the_source_as_it_was(fleet, layout, source)


def test_non_deferrable_foreign_key_cycle_is_refused_naming_it(shaped: ShapedFactory) -> None:
    fleet = shaped([statement.replace(" DEFERRABLE", "") for statement in CYCLE])
    _tenants(fleet, TENANT)
    for args in (("--dry-run",), ("--yes",)):
        _move_refused(
            fleet,
            "foreign keys form a cycle between tenant tables (members, teams) through NOT DEFERRABLE constraints",
            "members_team_id_fkey (members -> teams)",
            "teams_lead (teams -> members)",
            "make one of them DEFERRABLE",
            args=args,
        )


# -- unique constraints across tenants ------------------------------------------------------------------------

UNIQUE = (
    "CREATE TABLE users (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, tenant_id bigint NOT NULL"
    " REFERENCES tenants, email text NOT NULL UNIQUE, slug text NOT NULL, active boolean NOT NULL, handle text)",
    "CREATE UNIQUE INDEX users_slug_lower ON users (lower(slug))",
    "CREATE UNIQUE INDEX users_active_handle ON users (handle) WHERE active",
    "CREATE UNIQUE INDEX users_per_tenant ON users (tenant_id, handle)",  # holds the tenant column: never collides
)


def test_unique_values_taken_by_other_tenants_on_the_target_are_refused_naming_the_keys(
    shaped: ShapedFactory,
) -> None:
    fleet = shaped(UNIQUE)
    _tenants(fleet, TENANT)
    fleet.execute(
        "eu-1",
        "INSERT INTO users (tenant_id, email, slug, active, handle) VALUES"
        " (42, 'ann@example.com', 'Ann', true, 'ann'), (42, 'bob@example.com', 'bob', true, 'bob'),"
        " (42, 'cy@example.com', 'cy', false, 'cy'), (42, 'di@example.com', 'di', true, 'di')",
    )
    fleet.execute(
        "eu-2", "INSERT INTO tenants VALUES (7, 'someone else')", "ALTER TABLE users ALTER COLUMN id RESTART WITH 1000"
    )  # no primary key collision
    fleet.execute(
        "eu-2",
        "INSERT INTO users (tenant_id, email, slug, active, handle) VALUES"
        " (7, 'ann@example.com', 'x', true, 'x'),"  # same email
        " (7, 'z@example.com', 'BOB', true, 'z'),"  # same slug, other case
        " (7, 'y@example.com', 'y', true, 'di'),"  # an active handle our active di also holds
        " (7, 'w@example.com', 'w', true, 'cy')",  # cy is inactive here: the partial index does not apply
    )
    for args in (("--dry-run",), ("--yes",)):
        line = _move_refused(
            fleet,
            "3 problems",
            "unique index users_email_key on users (email): values (ann@example.com) of tenant 42",
            "unique index users_slug_lower on users (lower(slug)): values (bob) of tenant 42",
            "unique index users_active_handle on users (handle) WHERE active: values (di) of tenant 42",
            args=args,
        )
        assert "(cy)" not in line and "users_per_tenant" not in line and "primary key" not in line


# -- physical differences between stamps --------------------------------------------------------------------

NOTES = (
    "CREATE TABLE notes (id bigserial PRIMARY KEY, tenant_id bigint NOT NULL REFERENCES tenants, title text,"
    " body text, stars int DEFAULT 0, tags text[])",
)
NOTES_REORDERED = (  # the same columns, added by migrations in another order, and a dropped one
    "CREATE TABLE notes (body text, old_flag boolean, id bigserial PRIMARY KEY, tags text[])",
    "ALTER TABLE notes ADD COLUMN stars int DEFAULT 0, ADD COLUMN tenant_id bigint NOT NULL REFERENCES tenants",
    "ALTER TABLE notes DROP COLUMN old_flag",
    "ALTER TABLE notes ADD COLUMN title text",
)


def test_columns_in_another_physical_order_and_dropped_columns_move_exactly(shaped: ShapedFactory) -> None:
    fleet = shaped(NOTES, NOTES_REORDERED)
    _tenants(fleet, TENANT)
    fleet.execute(
        "eu-1",
        "INSERT INTO notes (tenant_id, title, body, stars, tags) SELECT 42, 't' || i, 'b' || i,"
        " i, ARRAY['a' || i, NULL] FROM generate_series(1, 30) i",
    )
    layout = fleet.layout()
    physical = [c.name for c in fleet.layout("eu-2").table("notes").columns]
    assert physical != [c.name for c in layout.table("notes").columns] and sorted(physical) == sorted(
        c.name for c in layout.table("notes").columns
    )
    writer = WritesOnce(
        fleet.admin["eu-1"],
        "UPDATE notes SET body = 'edited', stars = 5 WHERE tenant_id = 42 AND id % 4 = 0",
        "INSERT INTO notes (tenant_id, title, body, tags) VALUES (42, 'new', NULL, '{x,y}')",
        "DELETE FROM notes WHERE tenant_id = 42 AND id % 5 = 0",
    )
    source = _moved_while_writing(fleet, layout, writer, batch_rows=7)
    assert source["notes"][0] == 30 + 1 - 6
    verified = fleet.run("verify", TENANT, "--source", "eu-1", "--target", "eu-2", "--json")
    assert verified.exit_code == 0 and json.loads(verified.stdout)["equal"] is True, verified.output
    moved_back = fleet.run("move", TENANT, "--to", "eu-1", "--yes")  # the other way, only after a cleanup
    assert moved_back.exit_code == 2 and "keeps a revert window open on eu-2" in moved_back.stderr
    assert fleet.run("cleanup", TENANT, "--stamp", "eu-1", "--yes").exit_code == 0
    moved_back = fleet.run("move", TENANT, "--to", "eu-1", "--batch-rows", "4", "--yes")
    assert moved_back.exit_code == 0, moved_back.output
    assert fleet.digest("eu-1", layout) == source


def test_a_real_difference_in_columns_or_types_is_refused_naming_the_columns(shaped: ShapedFactory) -> None:
    target = (
        "CREATE TABLE notes (id bigserial PRIMARY KEY, tenant_id bigint NOT NULL REFERENCES tenants, title text,"
        " body varchar(20), tags text[], extra int)",
    )
    fleet = shaped(NOTES, target)
    _tenants(fleet, TENANT)
    fleet.execute("eu-1", "INSERT INTO notes (tenant_id, title) VALUES (42, 'x')")
    _move_refused(
        fleet,
        "3 problems: (1) column notes.body: text on eu-1, character varying(20) on eu-2 (`migrator schema diff",
        "(2) column notes.extra: only on eu-2 (integer) (`migrator schema diff eu-1 eu-2` shows every difference)",
        "(3) column notes.stars: only on eu-1 (integer DEFAULT 0) (`migrator schema diff eu-1 eu-2`",
    )


def test_plan_notes_the_schema_problems_its_moves_would_be_refused_for(shaped: ShapedFactory, tmp_path: Path) -> None:
    scans = (
        "CREATE EXTENSION lo",
        "CREATE TABLE scans (id bigint PRIMARY KEY, tenant_id bigint NOT NULL REFERENCES tenants, image lo)",
    )
    no_stars = (
        "CREATE TABLE notes (id bigserial PRIMARY KEY, tenant_id bigint NOT NULL REFERENCES tenants,"
        " title text, body text, tags text[])",
    )
    fleet = shaped((*NOTES, *scans), (*no_stars, *scans))
    _tenants(fleet, TENANT)
    fleet.execute("eu-1", "INSERT INTO notes (tenant_id, title) VALUES (42, 'x')")
    planned = fleet.run("plan", "isolate", TENANT, "--to", "eu-2", "-o", str(tmp_path / "isolate.yaml"))
    assert planned.exit_code == 0, planned.output
    text = (tmp_path / "isolate.yaml").read_text()
    for expected in (
        "moves from eu-1 to eu-2 will be refused by preflight: 2 problems",
        "table scans column image is of type lo",
        "column notes.stars: only on eu-1 (integer DEFAULT 0)",
    ):
        assert expected in text, text
        assert expected in planned.output, planned.output


# -- what COPY cannot move, and every problem at once ---------------------------------------------------------

UNMOVABLE = (
    "CREATE EXTENSION lo",
    "CREATE TABLE documents (id bigint PRIMARY KEY, tenant_id bigint NOT NULL REFERENCES tenants, scan lo, raw oid)",
    "CREATE SCHEMA reporting",
    "CREATE TABLE reporting.exports (id bigint PRIMARY KEY, document_id bigint REFERENCES public.documents)",
    "CREATE FOREIGN DATA WRAPPER shapes_fdw",
    "CREATE SERVER shapes_remote FOREIGN DATA WRAPPER shapes_fdw",
    "CREATE FOREIGN TABLE remote_events (id bigint, tenant_id bigint) SERVER shapes_remote",
    "CREATE TABLE no_key (tenant_id bigint NOT NULL, v text)",
    "CREATE TABLE a (id bigint PRIMARY KEY, tenant_id bigint NOT NULL, b_id bigint)",
    "CREATE TABLE b (id bigint PRIMARY KEY, tenant_id bigint NOT NULL, a_id bigint REFERENCES a)",
    "ALTER TABLE a ADD CONSTRAINT a_b FOREIGN KEY (b_id) REFERENCES b",
    "CREATE VIEW active_documents AS SELECT * FROM documents",
)


def test_what_copy_cannot_move_is_refused_with_every_problem_in_one_run(shaped: ShapedFactory) -> None:
    fleet = shaped(UNMOVABLE)
    _tenants(fleet, TENANT)
    fleet.execute("eu-1", "INSERT INTO documents VALUES (1, 42, NULL, NULL)")
    expected = (
        "6 problems",
        "table no_key has no primary key and no unique index on NOT NULL columns",
        "foreign keys form a cycle between tenant tables (a, b) through NOT DEFERRABLE constraints",
        "table documents column raw is of type oid: it points to large objects",
        "table documents column scan is of type lo: it points to large objects",
        "foreign table remote_events has the tenant column tenant_id",
        "table reporting.exports references tenant table documents (foreign key exports_document_id_fkey)",
    )
    for args in (("--dry-run",), ("--dry-run", "--json"), ("--yes",)):
        _move_refused(fleet, *expected, args=args)


def test_views_are_listed_as_skipped_in_dry_run_and_json(shaped: ShapedFactory) -> None:
    fleet = shaped(
        (
            *NOTES,
            "CREATE VIEW starred AS SELECT * FROM notes WHERE stars > 0",
            "CREATE MATERIALIZED VIEW note_counts AS SELECT tenant_id, count(*) FROM notes GROUP BY 1",
        )
    )
    _tenants(fleet, TENANT)
    fleet.execute("eu-1", "INSERT INTO notes (tenant_id, title) VALUES (42, 'x')")
    dry = fleet.run("move", TENANT, "--to", "eu-2", "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert "skipped: materialized view note_counts (not a table" in dry.stdout
    assert "skipped: view starred (not a table" in dry.stdout
    as_json = fleet.run("move", TENANT, "--to", "eu-2", "--dry-run", "--json")
    assert json.loads(as_json.stdout)["skipped"] == ["materialized view note_counts", "view starred"]
    moved = fleet.run("move", TENANT, "--to", "eu-2", "--yes", "--json")
    assert moved.exit_code == 0, moved.output
    assert json.loads(moved.stdout)["skipped"] == ["materialized view note_counts", "view starred"]


# -- partitions and every type --------------------------------------------------------------------------------

TYPES = (
    "CREATE EXTENSION citext",
    "CREATE EXTENSION hstore",
    "CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy')",
    "CREATE TYPE point3 AS (x float8, y float8, label text)",
    "CREATE DOMAIN positive AS numeric(10, 3) CHECK (VALUE > 0)",
    "CREATE TABLE events (tenant_id bigint NOT NULL REFERENCES tenants, id bigint NOT NULL, at timestamptz NOT NULL,"
    " email citext, attrs hstore, span int4range, spans int4multirange, during tstzrange, spot point3,"
    " amount positive, feeling mood, doc xml, search tsvector, price money, flags bit(4), mask varbit,"
    " took interval, moods mood[], spots point3[], emails citext[], ranges int4range[], blob bytea, f real,"
    " d double precision, j jsonb, PRIMARY KEY (tenant_id, id, at)) PARTITION BY LIST (tenant_id)",
    "CREATE TABLE events_42 PARTITION OF events FOR VALUES IN (42) PARTITION BY RANGE (at)",
    "CREATE TABLE events_42_old PARTITION OF events_42 FOR VALUES FROM ('2000-01-01') TO ('2024-01-01')",
    "CREATE TABLE events_42_rest PARTITION OF events_42 DEFAULT",
    "CREATE TABLE events_other PARTITION OF events DEFAULT",
)


def test_partitioned_tables_and_every_type_move_byte_exact_into_the_same_partitions(shaped: ShapedFactory) -> None:
    fleet = shaped(TYPES)
    _tenants(fleet, TENANT, NEIGHBOUR)
    for tenant in (TENANT, NEIGHBOUR):
        fleet.execute(
            "eu-1",
            "INSERT INTO events SELECT %s, i, timestamptz '2023-06-01 12:00:00.123456+02' + i * interval '40 days',"
            " 'Mixed.Case@Example.COM', hstore(ARRAY['k' || i, 'q\"uote'], ARRAY['v', NULL]),"
            " int4range(i, i + 10, '(]'), int4multirange(int4range(1, 3), int4range(i + 5, i + 9)),"
            " tstzrange(now(), NULL), ROW(i / 3.0, -0.0, 'p ' || i)::point3, (i + 0.5)::positive,"
            " (ARRAY['sad', 'ok', 'happy']::mood[])[1 + i %% 3], xmlparse(content '<a x=\"1\">' || i || '</a>'),"
            " to_tsvector('english', 'the quick brown foxes ' || i), (i * 1.25)::money, (i %% 16)::bit(4),"
            " B'10101'::varbit, make_interval(months => i, secs => 1.5), ARRAY['ok', 'happy']::mood[],"
            " ARRAY[ROW(1, 2, 'a')::point3, NULL], ARRAY['A'::citext, 'b'], ARRAY[int4range(1, 2), 'empty'],"
            " decode('00ff' || lpad(to_hex(i), 2, '0'), 'hex'), 1.0 / 3, pi() * i, jsonb_build_object('n', i, 'f', 0.1)"
            " FROM generate_series(1, 25) i",
            params=(tenant,),
        )
    layout = fleet.layout()
    assert [t.name for t in layout.tables] == ["tenants", "events"]

    def partitions(stamp: str) -> list[tuple[Any, ...]]:
        return fleet.query(
            stamp, "SELECT tableoid::regclass::text, count(*) FROM events WHERE tenant_id = 42 GROUP BY 1 ORDER BY 1"
        )

    before = partitions("eu-1")
    assert [name for name, _ in before] == ["events_42_old", "events_42_rest"]
    result = fleet.run("move", TENANT, "--to", "eu-2", "--batch-rows", "6", "--yes")
    assert result.exit_code == 0, result.output
    assert fleet.digest("eu-2", layout) == fleet.digest("eu-1", layout)
    assert partitions("eu-2") == before
    cleaned = fleet.run("cleanup", TENANT, "--stamp", "eu-1", "--yes")
    assert cleaned.exit_code == 0, cleaned.output
    fleet.assert_clean(layout, "eu-1")
    assert fleet.digest("eu-1", layout, NEIGHBOUR)["events"][0] == 25


# -- a child written during the copy under a parent the copy has passed -----------------------------------------

PROJECTS = (
    "CREATE TABLE projects (id bigint PRIMARY KEY, tenant_id bigint NOT NULL REFERENCES tenants, name text)",
    "CREATE TABLE tasks (id bigint PRIMARY KEY, tenant_id bigint NOT NULL, project_id bigint NOT NULL"
    " REFERENCES projects ON DELETE CASCADE, title text)",
)


def test_a_child_written_under_a_new_parent_during_the_copy_moves_exactly(shaped: ShapedFactory) -> None:
    fleet = shaped(PROJECTS)
    _tenants(fleet, TENANT)
    fleet.execute(
        "eu-1",
        "INSERT INTO projects SELECT i, 42, 'p' || i FROM generate_series(10, 14) i",
        "INSERT INTO tasks SELECT i, 42, 10 + i % 5, 't' || i FROM generate_series(100, 140) i",
    )
    writer = WritesOnce(  # once `tasks` (the child) has committed a batch: a new project with a task
        fleet.admin["eu-1"],
        "INSERT INTO projects VALUES (1, 42, 'new')",
        "INSERT INTO tasks VALUES (999, 42, 1, 'in the new project')",  # a key not copied yet
        table="tasks",
    )
    _moved_while_writing(fleet, fleet.layout(), writer, batch_rows=5)


def test_rows_referencing_another_tenants_rows_are_refused_naming_them(shaped: ShapedFactory) -> None:
    fleet = shaped(PROJECTS)
    _tenants(fleet, TENANT, NEIGHBOUR)
    fleet.execute(
        "eu-1",
        "INSERT INTO projects VALUES (10, 42, 'ours'), (20, 43, 'theirs')",
        "INSERT INTO tasks VALUES (1, 42, 10, 'fine'), (2, 42, 20, 'points across tenants')",
    )
    _move_refused(
        fleet,
        "rows (2) of tasks reference rows of projects that are not tenant 42's (foreign key tasks_project_id_fkey)",
    )


def test_writes_to_partitions_during_an_online_copy_are_replayed(shaped: ShapedFactory) -> None:
    fleet = shaped(TYPES)
    _tenants(fleet, TENANT)
    fleet.execute(
        "eu-1",
        "INSERT INTO events (tenant_id, id, at, email) SELECT 42, i,"
        " timestamptz '2023-06-01' + i * interval '40 days', 'e' || i FROM generate_series(1, 25) i",
    )
    # during the copy: rows of the tenant inserted, updated (one across partitions) and deleted; the guard
    # trigger fires on the partitions (and logs their names), and ctids repeat from one partition to the next
    writer = WritesOnce(
        fleet.admin["eu-1"],
        "UPDATE events SET email = 'changed@example.com' WHERE tenant_id = 42 AND id = 20",
        "UPDATE events SET at = '2001-01-01' WHERE tenant_id = 42 AND id = 21",  # to the old one
        "DELETE FROM events WHERE tenant_id = 42 AND id = 2",
        "INSERT INTO events (tenant_id, id, at, took) VALUES (42, 100, now(), '1 day')",
        table="events",
    )
    _moved_while_writing(fleet, fleet.layout(), writer, batch_rows=6)
    query = "SELECT tableoid::regclass::text, id FROM events WHERE tenant_id = 42 ORDER BY 2"
    assert fleet.query("eu-2", query) == fleet.query("eu-1", query)
