"""Structural drift on real PostgreSQL: stamps at the same revision whose structures differ show in
`schema status` (exit 3) and `schema diff`; what does not count (column order, partition names,
migrator's own objects) does not; a move between stamps that differ where it writes is refused before
any write, and one that differs only in a plain index goes ahead, noting it."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Fleet, catalog_snapshot, new_fleet, tenant_row_count

from migrator.db import dsn as dsnlib
from migrator.local import pgserver, provision
from migrator.move import fence
from migrator.rollout.drift import fleet_status
from migrator.stamps import fingerprint as fingerprints
from migrator.stamps.fingerprint import cached_digest, fingerprint

HEAD = "0006_task_checklists"
DRIFTED = "us-1"  # the one stamp changed by hand; eu-1, eu-2 and ap-1 are the majority


@pytest.fixture(scope="module")
def fleet4m(
    pg: pgserver.LocalServer, templates: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Fleet]:
    """Four stamps at head for the module (each test undoes its changes): a majority of three."""
    with new_fleet(pg, templates, tmp_path_factory.mktemp("drift")) as fleet:
        db = fleet.databases[0].removesuffix("_catalog") + "_ap_1"
        fleet.databases.append(db)
        fleet.stamps["ap-1"] = provision.create_database(fleet.server, db, template=templates["stamp"])
        fleet.catalog.add_stamp("ap-1", fleet.stamps["ap-1"], region="ap")
        yield fleet


def execute(fleet: Fleet, stamps: tuple[str, ...], *statements: str) -> None:
    for stamp in stamps:
        with dsnlib.connect(fleet.dsn(stamp), autocommit=True) as conn:
            for statement in statements:
                conn.execute(statement)


def digest(fleet: Fleet, stamp: str) -> str:
    with dsnlib.connect(fleet.dsn(stamp), autocommit=True) as conn:
        return fingerprint(conn).digest


MAJORITY = ("eu-1", "eu-2", "ap-1")
# name: (stamps changed, statements, undo, a line `schema diff eu-1 us-1` must print)
DRIFTS = {
    "hand-made index": (
        (DRIFTED,),
        ["CREATE INDEX tasks_due_idx ON tasks (tenant_id, due_at)"],
        ["DROP INDEX tasks_due_idx"],
        "index tasks_due_idx: only on us-1"
        " (CREATE INDEX tasks_due_idx ON public.tasks USING btree (tenant_id, due_at))",
    ),
    "widened column": (
        (DRIFTED,),
        ["ALTER TABLE projects ALTER COLUMN budget TYPE numeric(18,2)"],
        ["ALTER TABLE projects ALTER COLUMN budget TYPE numeric(14,2)"],
        "column projects.budget: numeric(14,2) on eu-1, numeric(18,2) on us-1",
    ),
    "extra trigger": (
        (DRIFTED,),
        [
            "CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN RETURN NEW; END$$",
            "CREATE TRIGGER tasks_touch BEFORE UPDATE ON tasks FOR EACH ROW EXECUTE FUNCTION touch()",
        ],
        ["DROP TRIGGER tasks_touch ON tasks", "DROP FUNCTION touch()"],
        "trigger tasks.tasks_touch: only on us-1 (CREATE TRIGGER tasks_touch BEFORE UPDATE ON public.tasks"
        " FOR EACH ROW EXECUTE FUNCTION touch())",
    ),
    "missing extension": (
        MAJORITY,
        ["CREATE EXTENSION citext"],
        ["DROP EXTENSION citext"],
        "extension citext: only on eu-1 (CREATE EXTENSION citext VERSION",
    ),
    "changed default": (
        (DRIFTED,),
        ["ALTER TABLE tasks ALTER COLUMN priority SET DEFAULT 2"],
        ["ALTER TABLE tasks ALTER COLUMN priority SET DEFAULT 3"],
        "column tasks.priority: smallint NOT NULL DEFAULT 3 on eu-1, smallint NOT NULL DEFAULT 2 on us-1",
    ),
}


@pytest.mark.parametrize("drift", DRIFTS)
def test_a_hand_made_change_on_one_stamp_shows_in_status_and_diff(fleet4m: Fleet, drift: str) -> None:
    fleet = fleet4m
    changed, statements, undo, expected = DRIFTS[drift]
    same = digest(fleet, "eu-1")
    execute(fleet, changed, *statements)
    try:
        assert digest(fleet, DRIFTED) != digest(fleet, "eu-1")
        assert {digest(fleet, s) for s in MAJORITY} == {digest(fleet, "eu-1")}

        status = fleet.run("schema", "status")
        assert status.exit_code == 3, status.output
        short = re.search(r"us-1 \(fingerprint ×([0-9a-f]{4,})\)", status.stdout)
        assert short and f"1 of 4 stamps drift from head {HEAD}: us-1 (fingerprint ×{short[1]})" in status.stdout
        assert re.search(rf"4 stamps at {HEAD}, 2 fingerprints: 3 ×[0-9a-f]{{4,}}, 1 ×{short[1]}\n", status.stdout)
        us_line = next(line for line in status.stdout.splitlines() if line.startswith("!!") and " us-1 " in line)
        assert "DRIFTED" in us_line and short[1] in us_line
        data = json.loads(fleet.run("schema", "status", "--json").stdout)
        assert data["drift"] is True
        assert {s["stamp"]: s["odd"] for s in data["stamps"]} == {
            "eu-1": False,
            "eu-2": False,
            "us-1": True,
            "ap-1": False,
        }
        assert [(s["count"], sorted(s["stamps"]), s["majority"]) for s in data["structures"]] == [
            (3, ["ap-1", "eu-1", "eu-2"], True),
            (1, ["us-1"], False),
        ]

        diff = fleet.run("schema", "diff", "eu-1", DRIFTED)
        assert diff.exit_code == 3, diff.output
        assert expected in diff.stdout, diff.stdout
        assert fleet.run("schema", "diff", "eu-1", "eu-2").exit_code == 0
        whole = fleet.run("schema", "diff", "--fleet")
        assert whole.exit_code == 3 and f"at {HEAD}: us-1 (×" in whole.stdout, whole.output
        assert expected.replace("eu-1", "ap-1") in whole.stdout or expected in whole.stdout, whole.stdout
    finally:
        execute(fleet, changed, *undo)
    assert digest(fleet, DRIFTED) == same
    after = fleet.run("schema", "status")
    assert after.exit_code == 0 and f"all 4 stamps at head {HEAD}" in after.stdout, after.output
    assert re.search(rf"4 stamps at {HEAD}, 1 fingerprint: 4 ×[0-9a-f]{{4}}\n?", after.stdout)


def cached(fleet: Fleet, stamp: str) -> str:
    """The digest as `schema status` reads it, in a new session: from the stamp's cache if it holds."""
    with dsnlib.connect(fleet.dsn(stamp), autocommit=True) as conn:
        return cached_digest(conn)


