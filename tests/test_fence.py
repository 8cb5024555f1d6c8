"""Once fenced, the source rejects the tenant's writes in the database itself; others write freely."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest
from conftest import Fleet
from psycopg import sql

from migrator.db import dsn as dsnlib
from migrator.move import capture, fence


def _fence(fleet: Fleet, tenant: str) -> None:
    with dsnlib.connect(fleet.dsn("eu-1")) as conn:
        fence.fence(conn, fleet.layout(), (tenant,), move_id=1)


@pytest.mark.parametrize(
    "statement",
    [
        "INSERT INTO projects (tenant_id, name) VALUES (5, 'new')",
        "UPDATE tasks SET title = 'changed' WHERE tenant_id = 5",
        "DELETE FROM comments WHERE tenant_id = 5",
        "UPDATE tenants SET name = 'renamed' WHERE id = 5",
        "UPDATE projects SET tenant_id = 6 WHERE tenant_id = 5",
    ],
)
def test_fenced_tenant_writes_fail_with_dedicated_sqlstate(fleet: Fleet, statement: str) -> None:
    fleet.seed("eu-1", 5, 400)
    fleet.seed("eu-1", 6, 400)
    _fence(fleet, "5")
    with dsnlib.connect(fleet.dsn("eu-1"), autocommit=True, pinned=False) as conn:
        with pytest.raises(psycopg.Error) as caught:
            conn.execute(statement)
        assert caught.value.sqlstate == fence.FENCED_SQLSTATE
        assert "tenant 5 is fenced" in str(caught.value)


def test_other_tenants_write_while_one_is_fenced(fleet: Fleet) -> None:
    fleet.seed("eu-1", 5, 400)
    fleet.seed("eu-1", 6, 400)
    _fence(fleet, "5")
    with dsnlib.connect(fleet.dsn("eu-1"), autocommit=True, pinned=False) as conn:
        conn.execute("INSERT INTO projects (tenant_id, name) VALUES (6, 'fine')")
        assert conn.execute("UPDATE tasks SET title = 'ok' WHERE tenant_id = 6").rowcount > 0
        assert conn.execute("DELETE FROM comments WHERE tenant_id = 6").rowcount > 0
        assert conn.execute("SELECT count(*) FROM tasks WHERE tenant_id = 5").fetchone()[0] > 0  # reads still work


def test_unfencing_the_last_tenant_removes_the_triggers(fleet: Fleet) -> None:
    fleet.seed("eu-1", 5, 200)
    _fence(fleet, "5")
    layout = fleet.layout()
    with dsnlib.connect(fleet.dsn("eu-1")) as conn:
        fence.unguard(conn, layout, ("5",))
    with dsnlib.connect(fleet.dsn("eu-1"), autocommit=True) as conn:
        assert fence.leftovers(conn) == []
        conn.execute("UPDATE tasks SET title = 'writable again' WHERE tenant_id = 5")


def test_guarding_backs_off_instead_of_deadlocking_an_application_transaction(fleet: Fleet) -> None:
    """The app holds a child table and then needs its parent, which the guard locked first: the guard
    must give way (and retry), not leave PostgreSQL to kill the application with a deadlock."""
    fleet.seed("eu-1", 5, 400)
    layout = fleet.layout()
    order = [t.name for t in layout.tables]
    assert order.index("tasks") < order.index("comments")  # the guard locks tasks before comments
    guarded: list[BaseException | None] = []
    with dsnlib.connect(fleet.dsn("eu-1"), pinned=False) as app:
        app.execute("UPDATE comments SET body = body WHERE tenant_id = 5")  # holds comments

        def install() -> None:
            try:
                with dsnlib.connect(fleet.dsn("eu-1")) as conn:
                    fence.guard(conn, layout, ("5",), 1, fenced=False, capture=True)
                guarded.append(None)
            except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
                guarded.append(exc)

        worker = threading.Thread(target=install)
        worker.start()
        time.sleep(0.5)  # the guard now holds tasks and waits for comments
        app.execute("UPDATE tasks SET title = title WHERE tenant_id = 5")  # needs tasks: would deadlock
        app.commit()
        worker.join(timeout=30)
    assert guarded == [None]
    with dsnlib.connect(fleet.dsn("eu-1"), autocommit=True) as conn:
        assert fence.has_schema(conn)
        assert conn.execute("SELECT count(*) FROM _migrator.guarded_tenants").fetchone() == (1,)


def _guard(fleet: Fleet, tenant: str) -> None:
    """Capture the tenant's writes (move 1), unfenced, as an online move does before its cutover."""
    with dsnlib.connect(fleet.dsn("eu-1")) as conn:
        fence.guard(conn, fleet.layout(), (tenant,), 1, fenced=False, capture=True)
        conn.commit()


