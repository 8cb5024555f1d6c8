"""The revert window: a flipped move taken back in seconds, with every write made on its target since.

An application writes through `migrator.router` the whole time. The oracle is the writer's own
record of what the database acknowledged, and the tables read with hand-written SQL.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from conftest import Fleet, new_fleet, tenant_digest

from migrator.db import dsn as dsnlib
from migrator.local import pgserver, provision
from migrator.local.seed import TenantSpec, seed_fleet_stamp
from migrator.move.fence import FENCED_SQLSTATE
from migrator.testing.writer import Workload


@pytest.fixture(scope="module")
def small_template(pg: pgserver.LocalServer, templates: dict[str, str]) -> str:
    """A stamp at head holding tenants 7, 8 and 9, a few thousand rows each, seeded once for the module."""
    dsn = provision.create_database(pg, "tpl_revert", template=templates["stamp"])
    seed_fleet_stamp(dsn, [TenantSpec(7, 4_000), TenantSpec(8, 2_000), TenantSpec(9, 1_000)])
    yield "tpl_revert"
    provision.drop_database(pg, "tpl_revert")


@pytest.fixture
def small(pg: pgserver.LocalServer, templates: dict[str, str], small_template: str, tmp_path: Path) -> Iterator[Fleet]:
    with new_fleet(pg, templates, tmp_path, clones={"eu-1": small_template}) as fleet:
        for tenant in ("7", "8", "9"):
            fleet.catalog.set_route(tenant, "eu-1")
        yield fleet


def _wait(predicate: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _writes_on(writer: Workload, stamp: str) -> int:
    return sum(1 for s in writer.touched_on.values() if s == stamp)


def _fenced(dsn: str, tenant: int) -> bool:
    """Whether the stamp rejects an application's write of the tenant with the fence's SQLSTATE."""
    with dsnlib.connect(dsn, autocommit=True, pinned=False) as conn:
        try:
            with conn.transaction(force_rollback=True):
                conn.execute("UPDATE tenants SET name = name WHERE id = %s", (tenant,))
        except psycopg.Error as exc:
            assert exc.sqlstate == FENCED_SQLSTATE, exc
            return True
    return False


def _guards(dsn: str) -> list[tuple[str, bool, bool]]:
    """The stamp's guards (tenant, fenced, capture), read by hand; none without migrator's schema."""
    with dsnlib.connect(dsn, autocommit=True) as conn:
        if not conn.execute("SELECT to_regclass('_migrator.guarded_tenants') IS NOT NULL").fetchone()[0]:  # type: ignore[index]
            return []
        rows = conn.execute("SELECT tenant, fenced, capture FROM _migrator.guarded_tenants ORDER BY 1")
        return [(r[0], r[1], r[2]) for r in rows]


def _triggers(dsn: str) -> int:
    with dsnlib.connect(dsn, autocommit=True) as conn:
        return int(conn.execute("SELECT count(*) FROM pg_trigger WHERE tgname = 'migrator_guard'").fetchone()[0])  # type: ignore[index]


def _move(fleet: Fleet, *args: str) -> dict:  # type: ignore[type-arg]
    result = fleet.run("move", *args, "--yes", "--json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def test_revert_brings_every_write_made_on_the_target_back_then_forward_again(small: Fleet) -> None:
    fleet = small
    writer = Workload(fleet.catalog.url, fleet.stamps, 8, seed=8).start()
    neighbour = Workload(fleet.catalog.url, fleet.stamps, 9, seed=9).start()
    _wait(lambda: writer.acked > 50, "the writer to start")
    forward = _move(fleet, "8", "--to", "eu-2")["move"]
    assert forward["window_opened_at"] is not None
    # Inserts, updates, key changes and deletes on the target, for a few seconds.
    _wait(lambda: _writes_on(writer, "eu-2") > 200, "writes on the target")
    assert _guards(fleet.dsn("eu-2")) == [("8", False, True)]  # the window captures on the target
    assert _fenced(fleet.dsn("eu-1"), 8)  # the old copy stays fenced against the application
    status = fleet.run("move", "status", str(forward["id"]))
    assert "revert window: open since" in status.stdout and "reverse backlog" in status.stdout

    reverted = _move(fleet, "revert", str(forward["id"]))
    revert = reverted["move"]
    assert revert["reverts"] == forward["id"] and revert["source"] == "eu-2" and revert["target"] == "eu-1"
    assert reverted["routes"][0]["stamp"] == "eu-1"
    assert reverted["routes"][0]["version"] == forward["route_version"] + 2
    assert {"fence", "writers", "drain", "keys", "flip"} <= set(reverted["freeze_steps_ms"])
    assert revert["window_opened_at"] is None  # a revert opens no window of its own
    assert revert["freeze_ms"] < 2000

    _wait(lambda: writer.touched_on and _writes_on(writer, "eu-1") > 0 and writer.acked > 0, "writes back home")
    writes_before = writer.acked
    _wait(lambda: writer.acked > writes_before + 100, "writes after the revert")
    writer.stop()
    neighbour.stop()
    assert writer.errors == [] and neighbour.errors == []
    assert neighbour.fenced_errors == 0
    assert writer.lost_writes(fleet.dsn("eu-1")) == []  # every acknowledged write, wherever it was made
    assert not _fenced(fleet.dsn("eu-1"), 8) and _fenced(fleet.dsn("eu-2"), 8)
    assert _guards(fleet.dsn("eu-1")) == [] and _triggers(fleet.dsn("eu-1")) == 0
    assert _guards(fleet.dsn("eu-2")) == [("8", True, False)]  # the revert's leftover, fenced, no capture
    with dsnlib.connect(fleet.dsn("eu-2"), autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM _migrator.changes").fetchone() == (0,)
    shown = fleet.run("move", "status", str(forward["id"])).stdout
    assert "phase reverted" in shown and f"used by move {revert['id']}" in shown
    audit = fleet.run("audit", "--tenant", "8", "--json")
    actions = [(r["action"], r["move_id"]) for r in json.loads(audit.stdout)]
    assert actions[-2:] == [("move", forward["id"]), ("revert", revert["id"])]
    again = fleet.run("move", "revert", str(forward["id"]), "--yes")
    assert again.exit_code == 0 and "back on eu-1" in again.stdout  # a second run changes nothing

    # Forward again: the revert's leftover goes, then a plain move carries everything back.
    cleaned = fleet.run("cleanup", "--move", str(revert["id"]), "--yes")
    assert cleaned.exit_code == 0, cleaned.stderr
    second = _move(fleet, "8", "--to", "eu-2")["move"]
    assert writer.lost_writes(fleet.dsn("eu-2")) == []
    layout = fleet.layout()
    assert tenant_digest(fleet.dsn("eu-2"), layout, "8") == tenant_digest(fleet.dsn("eu-1"), layout, "8")
    cleaned = fleet.run("cleanup", "--move", str(second["id"]), "--yes")
    assert cleaned.exit_code == 0, cleaned.stderr
    assert _guards(fleet.dsn("eu-2")) == [] and _triggers(fleet.dsn("eu-2")) == 0
    assert _guards(fleet.dsn("eu-1")) == [] and _triggers(fleet.dsn("eu-1")) == 0


def _code(result: object) -> int:
    return int(result.exit_code)  # type: ignore[attr-defined]


def test_revert_refused_with_its_reason_before_anything_changes(small: Fleet) -> None:
    fleet = small
    plain = _move(fleet, "9", "--to", "eu-2", "--no-revert-window")["move"]
    assert plain["window_opened_at"] is None
    assert _triggers(fleet.dsn("eu-2")) == 0 and _guards(fleet.dsn("eu-2")) == []  # no trigger overhead there
    refused = fleet.run("move", "revert", str(plain["id"]), "--yes")
    assert _code(refused) == 2 and "flipped without a revert window (--no-revert-window)" in refused.stderr

    forward = _move(fleet, "8", "--to", "eu-2")["move"]
    # A forward move of a tenant inside an open window: refused naming the window, nothing written.
    onward = fleet.run("move", "8", "--to", "us-1", "--yes")
    assert _code(onward) == 2
    assert f"move {forward['id']} of tenant 8 (eu-1 -> eu-2, phase flipped) keeps a revert window open" in onward.stderr
    assert _guards(fleet.dsn("us-1")) == [] and fleet.catalog.route("8").stamp == "eu-2"
    dry = fleet.run("move", "revert", str(forward["id"]), "--dry-run")
    assert dry.exit_code == 0 and "can be reverted" in dry.stdout

    # A route changed behind the window's back (by hand in the catalog): the revert will not flip it.
    with dsnlib.connect(fleet.catalog.url, autocommit=True) as conn:
        conn.execute("UPDATE routes SET version = version + 1 WHERE tenant = '8'")
    moved_on = fleet.run("move", "revert", str(forward["id"]), "--yes")
    assert _code(moved_on) == 2 and "the route of tenant 8 moved on since move" in moved_on.stderr
    with dsnlib.connect(fleet.catalog.url, autocommit=True) as conn:
        conn.execute("UPDATE routes SET version = version - 1 WHERE tenant = '8'")

    cleaned = fleet.run("cleanup", "--move", str(forward["id"]), "--yes")
    assert cleaned.exit_code == 0, cleaned.stderr
    assert f"closed the revert window of move {forward['id']}" in cleaned.stderr
    assert _guards(fleet.dsn("eu-2")) == [] and _triggers(fleet.dsn("eu-2")) == 0  # the capture went first
    closed = fleet.run("move", "revert", str(forward["id"]), "--yes")
    assert _code(closed) == 2 and f"the revert window of move {forward['id']} closed at" in closed.stderr
    assert "until cleanup closed it" in fleet.run("move", "status", str(forward["id"])).stdout
    assert [m.reverts for m in fleet.catalog.moves()] == [None, None]  # no revert was ever recorded


def test_cohort_revert_flips_every_route_back_together(small: Fleet) -> None:
    fleet = small
    writers = [Workload(fleet.catalog.url, fleet.stamps, t, seed=t).start() for t in (7, 8)]
    _wait(lambda: all(w.acked > 20 for w in writers), "the writers to start")
    forward = _move(fleet, "7", "8", "--to", "eu-2")["move"]
    _wait(lambda: all(_writes_on(w, "eu-2") > 50 for w in writers), "writes on the target")
    reverted = _move(fleet, "revert", str(forward["id"]))
    assert [(r["tenant"], r["stamp"]) for r in reverted["routes"]] == [("7", "eu-1"), ("8", "eu-1")]
    _wait(lambda: all(_writes_on(w, "eu-1") > 0 for w in writers), "writes back home")
    for writer in writers:
        writer.stop()
        assert writer.errors == [] and writer.lost_writes(fleet.dsn("eu-1")) == []
    audit = json.loads(fleet.run("audit", "--json").stdout)
    assert [(r["action"], r["tenants"]) for r in audit if r["action"] == "revert"] == [("revert", ["7", "8"])]


def _revert_of(fleet: Fleet, move_id: int) -> object | None:
    reverts = [m for m in fleet.catalog.moves() if m.reverts == move_id]
    return reverts[0] if reverts else None


def _lock_waits(dsn: str) -> int:
    with dsnlib.connect(dsn, autocommit=True, pinned=False) as conn:
        return int(conn.execute("SELECT count(*) FROM pg_locks WHERE NOT granted").fetchone()[0])  # type: ignore[index]


def test_kill_9_in_each_phase_of_a_revert_then_resume_then_abort(small: Fleet) -> None:
    fleet = small
    writer = Workload(fleet.catalog.url, fleet.stamps, 7, seed=7).start()
    _wait(lambda: writer.acked > 20, "the writer to start")
    forward = _move(fleet, "7", "--to", "eu-2")["move"]
    _wait(lambda: _writes_on(writer, "eu-2") > 100, "writes on the target")

    # Killed in catch-up: the old source's table is held, so the replay waits there.
    with dsnlib.connect(fleet.dsn("eu-1"), pinned=False) as hold:
        hold.execute("LOCK TABLE tasks IN SHARE MODE")
        proc = fleet.popen("move", "revert", str(forward["id"]), "--yes")
        _wait(lambda: _revert_of(fleet, forward["id"]) is not None and _lock_waits(fleet.dsn("eu-1")) > 0, "catch-up")
        proc.kill()
        proc.wait()
    revert = _revert_of(fleet, forward["id"])
    assert revert is not None and revert.phase == "synced"  # type: ignore[attr-defined]
    assert fleet.catalog.route("7").stamp == "eu-2" and not _fenced(fleet.dsn("eu-2"), 7)
    acked = writer.acked
    _wait(lambda: writer.acked > acked + 20, "writes on the target after the kill")

    # Resumed, then killed in the freeze: an application transaction in flight on the target holds it.
    held = dsnlib.connect(fleet.dsn("eu-2"), pinned=False)
    held.execute("UPDATE projects SET name = 'held write' WHERE tenant_id = 7")
    proc = fleet.popen("move", "revert", str(forward["id"]), "--yes", "--max-freeze-ms", "60000")
    _wait(lambda: fleet.catalog.move(revert.id).phase == "cutover", "the freeze")  # type: ignore[attr-defined]
    _wait(lambda: _lock_waits(fleet.dsn("eu-2")) > 0, "the freeze to wait for the held write")
    proc.kill()
    _, err = proc.communicate()
    assert f"resuming move {revert.id}" in err  # type: ignore[attr-defined]
    held.commit()  # it passed the guard before the fence: acknowledged, so it must survive
    held.close()
    assert _fenced(fleet.dsn("eu-2"), 7)  # killed inside the freeze: fenced until resumed or aborted

    aborted = fleet.run("move", "abort", str(revert.id), "--yes")  # type: ignore[attr-defined]
    assert aborted.exit_code == 0, aborted.stderr
    assert "stays on eu-2, writable" in aborted.stdout
    assert not _fenced(fleet.dsn("eu-2"), 7) and _guards(fleet.dsn("eu-2")) == [("7", False, True)]
    assert fleet.catalog.route("7").stamp == "eu-2" and fleet.catalog.move(forward["id"]).window_open
    acked = writer.acked
    _wait(lambda: writer.acked > acked + 20, "writes on the target after the abort")

    again = _move(fleet, "revert", str(forward["id"]))
    assert again["move"]["id"] != revert.id and again["routes"][0]["stamp"] == "eu-1"  # type: ignore[attr-defined]
    _wait(lambda: _writes_on(writer, "eu-1") > 0, "writes back home")
    writer.stop()
    assert writer.errors == [] and writer.lost_writes(fleet.dsn("eu-1")) == []
    with dsnlib.connect(fleet.dsn("eu-1"), autocommit=True) as conn:
        assert (
            conn.execute("SELECT count(*) FROM projects WHERE tenant_id = 7 AND name = 'held write'").fetchone()[0] > 0
        )  # type: ignore[index]


def test_apply_revert_takes_back_every_move_of_a_plan_still_in_its_window(small: Fleet, tmp_path: Path) -> None:
    fleet = small
    plan = tmp_path / "drain.yaml"
    assert fleet.run("plan", "drain", "eu-1", "--to", "eu-2,us-1", "-o", str(plan)).exit_code == 0
    applied = fleet.run("apply", str(plan), "--yes", "--json")
    assert applied.exit_code == 0, applied.stderr
    moves = {r["move_id"] for r in json.loads(applied.stdout)["results"]}
    assert {fleet.catalog.route(t).stamp for t in ("7", "8", "9")} <= {"eu-2", "us-1"}
    closed = min(moves)  # one of them cleaned up: its window is closed, it stays
    cleaned = fleet.run("cleanup", "--move", str(closed), "--yes")
    assert cleaned.exit_code == 0, cleaned.stderr
    stays = set(fleet.catalog.move(closed).tenants)

    reverted = fleet.run("apply", str(plan), "--revert", "--yes", "--json")
    assert reverted.exit_code == 0, reverted.stderr
    results = json.loads(reverted.stdout)["results"]
    assert sorted((r["move_id"] is not None, r["status"]) for r in results).count((True, "done")) == len(moves) - 1
    assert [r["reason"] for r in results if r["status"] == "skipped"] == ["no open revert window"]
    for tenant in ("7", "8", "9"):
        assert (fleet.catalog.route(tenant).stamp == "eu-1") == (tenant not in stays)
    again = fleet.run("apply", str(plan), "--revert", "--yes", "--json")
    assert again.exit_code == 0 and all(r["status"] == "skipped" for r in json.loads(again.stdout)["results"])


def test_revert_refused_across_schema_revisions_and_two_operators_never_both_win(small: Fleet) -> None:
    fleet = small
    forward = _move(fleet, "8", "--to", "eu-2")["move"]
    with dsnlib.connect(fleet.dsn("eu-1"), autocommit=True) as conn:  # as if a rollout reached eu-1 only
        (revision,) = conn.execute("SELECT version_num FROM alembic_version").fetchone()  # type: ignore[misc]
        conn.execute("UPDATE alembic_version SET version_num = 'elsewhere'")
    refused = fleet.run("move", "revert", str(forward["id"]), "--yes")
    assert _code(refused) == 2 and "schema revisions differ: eu-2 is at" in refused.stderr
    assert fleet.catalog.route("8").stamp == "eu-2" and _fenced(fleet.dsn("eu-1"), 8)
    with dsnlib.connect(fleet.dsn("eu-1"), autocommit=True) as conn:
        conn.execute("UPDATE alembic_version SET version_num = %s", (revision,))

    operators = [fleet.popen("move", "revert", str(forward["id"]), "--yes") for _ in range(2)]
    codes = [proc.wait(timeout=120) for proc in operators]
    assert 0 in codes
    flipped = [m for m in fleet.catalog.moves() if m.reverts == forward["id"] and m.phase == "flipped"]
    assert len(flipped) == 1  # one revert flipped the route back; the other found it done or the tenant locked
    route = fleet.catalog.route("8")
    assert (route.stamp, route.version) == ("eu-1", forward["route_version"] + 2)


def _items(dsn: str, tenant: int) -> list[tuple[str, int, str]]:
    """The tenant's checklist items (a path table: no tenant column), found by hand through their task."""
    with dsnlib.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT i.id::text, i.task_id, i.label || ':' || i.done FROM task_checklist_items i"
            " JOIN tasks t ON (t.tenant_id, t.id) = (i.task_tenant, i.task_id) WHERE t.tenant_id = %s ORDER BY 1",
            (tenant,),
        )
        return [(r[0], r[1], r[2]) for r in rows]