# Changes that rewrite one catalog row or delete some, beside the kinds above: (statements, undo)
MORE_CHANGES = {
    "dropped index": (["DROP INDEX users_tenant_id"], ["CREATE INDEX users_tenant_id ON users (tenant_id)"]),
    "renamed index": (
        ["ALTER INDEX users_tenant_id RENAME TO users_tenant"],
        ["ALTER INDEX users_tenant RENAME TO users_tenant_id"],
    ),
    "renamed enum label": (
        ["ALTER TYPE task_status RENAME VALUE 'done' TO 'finished'"],
        ["ALTER TYPE task_status RENAME VALUE 'finished' TO 'done'"],
    ),
}
CHANGES = {**{name: (change[1], change[2]) for name, change in DRIFTS.items()}, **MORE_CHANGES}


@pytest.mark.parametrize("change", CHANGES)
def test_each_structural_change_is_seen_through_the_stamps_fingerprint_cache(fleet4m: Fleet, change: str) -> None:
    """The cached digest is believed while the catalog is unchanged (a planted one comes back), and
    after each change, and its undo, the digest read in full comes back instead."""
    fleet = fleet4m
    statements, undo = CHANGES[change]
    before = digest(fleet, DRIFTED)
    assert cached(fleet, DRIFTED) == before
    execute(fleet, (DRIFTED,), "UPDATE _migrator.fingerprint SET digest = 'planted'")
    assert cached(fleet, DRIFTED) == "planted"
    execute(fleet, (DRIFTED,), *statements)
    try:
        changed = digest(fleet, DRIFTED)
        assert changed != before
        assert cached(fleet, DRIFTED) == changed
        execute(fleet, (DRIFTED,), "UPDATE _migrator.fingerprint SET digest = 'planted'")
        assert cached(fleet, DRIFTED) == "planted"
    finally:
        execute(fleet, (DRIFTED,), *undo)
    assert cached(fleet, DRIFTED) == before


