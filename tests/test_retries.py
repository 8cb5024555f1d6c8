"""Retries are bounded where they are declared: no layer multiplies them, none restarts a deadline,
and nothing is retried on a connection the retry cannot replace."""

from __future__ import annotations

import logging
import socket
import threading
import time

import psycopg
import pytest
from conftest import Fleet, terminate_migrator_sessions

from migrator.catalog import Catalog, Mode, Phase
from migrator.db import dsn as dsnlib
from migrator.errors import MigratorError
from migrator.move import capture, fence


def _retries(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "migrator.retry"]


def test_catch_up_keeps_its_deadline_across_a_reconnect(fleet: Fleet, caplog: pytest.LogCaptureFixture) -> None:
    """A reconnect 1.5 s into a 2 s catch-up must not grant it another 2 s (--catchup-timeout is a bound)."""
    caplog.set_level(logging.WARNING, logger="migrator.retry")
    source, target = fleet.dsn("eu-1"), fleet.dsn("eu-2")
    with dsnlib.connect(source) as conn:
        fence.ensure_schema(conn)  # an empty change log: nothing to replay, the backlog target is unreachable
    killed: list[int] = []
    killer = threading.Timer(1.5, lambda: killed.append(terminate_migrator_sessions(fleet, source)))
    started = time.monotonic()
    killer.start()
    sessions = capture.ReplaySessions(source, target)
    try:
        left = capture.catch_up(sessions, fleet.layout(), ("7",), 1, capture.Goal(-1, started + 2.0, 100))
    finally:
        killer.cancel()
        sessions.close()
    elapsed = time.monotonic() - started
    assert killed == [1] and len(_retries(caplog)) == 1, (killed, _retries(caplog))  # it did reconnect once
    assert left == 0
    assert 2.0 <= elapsed < 2.8, elapsed  # a restarted clock would run to at least 3.7 s


def _unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_catalog_call_retries_once_not_once_per_layer(caplog: pytest.LogCaptureFixture) -> None:
    """`update_stamp` reads the stamp inside its own step: a dead catalog costs one policy's attempts
    (6, so 5 logged retries: the first a warning, the others shown with -v), not 6 x 6 through nested
    retried calls."""
    caplog.set_level(logging.INFO, logger="migrator.retry")
    catalog = Catalog(f"postgresql://migrator@127.0.0.1:{_unused_port()}/catalog")  # nothing listens there
    started = time.monotonic()
    with pytest.raises(MigratorError, match=r"^cannot connect to the catalog \(postgresql://migrator@127\.0\.0\.1:"):
        catalog.update_stamp("eu-1", region="eu")
    retries = _retries(caplog)
    assert len(retries) == 5 and all("connect_catalog" in r for r in retries), retries
    assert time.monotonic() - started < 20


def test_flip_on_a_lost_lock_session_fails_at_once_and_changes_nothing(
    fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    """The flip runs on the tenant lock's session; once that is gone no retry can bring it back, so it
    must fail at once (the move stays resumable) instead of retrying for seconds inside the freeze."""
    caplog.set_level(logging.WARNING, logger="migrator.retry")
    fleet.seed("eu-1", 7, 50)
    route = fleet.catalog.route("7")
    move = fleet.catalog.create_move([route], "eu-2", Mode.OFFLINE, 100)
    move = fleet.catalog.update_move(move.id, phase=Phase.VERIFIED)
    with fleet.catalog.lock_tenants(("7",)) as lock:
        session = lock.check()
        with dsnlib.connect(fleet.catalog.url, autocommit=True, application_name="test") as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (session.info.backend_pid,))
        time.sleep(0.2)  # the server's goodbye reaches the socket
        started = time.monotonic()
        with pytest.raises(psycopg.OperationalError):
            fleet.catalog.flip(move, session)
        assert time.monotonic() - started < 1.0
    assert _retries(caplog) == []
    assert fleet.catalog.route("7") == route and fleet.catalog.move(move.id).phase == Phase.VERIFIED


@pytest.mark.parametrize(
    ("step", "lock", "waiting"),
    [
        # ANALYZE after each copied table (complete_tables): SHARE UPDATE EXCLUSIVE holds it up, not the COPY.
        ("complete_tables", "{first} IN SHARE UPDATE EXCLUSIVE MODE", "ANALYZE%"),
        # The first read of the target's cursors: ACCESS EXCLUSIVE holds up any read.
        ("read_cursors", "_migrator.copy_progress IN ACCESS EXCLUSIVE MODE", "SELECT part, cursor%"),
        # Saving a table's parts, the first write of its progress: EXCLUSIVE lets the reads pass.
        ("plan_parts", "_migrator.copy_progress IN EXCLUSIVE MODE", "INSERT INTO %copy_progress%"),
    ],
)
def test_a_copy_step_that_loses_its_session_is_retried_and_the_move_completes(
    fleet: Fleet, caplog: pytest.LogCaptureFixture, step: str, lock: str, waiting: str
) -> None:
    """Each step of the copy opens sessions of its own; losing one (held at `lock`, then terminated
    while it waits) must not fail the move: the step runs again whole."""
    from migrator.move import MoveOptions, move_tenants
    from migrator.progress import Silent

    caplog.set_level(logging.WARNING, logger="migrator.retry")
    fleet.seed("eu-1", 7, 400)
    with dsnlib.connect(fleet.dsn("eu-2")) as conn:
        fence.ensure_schema(conn)  # the target's _migrator, so that the test can lock its tables
    holder = dsnlib.connect(fleet.dsn("eu-2"), pinned=False, application_name="test")
    first = fleet.layout().tables[0].ident.as_string(holder)
    holder.execute(f"LOCK TABLE {lock.format(first=first)}")
    done: list[object] = []

    def run() -> None:
        try:
            done.append(move_tenants(fleet.ctx, ("7",), "eu-2", MoveOptions(batch_rows=100, jobs=1), Silent()))
        except Exception as exc:
            done.append(exc)

    mover = threading.Thread(target=run)
    mover.start()
    try:
        deadline = time.monotonic() + 60
        with dsnlib.connect(fleet.server.dsn(), autocommit=True, application_name="test") as admin:
            while True:
                row = admin.execute(
                    "SELECT pid FROM pg_stat_activity WHERE application_name = 'migrator' AND query LIKE %s"
                    " AND wait_event_type = 'Lock'",
                    (waiting,),
                ).fetchone()
                if row:
                    admin.execute("SELECT pg_terminate_backend(%s)", (row[0],))
                    break
                assert time.monotonic() < deadline and not done, f"{step} never waited: {done}"
                time.sleep(0.02)
    finally:
        holder.close()
    mover.join(timeout=120)
    assert done and not isinstance(done[0], Exception), done
    assert any(step in line for line in _retries(caplog)), _retries(caplog)
    assert fleet.catalog.route("7").stamp == "eu-2"
