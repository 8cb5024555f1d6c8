"""Once fenced, the source rejects the tenant's writes in the database itself; others write freely."""

from __future__ import annotations

import threading
import time

import psycopg
import pytest
from conftest import Fleet

from migrator.db import dsn as dsnlib
from migrator.move import fence


def _fence(fleet: Fleet, tenant: str) -> None:
    with dsnlib.connect(fleet.dsn("eu-1")) as conn:
        fence.fence(conn, fleet.layout(), tenant, move_id=1)


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
        fence.unguard(conn, layout, "5")
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
                    fence.guard(conn, layout, "5", 1, fenced=False, capture=True)
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