def _set_fenced(fleet: Fleet, tenant: str) -> None:
    with dsnlib.connect(fleet.dsn("eu-1")) as conn:
        fence.set_fenced(conn, (tenant,), True)
        conn.commit()


def _captured(fleet: Fleet) -> int:
    with dsnlib.connect(fleet.dsn("eu-1"), autocommit=True) as conn:
        return int(conn.execute("SELECT count(*) FROM _migrator.changes").fetchone()[0])


def test_a_write_queued_behind_the_cutover_is_fenced_when_it_gets_through(fleet: Fleet) -> None:
    """The write read the guard unfenced, then waited for the move's lock while the fence committed."""
    fleet.seed("eu-1", 5, 200)
    _guard(fleet, "5")
    outcome: list[BaseException | None] = []
    with dsnlib.connect(fleet.dsn("eu-1"), pinned=False) as cutover:
        cutover.execute("SELECT pg_advisory_xact_lock(%s, 1)", (fence.LOCK_CLASS,))  # as wait_for_writers

        def write() -> None:
            try:
                with dsnlib.connect(fleet.dsn("eu-1"), autocommit=True, pinned=False) as app:
                    app.execute("UPDATE tenants SET name = 'queued write' WHERE id = 5")
                outcome.append(None)
            except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
                outcome.append(exc)

        writer = threading.Thread(target=write)
        writer.start()
        deadline = time.monotonic() + 30
        while not cutover.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted AND classid = %s",
            (fence.LOCK_CLASS,),
        ).fetchone()[0]:
            assert time.monotonic() < deadline, "the write never queued behind the move's lock"
            time.sleep(0.02)
        _set_fenced(fleet, "5")
        cutover.commit()
        writer.join(timeout=30)
    assert len(outcome) == 1 and isinstance(outcome[0], psycopg.Error)
    assert outcome[0].sqlstate == fence.FENCED_SQLSTATE


def _begin(app: psycopg.Connection[Any], isolation: str) -> None:
    """Start an application transaction at `isolation` and take its snapshot (its first statement)."""
    app.execute(sql.SQL("SET TRANSACTION ISOLATION LEVEL {}").format(sql.SQL(isolation)))
    app.execute("SELECT count(*) FROM tasks WHERE tenant_id = 5").fetchone()


@contextmanager
def _refused_on_a_stale_snapshot(
    fleet: Fleet, isolation: str, change: Callable[[], None]
) -> Iterator[psycopg.Connection[Any]]:
    """An application transaction takes its snapshot, `change` guards or fences tenant 5 meanwhile, and the
    transaction's write to tenant 5 fails with a serialization failure; yields the session, rolled back."""
    with dsnlib.connect(fleet.dsn("eu-1"), pinned=False) as app:
        _begin(app, isolation)
        change()
        with pytest.raises(psycopg.errors.SerializationFailure):
            app.execute("UPDATE tenants SET name = 'stale snapshot' WHERE id = 5")
        app.rollback()
        yield app


@pytest.mark.parametrize("isolation", ["REPEATABLE READ", "SERIALIZABLE"])
def test_a_transaction_whose_snapshot_predates_the_fence_cannot_write(fleet: Fleet, isolation: str) -> None:
    fleet.seed("eu-1", 5, 200)
    _guard(fleet, "5")
    with _refused_on_a_stale_snapshot(fleet, isolation, lambda: _set_fenced(fleet, "5")) as app:  # was unfenced
        _begin(app, isolation)
        with pytest.raises(psycopg.Error) as caught:  # retried on a new snapshot: fenced
            app.execute("UPDATE tenants SET name = 'retried' WHERE id = 5")
        assert caught.value.sqlstate == fence.FENCED_SQLSTATE


@pytest.mark.parametrize("isolation", ["REPEATABLE READ", "SERIALIZABLE"])
def test_a_transaction_whose_snapshot_predates_the_guard_cannot_write_uncaptured(fleet: Fleet, isolation: str) -> None:
    fleet.seed("eu-1", 5, 200)
    fleet.seed("eu-1", 6, 200)
    with _refused_on_a_stale_snapshot(fleet, isolation, lambda: _guard(fleet, "5")) as app:  # was unguarded
        assert _captured(fleet) == 0
        _begin(app, isolation)
        app.execute("UPDATE tenants SET name = 'retried' WHERE id = 5")  # a new snapshot sees the guard
        app.execute("UPDATE tenants SET name = 'neighbour' WHERE id = 6")
        app.commit()
    assert _captured(fleet) == 1


