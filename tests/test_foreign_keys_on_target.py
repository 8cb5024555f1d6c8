"""Foreign keys the target's database does not check for migrator's writes are proved by migrator.

The test fleet's role may run its target writes as `replica` (superuser), where PostgreSQL skips
foreign-key checks: a reference into reference data the target lacks is refused before any write,
and a parent that vanished from the target during the copy stops the move before its flip.
"""

from __future__ import annotations

import time

from conftest import Fleet, catalog_snapshot, copy_held, copy_waits_at_held_table, stamp_snapshot

from migrator.db import dsn as dsnlib


def _plan_of(fleet: Fleet, tenant: int) -> str:
    with dsnlib.connect(fleet.dsn("eu-1"), autocommit=True) as conn:
        return str(conn.execute("SELECT plan_code FROM tenants WHERE id = %s", (tenant,)).fetchone()[0])


def test_a_reference_into_reference_data_the_target_lacks_is_refused_before_any_write(fleet: Fleet) -> None:
    fleet.seed("eu-1", 7, 500)
    plan = _plan_of(fleet, 7)
    with dsnlib.connect(fleet.dsn("eu-2"), autocommit=True) as conn:
        conn.execute("DELETE FROM billing_plans WHERE code = %s", (plan,))  # no tenant on eu-2 uses it
    before = (catalog_snapshot(fleet), stamp_snapshot(fleet.dsn("eu-1")), stamp_snapshot(fleet.dsn("eu-2")))
    for mode in ("--dry-run", "--yes"):
        result = fleet.run("move", "7", "--to", "eu-2", mode)
        assert result.exit_code == 2, result.output
        assert result.stderr.count("\n") == 1
        assert f"reference ({plan}) in billing_plans (foreign key tenants_plan_code_fkey)" in result.stderr
        assert "which target eu-2 does not hold" in result.stderr
    assert (catalog_snapshot(fleet), stamp_snapshot(fleet.dsn("eu-1")), stamp_snapshot(fleet.dsn("eu-2"))) == before


def test_a_parent_removed_from_the_target_during_the_copy_stops_the_move_unflipped(fleet: Fleet) -> None:
    fleet.seed("eu-1", 7, 2_000)
    proc = fleet.popen("move", "7", "--to", "eu-2", "--yes")
    with copy_held(fleet, "eu-2"):
        deadline = time.monotonic() + 60
        while not copy_waits_at_held_table(fleet, "eu-2"):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the copy never reached its last table"
            time.sleep(0.05)
        with dsnlib.connect(fleet.dsn("eu-2"), autocommit=True, pinned=False) as conn:
            conn.execute("SET session_replication_role = replica")  # another writer skipping the checks
            first = "SELECT min(id) FROM tasks WHERE tenant_id = 7"
            conn.execute(f"DELETE FROM tasks WHERE tenant_id = 7 AND id = ({first})")
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 1, out + err
    assert "foreign keys of tenant 7's rows do not resolve on eu-2, route not flipped" in err
    assert "reference no row of tasks (foreign key" in err
    assert fleet.catalog.route("7").stamp == "eu-1"
    move = fleet.catalog.open_move("7")
    assert move is not None and move.phase == "copied"
    assert move.write_mode == "replica" and "proves every foreign key" in (move.write_mode_reason or "")
    aborted = fleet.run("move", "abort", str(move.id), "--yes")
    assert aborted.exit_code == 0, aborted.output
    with dsnlib.connect(fleet.dsn("eu-1"), autocommit=True, pinned=False) as conn:
        conn.execute("UPDATE tenants SET name = 'writable after the abort' WHERE id = 7")
