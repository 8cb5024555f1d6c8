"""`move abort` before the flip removes the partial copy and makes the source writable again."""

from __future__ import annotations

import pytest
from conftest import Fleet, catalog_snapshot, tenant_digest, tenant_row_count

from migrator.db import dsn as dsnlib
from migrator.errors import VerifyMismatch
from migrator.move import MoveOptions, move_tenants
from migrator.move.fence import leftovers
from migrator.progress import Silent


def _corrupt_target_on_insert(fleet: Fleet) -> None:
    """A faulty target: a trigger that alters one task as it is copied in, so verification must fail.

    Enabled ALWAYS, it fires even in the replica mode migrator's copy runs in; such a trigger is refused
    by preflight unless the operator allows it, as this test does to get a failed verification."""
    with dsnlib.connect(fleet.dsn("eu-2"), autocommit=True) as conn:
        conn.execute(
            "CREATE FUNCTION corrupt() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
            " IF NEW.id % 97 = 5 THEN NEW.title := NEW.title || ' (corrupted)'; END IF; RETURN NEW; END $$"
        )
        conn.execute("CREATE TRIGGER corrupt BEFORE INSERT ON tasks FOR EACH ROW EXECUTE FUNCTION corrupt()")
        conn.execute("ALTER TABLE tasks ENABLE ALWAYS TRIGGER corrupt")


def test_abort_after_failed_verify_empties_target_and_unfences_source(fleet: Fleet) -> None:
    fleet.seed("eu-1", 7, 1_500)
    layout = fleet.layout()
    before = tenant_digest(fleet.dsn("eu-1"), layout, "7")
    _corrupt_target_on_insert(fleet)
    with pytest.raises(VerifyMismatch, match="tasks"):
        move_tenants(fleet.ctx, ("7",), "eu-2", MoveOptions(batch_rows=400, allow_triggers=True), Silent())

    move = fleet.catalog.open_move("7")
    assert move is not None and move.phase == "copied" and "tasks" in (move.error or "")
    assert fleet.catalog.route("7").stamp == "eu-1"  # never flipped on a mismatch

    result = fleet.run("move", "abort", str(move.id), "--yes")
    assert result.exit_code == 0, result.output
    assert tenant_row_count(fleet.dsn("eu-2"), layout, "7") == 0
    assert tenant_digest(fleet.dsn("eu-1"), layout, "7") == before
    assert fleet.catalog.move(move.id).phase == "aborted"
    with dsnlib.connect(fleet.dsn("eu-1"), autocommit=True) as conn:
        conn.execute("UPDATE tasks SET title = 'writable' WHERE tenant_id = 7")
        assert leftovers(conn) == []
    with dsnlib.connect(fleet.dsn("eu-2"), autocommit=True) as conn:
        assert leftovers(conn) == []


def test_abort_after_flip_is_refused(fleet: Fleet) -> None:
    fleet.seed("eu-1", 7, 300)
    outcome = move_tenants(fleet.ctx, ("7",), "eu-2", MoveOptions(), Silent())
    assert outcome.move is not None
    before = catalog_snapshot(fleet)
    result = fleet.run("move", "abort", str(outcome.move.id), "--yes")
    assert result.exit_code == 1
    assert "already flipped" in result.stderr
    assert catalog_snapshot(fleet) == before