def test_a_guard_waiting_for_a_writer_holds_up_no_captured_write_of_another_move(fleet: Fleet) -> None:
    """While one move's guard yields to a long writer, another move's tenant keeps writing (and capturing).

    Between its attempts the waiting guard holds no lock: once it kept the SHARE lock that
    `CREATE INDEX IF NOT EXISTS` takes on the change log, and every captured write stopped behind it.
    """
    fleet.seed("eu-1", 5, 200)
    fleet.seed("eu-1", 6, 200)
    layout = fleet.layout()
    with dsnlib.connect(fleet.dsn("eu-1")) as conn:
        fence.guard(conn, layout, ("5",), 1, fenced=False, capture=True)
    blocker = dsnlib.connect(fleet.dsn("eu-1"), pinned=False)
    blocker.execute("UPDATE comments SET body = body WHERE tenant_id = 6")  # a long transaction of tenant 6
    failed: list[BaseException] = []

    def second_guard() -> None:
        try:
            with dsnlib.connect(fleet.dsn("eu-1")) as conn:
                fence.guard(conn, layout, ("6",), 2, fenced=False, capture=True)
        except BaseException as exc:  # noqa: BLE001 - reported below
            failed.append(exc)

    guarding = threading.Thread(target=second_guard)
    guarding.start()
    time.sleep(1.0)  # the guard is yielding to the blocker now
    try:
        with dsnlib.connect(fleet.dsn("eu-1"), autocommit=True, pinned=False) as writer:
            writer.execute("SET statement_timeout = '3s'")
            started = time.monotonic()
            writer.execute("UPDATE projects SET name = name || '!' WHERE tenant_id = 5")  # captured for move 1
            assert time.monotonic() - started < 1.5
            assert guarding.is_alive()  # still yielding to the blocker
    finally:
        blocker.rollback()
        blocker.close()
        guarding.join(timeout=60)
    assert not failed, failed
    with dsnlib.connect(fleet.dsn("eu-1"), autocommit=True) as conn:
        captured = conn.execute("SELECT count(*) FROM _migrator.changes WHERE move_id = 1").fetchone()[0]
        guarded = conn.execute("SELECT tenant FROM _migrator.guarded_tenants ORDER BY tenant").fetchall()
    assert captured > 0 and guarded == [("5",), ("6",)]


def _returns_within(seconds: float, call: Any) -> float:
    """Run `call` in a thread; fail unless it returns within `seconds` (a hang must not hang the test)."""
    done = threading.Event()
    started = time.monotonic()
    thread = threading.Thread(target=lambda: (call(), done.set()), daemon=True)
    thread.start()
    thread.join(seconds)
    assert done.is_set(), f"still running after {seconds} s"
    return time.monotonic() - started


def test_the_vacuum_before_a_freeze_waits_neither_for_writers_nor_for_another_moves_vacuum(fleet: Fleet) -> None:
    """The change log is shared by the source's moves and written by the application's triggers: its
    vacuum must not wait 5 s to truncate it behind a writer, nor queue behind another move's vacuum."""
    source = fleet.dsn("eu-1")
    with dsnlib.connect(source) as conn:
        fence.ensure_schema(conn)
    with dsnlib.connect(source, autocommit=True) as conn:  # a tail of replayed and deleted changes
        conn.execute(
            "INSERT INTO _migrator.changes (move_id, table_name, pk)"
            " SELECT 1, 'tasks', ARRAY[g::text] FROM generate_series(1, 20000) g"
        )
        conn.execute("DELETE FROM _migrator.changes WHERE move_id = 1")
    with dsnlib.connect(source, pinned=False, application_name="test") as writer:
        writer.execute("LOCK TABLE _migrator.changes IN ROW EXCLUSIVE MODE")  # as a captured insert, uncommitted
        assert _returns_within(3, lambda: capture.vacuum_changes(source)) < 2
    with dsnlib.connect(source, pinned=False, application_name="test") as other:
        other.execute("LOCK TABLE _migrator.changes IN SHARE UPDATE EXCLUSIVE MODE")  # as another VACUUM
        assert _returns_within(3, lambda: capture.vacuum_changes(source)) < 2
