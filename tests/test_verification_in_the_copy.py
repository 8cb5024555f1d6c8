"""Verification folded into the copy: every batch is proven as it commits, and before the flip only
what the batches did not prove is compared; a target row written by anything but the copy is caught."""

from __future__ import annotations

import json
import threading

import pytest
from conftest import Fleet, tenant_digest

from migrator.db import dsn as dsnlib
from migrator.errors import Interrupted
from migrator.move import MoveOptions, move_tenants
from migrator.move.verify import tenant_checksums
from migrator.progress import Silent

ROWS, BATCH = 6_000, 1_000


class StopsAfterTheCopy(Silent):
    """Stops the move when its copy is complete: at the catch-up's first safe point, as Ctrl-C would."""

    def __init__(self) -> None:
        self.stop = threading.Event()

    def phase(self, message: str) -> None:
        if message.startswith("catching up"):
            self.stop.set()


def _copied(fleet: Fleet) -> int:
    """Tenant 7 copied to eu-2 and the move stopped before its catch-up; returns the move's id."""
    fleet.seed("eu-1", 7, ROWS)
    progress = StopsAfterTheCopy()
    with pytest.raises(Interrupted):
        move_tenants(fleet.ctx, ("7",), "eu-2", MoveOptions(batch_rows=BATCH), progress, progress.stop)
    move = fleet.catalog.open_move("7")
    assert move is not None and move.phase == "copied"
    return move.id


def _batches(fleet: Fleet, move_id: int | None = None) -> list[tuple[str, int, bool]]:
    """The copy's batches recorded on eu-2 (of one move, or of any)."""
    with dsnlib.connect(fleet.dsn("eu-2"), autocommit=True) as conn:
        rows = conn.execute(
            "SELECT table_name, rows, proven FROM _migrator.copy_batches"
            " WHERE move_id = coalesce(%s, move_id) ORDER BY xid",
            (move_id,),
        ).fetchall()
    return [(table, int(count), proven) for table, count, proven in rows]


def test_every_batch_is_proven_as_it_commits_and_the_move_compares_nothing_twice(fleet: Fleet) -> None:
    move_id = _copied(fleet)
    batches = _batches(fleet, move_id)
    per_table: dict[str, int] = {}
    for table, rows, proven in batches:
        assert proven, (table, rows)
        per_table[table] = per_table.get(table, 0) + rows
    counted = {t.table_name: t.rows_total for t in fleet.catalog.tables(move_id)}
    assert per_table == {t: n for t, n in counted.items() if n}  # every row in exactly one proven batch
    assert max(rows for _, rows, _ in batches) == BATCH

    moved = fleet.run("move", "7", "--to", "eu-2", "--yes")
    assert moved.exit_code == 0, moved.output + moved.stderr
    layout = fleet.layout()
    assert tenant_digest(fleet.dsn("eu-2"), layout, "7") == tenant_digest(fleet.dsn("eu-1"), layout, "7")
    assert _batches(fleet) == []  # forgotten at the flip


CORRUPTIONS = {
    # a value changed by an application session
    "changed": (
        "SELECT id FROM tasks WHERE tenant_id = 7 ORDER BY id OFFSET 2500 LIMIT 1",
        "UPDATE tasks SET title = title || ' (edited on the target)' WHERE tenant_id = 7 AND id = %s",
        "changed",
    ),
    # the same, by a session whose triggers do not fire (as migrator's own copy runs)
    "changed as replica": (
        "SELECT id FROM tasks WHERE tenant_id = 7 ORDER BY id OFFSET 100 LIMIT 1",
        "SET session_replication_role = replica;"
        " UPDATE tasks SET estimate_hours = 0.01 WHERE tenant_id = 7 AND id = %s",
        "changed",
    ),
    # a copied row deleted
    "deleted": (
        "SELECT id FROM comments WHERE tenant_id = 7 ORDER BY id DESC LIMIT 1",
        "DELETE FROM comments WHERE tenant_id = 7 AND id = %s",
        "missing on target",
    ),
    # a row the source never had
    "inserted": (
        "SELECT max(id) + 1000 FROM tasks WHERE tenant_id = 7",
        "INSERT INTO tasks (tenant_id, id, project_id, title) OVERRIDING SYSTEM VALUE"
        " SELECT 7, %s, project_id, 'written on the target' FROM tasks WHERE tenant_id = 7 LIMIT 1",
        "extra on target",
    ),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_a_target_row_written_between_the_copy_and_the_flip_stops_the_flip_naming_its_key(
    fleet: Fleet, corruption: str
) -> None:
    pick, write, named = CORRUPTIONS[corruption]
    _copied(fleet)
    with dsnlib.connect(fleet.dsn("eu-2"), autocommit=True) as conn:
        key = conn.execute(pick).fetchone()[0]
        for statement in write.split(";"):
            conn.execute(statement, (key,) if "%s" in statement else None)

    resumed = fleet.run("move", "7", "--to", "eu-2", "--yes")
    assert resumed.exit_code == 1, resumed.output
    assert "route not flipped" in resumed.stderr and f"{named}: (7, {key})" in resumed.stderr, resumed.stderr
    assert fleet.catalog.route("7").stamp == "eu-1"
    move = fleet.catalog.open_move("7")
    assert move is not None and f"(7, {key})" in (move.error or "")


def test_the_record_of_what_moved_equals_the_sources_checksums_whether_hashed_or_taken_from_the_batches(
    fleet: Fleet,
) -> None:
    """Cleanup's proof compares the source with this record: tables the move changed nothing of take it
    from the copy's batches, `tasks`, written during the move, from a hash; both must be the truth."""
    move_id = _copied(fleet)
    with dsnlib.connect(fleet.dsn("eu-1"), autocommit=True) as conn:  # captured: catch-up replays them
        updated = conn.execute(
            "UPDATE tasks SET title = title || ' (after the copy)' WHERE tenant_id = 7"
            " AND id IN (SELECT id FROM tasks WHERE tenant_id = 7 ORDER BY id LIMIT 50)"
        )
        assert updated.rowcount == 50
    moved = fleet.run("move", "7", "--to", "eu-2", "--yes")
    assert moved.exit_code == 0, moved.output + moved.stderr
    recorded = {t.table_name: json.loads(t.source_checksum or "{}") for t in fleet.catalog.tables(move_id)}
    layout = fleet.layout()
    with dsnlib.connect(fleet.dsn("eu-1"), autocommit=True) as conn:
        for table in layout.tables:
            truth = tenant_checksums(conn, table, ("7",))
            assert recorded[table.label] == {t: [c.rows, str(c.high), str(c.low)] for t, c in truth.items()}, table
    cleaned = fleet.run("cleanup", "7", "--stamp", "eu-1", "--yes")
    assert cleaned.exit_code == 0, cleaned.output + cleaned.stderr