def test_the_fingerprint_cache_watches_every_catalog_the_fingerprint_reads(fleet4m: Fleet) -> None:
    named = set(re.findall(r"\bpg_[a-z_]+\b", fingerprints._OBJECTS))
    with dsnlib.connect(fleet4m.dsn("eu-1"), autocommit=True) as conn:
        catalogs = {
            row[0]
            for row in conn.execute(
                "SELECT relname::text FROM pg_class WHERE relnamespace = 'pg_catalog'::regnamespace"
                " AND relkind = 'r' AND relname = ANY(%s)",
                (sorted(named),),
            )
        }
    assert "pg_attrdef" in catalogs and catalogs <= set(fingerprints.WATCHED)


def test_a_session_that_may_not_write_reads_the_fingerprint_in_full(fleet4m: Fleet) -> None:
    fleet = fleet4m
    execute(fleet, ("eu-2",), "DROP SCHEMA IF EXISTS _migrator CASCADE")
    with dsnlib.connect(fleet.dsn("eu-2"), autocommit=True) as conn:
        conn.execute("SET default_transaction_read_only = on")
        assert cached_digest(conn) == fingerprint(conn).digest
        assert conn.execute("SELECT to_regnamespace('_migrator')").fetchone() == (None,)


def test_column_order_partition_names_and_migrators_own_objects_do_not_count(fleet4m: Fleet) -> None:
    fleet = fleet4m
    before = digest(fleet, "eu-1")
    partitioned = (
        "CREATE TABLE events (id bigint, at date, tenant_id bigint, PRIMARY KEY (id, at)) PARTITION BY RANGE (at)"
    )
    execute(
        fleet, MAJORITY, "CREATE TABLE labels (id bigint PRIMARY KEY, tenant_id bigint NOT NULL, name text, color text)"
    )
    execute(
        fleet,
        (DRIFTED,),
        "CREATE TABLE labels (color text, name text, tenant_id bigint NOT NULL, id bigint PRIMARY KEY)",
    )
    execute(
        fleet,
        (*MAJORITY, DRIFTED),
        partitioned,
        "CREATE INDEX ON events (tenant_id)",
    )
    execute(
        fleet,
        MAJORITY,
        "CREATE TABLE events_2024 PARTITION OF events FOR VALUES FROM ('2024-01-01') TO ('2025-01-01')",
        "CREATE TABLE events_2025 PARTITION OF events FOR VALUES FROM ('2025-01-01') TO ('2026-01-01')",
    )
    execute(  # other names, created in another order: their indexes and constraints are named otherwise too
        fleet,
        (DRIFTED,),
        "CREATE TABLE p_b PARTITION OF events FOR VALUES FROM ('2025-01-01') TO ('2026-01-01')",
        "CREATE TABLE p_a PARTITION OF events FOR VALUES FROM ('2024-01-01') TO ('2025-01-01')",
    )
    try:
        assert digest(fleet, DRIFTED) == digest(fleet, "eu-1") != before
        with dsnlib.connect(fleet.dsn("eu-2"), autocommit=True) as conn:  # a move's guard, as on a source
            layout = fleet.layout("eu-2")
            fence.guard(conn, layout, ("5",), move_id=1, fenced=False, capture=True)
            assert conn.execute("SELECT count(*) FROM pg_trigger WHERE tgname = 'migrator_guard'").fetchone()[0] > 0
            assert digest(fleet, "eu-2") == digest(fleet, "eu-1")
            fence.unguard(conn, layout, ("5",))
        status = fleet.run("schema", "status")
        assert status.exit_code == 0, status.output
        assert re.search(rf"4 stamps at {HEAD}, 1 fingerprint: 4 ×", status.stdout)
        diff = fleet.run("schema", "diff", "eu-1", DRIFTED)
        assert diff.exit_code == 0 and "eu-1 and us-1 have the same structure" in diff.stdout, diff.output
        assert fleet.run("schema", "diff", "--fleet").exit_code == 0
    finally:
        execute(
            fleet,
            (*MAJORITY, DRIFTED),
            "DROP TABLE labels",
            "DROP TABLE events",
            "DROP SCHEMA IF EXISTS _migrator CASCADE",
        )
    assert digest(fleet, DRIFTED) == before


def test_status_groups_by_revision_and_a_tie_has_no_majority(fleet4m: Fleet) -> None:
    fleet = fleet4m
    execute(fleet, ("eu-1", "eu-2"), "CREATE INDEX tasks_due_idx ON tasks (tenant_id, due_at)")
    try:
        found = fleet_status(fleet.ctx)
        assert [(len(s.stamps), s.majority) for s in found.structures] == [(2, False), (2, False)]
        assert all(r.odd and r.drift for r in found.stamps)
        status = fleet.run("schema", "status")
        assert status.exit_code == 3
        assert "2 fingerprints: 2 ×" in status.stdout and "(no majority: every group drifts)" in status.stdout
    finally:
        execute(fleet, ("eu-1", "eu-2"), "DROP INDEX tasks_due_idx")


