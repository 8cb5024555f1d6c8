"""The catalog keeps one session per thread, and never reuses one the server has ended."""

from __future__ import annotations

import time

from conftest import Fleet

from migrator.db import dsn as dsnlib


def _backend_pids(fleet: Fleet) -> set[int]:
    with dsnlib.connect(fleet.catalog.url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchall()
    return {r[0] for r in rows}


def test_catalog_calls_share_one_session_per_thread(fleet: Fleet) -> None:
    fleet.seed("eu-1", 1, 50)
    before = _backend_pids(fleet)
    for _ in range(20):
        fleet.catalog.route("1")
        fleet.catalog.stamps()
    assert len(_backend_pids(fleet) - before) <= 1


def test_a_session_ended_by_the_server_is_replaced_not_reused(fleet: Fleet) -> None:
    fleet.seed("eu-1", 1, 50)
    fleet.catalog.route("1")  # opens the thread's session
    with dsnlib.connect(fleet.catalog.url, autocommit=True) as admin:
        ended = admin.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchone()
    assert ended is not None and ended[0] >= 1
    time.sleep(0.2)  # the server's goodbye reaches the socket
    # A transaction has no retry of its own: it must reconnect rather than fail on the dead session.
    with fleet.catalog.transaction() as conn:
        row = conn.execute("SELECT stamp FROM routes WHERE tenant = '1'").fetchone()
    assert row == ("eu-1",)