def test_revert_carries_rows_reached_only_through_foreign_keys_and_cleanup_leaves_no_orphan(small: Fleet) -> None:
    fleet = small
    seeded = _items(fleet.dsn("eu-1"), 8)
    assert seeded  # the seed gives tenant 8 checklist items, some of which the application deletes below
    forward = _move(fleet, "8", "--to", "eu-2")["move"]
    with dsnlib.connect(fleet.dsn("eu-2"), autocommit=True, pinned=False) as app:  # the application, on the target
        project = app.execute("SELECT min(id) FROM projects WHERE tenant_id = 8").fetchone()[0]  # type: ignore[index]
        task = app.execute(
            "INSERT INTO tasks (tenant_id, project_id, title) VALUES (8, %s, 'after the flip') RETURNING id", (project,)
        ).fetchone()[0]  # type: ignore[index]
        app.execute(
            "INSERT INTO task_checklist_items SELECT gen_random_uuid(), 8, %s, n, 'item ' || n"
            " FROM generate_series(1, 3) n",
            (task,),
        )
        app.execute("UPDATE task_checklist_items SET done = true WHERE task_tenant = 8 AND task_id = %s", (task,))
        app.execute("UPDATE tasks SET id = DEFAULT WHERE tenant_id = 8 AND id = %s", (task,))  # items follow (cascade)
        app.execute(  # items written before the move, deleted on the target
            "DELETE FROM task_checklist_items WHERE task_tenant = 8 AND task_id ="
            " (SELECT min(task_id) FROM task_checklist_items WHERE task_tenant = 8 AND task_id <> %s)",
            (task,),
        )
        doomed = app.execute(
            "INSERT INTO tasks (tenant_id, project_id, title) VALUES (8, %s, 'doomed') RETURNING id", (project,)
        ).fetchone()[0]  # type: ignore[index]
        app.execute("INSERT INTO task_checklist_items VALUES (gen_random_uuid(), 8, %s, 1, 'gone')", (doomed,))
        app.execute("DELETE FROM tasks WHERE tenant_id = 8 AND id = %s", (doomed,))  # its item goes by cascade
    on_target = _items(fleet.dsn("eu-2"), 8)
    assert len(on_target) < len(seeded) + 3  # some of the seeded items went
    assert sum(1 for _, _, label in on_target if label.endswith(":true")) >= 3

    revert = _move(fleet, "revert", str(forward["id"]))["move"]
    assert _items(fleet.dsn("eu-1"), 8) == on_target  # every path row as the application left it, found by hand
    layout = fleet.layout()
    assert tenant_digest(fleet.dsn("eu-1"), layout, "8") == tenant_digest(fleet.dsn("eu-2"), layout, "8")

    cleaned = fleet.run("cleanup", "--move", str(revert["id"]), "--yes")
    assert cleaned.exit_code == 0, cleaned.stderr
    with dsnlib.connect(fleet.dsn("eu-2"), autocommit=True) as conn:
        left = conn.execute("SELECT count(*) FROM task_checklist_items WHERE task_tenant = 8").fetchone()
        orphans = conn.execute(
            "SELECT count(*) FROM task_checklist_items i WHERE NOT EXISTS"
            " (SELECT 1 FROM tasks t WHERE (t.tenant_id, t.id) = (i.task_tenant, i.task_id))"
        ).fetchone()
    assert left == (0,) and orphans == (0,)
    assert _items(fleet.dsn("eu-1"), 8) == on_target