def test_diff_refuses_bad_input(fleet4m: Fleet) -> None:
    for args, message in (
        ((), "give two stamps to compare"),
        (("eu-1",), "give two stamps to compare"),
        (("eu-1", "eu-2", "--fleet"), "not both"),
        (("eu-1", "mars-1"), "unknown stamp 'mars-1'"),
    ):
        result = fleet4m.run("schema", "diff", *args)
        assert result.exit_code == 2 and message in result.stderr, (args, result.output)


# -- moves --------------------------------------------------------------------------------------------


def test_a_move_onto_a_stamp_with_an_extra_check_its_rows_violate_is_refused_before_any_write(fleet: Fleet) -> None:
    fleet.seed("eu-1", 1, 60)
    execute(fleet, ("eu-2",), "ALTER TABLE tasks ADD CONSTRAINT tasks_title_short CHECK (length(title) < 3)")
    catalog = catalog_snapshot(fleet)
    result = fleet.run("move", "1", "--to", "eu-2", "--yes")
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert (
        "constraint tasks.tasks_title_short: only on eu-2 (CHECK ((length(title) < 3)))"
        " (`migrator schema diff eu-1 eu-2` shows every difference)" in result.stderr
    ), result.stderr
    assert catalog_snapshot(fleet) == catalog
    assert tenant_row_count(fleet.dsn("eu-2"), fleet.layout(), "1") == 0
    for stamp in ("eu-1", "eu-2"):
        with dsnlib.connect(fleet.dsn(stamp), autocommit=True) as conn:
            assert conn.execute("SELECT to_regnamespace('_migrator')").fetchone() == (None,)
            assert conn.execute("SELECT count(*) FROM pg_trigger WHERE tgname = 'migrator_guard'").fetchone() == (0,)


def test_a_move_onto_a_stamp_with_an_extra_plain_index_goes_ahead_noting_it(fleet: Fleet) -> None:
    rows = fleet.seed("eu-1", 1, 60)
    execute(fleet, ("eu-2",), "CREATE INDEX tasks_due_idx ON tasks (tenant_id, due_at)")
    result = fleet.run("move", "1", "--to", "eu-2", "--yes")
    assert result.exit_code == 0, result.output
    assert (
        "eu-1 and eu-2 differ where a move neither writes nor checks: index tasks_due_idx: only on eu-2"
        in result.stderr
    ), result.stderr
    assert tenant_row_count(fleet.dsn("eu-2"), fleet.layout(), "1") == rows


def test_plan_names_a_structural_difference_its_moves_would_be_refused_for(fleet: Fleet, tmp_path: Path) -> None:
    fleet.seed("eu-1", 1, 30)
    execute(fleet, ("eu-2",), "ALTER TABLE tasks ALTER COLUMN title TYPE varchar(20)")
    planned = fleet.run("plan", "isolate", "1", "--to", "eu-2", "-o", str(tmp_path / "isolate.yaml"))
    assert planned.exit_code == 0, planned.output
    assert "column tasks.title: text NOT NULL on eu-1, character varying(20) NOT NULL on eu-2" in planned.output


def test_an_extra_trigger_on_the_target_is_refused_unless_the_operator_vouches_for_it(fleet: Fleet) -> None:
    rows = fleet.seed("eu-1", 1, 60)
    execute(
        fleet,
        ("eu-2",),
        "CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN RETURN NEW; END$$",
        "CREATE TRIGGER tasks_touch BEFORE INSERT ON tasks FOR EACH ROW EXECUTE FUNCTION touch()",
    )
    refused = fleet.run("move", "1", "--to", "eu-2", "--yes")
    assert refused.exit_code == 2, refused.output
    assert "trigger tasks.tasks_touch: only on eu-2 (CREATE TRIGGER tasks_touch BEFORE INSERT ON public.tasks" in (
        refused.stderr
    )
    assert "--allow-triggers for a trigger known to be harmless" in refused.stderr
    assert "function touch()" not in refused.stderr  # a function is only noted
    assert tenant_row_count(fleet.dsn("eu-2"), fleet.layout(), "1") == 0
    moved = fleet.run("move", "1", "--to", "eu-2", "--allow-triggers", "--yes")
    assert moved.exit_code == 0, moved.output
    assert "differ where a move neither writes nor checks: trigger tasks.tasks_touch: only on eu-2" in moved.stderr
    assert tenant_row_count(fleet.dsn("eu-2"), fleet.layout(), "1") == rows
