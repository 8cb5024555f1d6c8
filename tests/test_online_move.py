"""Online moves: the tenant keeps writing during the copy; writes pause only for a short cutover."""

from __future__ import annotations

import contextlib
import json
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest
from conftest import Fleet, copy_held, tenant_digest
from psycopg import sql

from migrator.catalog import Phase
from migrator.db import dsn as dsnlib
from migrator.move.fence import FENCED_SQLSTATE
from migrator.testing.writer import Workload


def _phase(fleet: Fleet, tenant: str) -> str | None:
    move = fleet.catalog.open_move(tenant)
    return move.phase if move else None


def _wait(predicate, what: str, timeout: float = 120, proc: subprocess.Popen[str] | None = None) -> None:  # type: ignore[no-untyped-def]
    """Poll until `predicate`; fail at the timeout, or at once (with its output) if `proc` has ended."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the move ended (exit {proc.returncode}) before {what}: {err[-2000:]}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _tasks(dsn: str, tenant: int) -> dict[int, str]:
    with dsnlib.connect(dsn, autocommit=True) as conn:
        return dict(conn.execute("SELECT id, t::text FROM tasks t WHERE tenant_id = %s", (tenant,)).fetchall())


def _assert_source_equals_target_but_post_flip_writes(fleet: Fleet, writer: Workload) -> None:
    """The target holds the source's rows exactly, except the writes made on the target after the flip."""
    layout = fleet.layout()
    src, tgt = tenant_digest(fleet.dsn("eu-1"), layout, "7"), tenant_digest(fleet.dsn("eu-2"), layout, "7")
    assert {k: v for k, v in src.items() if k != "tasks"} == {k: v for k, v in tgt.items() if k != "tasks"}
    after_flip = {task for task, stamp in writer.touched_on.items() if stamp == "eu-2"}
    src_tasks = {k: v for k, v in _tasks(fleet.dsn("eu-1"), 7).items() if k not in after_flip}
    tgt_tasks = {k: v for k, v in _tasks(fleet.dsn("eu-2"), 7).items() if k not in after_flip}
    assert src_tasks == tgt_tasks


def _fenced(fleet: Fleet, tenant: str) -> bool:
    """The source's guard of the tenant is fenced (committed: the move is inside its freeze)."""
    with dsnlib.connect(fleet.dsn("eu-1"), autocommit=True, pinned=False) as conn:
        row = conn.execute("SELECT fenced FROM _migrator.guarded_tenants WHERE tenant = %s", (tenant,)).fetchone()
    return bool(row and row[0])


def _assert_source_fenced(fleet: Fleet) -> None:
    with dsnlib.connect(fleet.dsn("eu-1"), autocommit=True, pinned=False) as conn:
        with pytest.raises(psycopg.Error) as caught:
            conn.execute("UPDATE tenants SET name = 'late write' WHERE id = 7")
        assert caught.value.sqlstate == FENCED_SQLSTATE


def _writers(fleet: Fleet) -> tuple[Workload, Workload]:
    mover = Workload(fleet.catalog.url, fleet.stamps, 7, seed=7).start()
    neighbour = Workload(fleet.catalog.url, fleet.stamps, 8, seed=8).start()
    _wait(lambda: mover.acked > 100 and neighbour.acked > 100, "writers to start")
    return mover, neighbour


def _finish(fleet: Fleet, mover: Workload, neighbour: Workload) -> None:
    _wait(lambda: "eu-2" in mover.touched_on.values(), "a write on the new stamp", timeout=30)
    mover.stop()
    neighbour.stop()
    assert mover.errors == [] and neighbour.errors == []
    assert neighbour.fenced_errors == 0
    assert "eu-1" in mover.touched_on.values()
    assert not mover.lost_writes(fleet.dsn("eu-2"))
    assert not neighbour.lost_writes(fleet.dsn("eu-1"))
    _assert_source_equals_target_but_post_flip_writes(fleet, mover)
    _assert_source_fenced(fleet)
    assert fleet.catalog.route("7").stamp == "eu-2"


def test_online_move_keeps_every_acknowledged_write(busy: Fleet) -> None:
    mover, neighbour = _writers(busy)
    proc = busy.popen("move", "7", "--to", "eu-2", "--yes", "--json")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    outcome = json.loads(out)
    move = outcome["move"]
    assert move["mode"] == "online" and move["phase"] == "flipped"
    assert 0 < move["freeze_ms"] < 2000
    steps = outcome["freeze_steps_ms"]  # where the freeze's time went, step by step, adding up to it
    assert set(steps) == {"fence", "writers", "drain", "sequences", "keys", "revisions", "standbys", "flip"}
    assert all(ms >= 0 for ms in steps.values())
    assert abs(sum(steps.values()) - move["freeze_ms"]) < 1
    _finish(busy, mover, neighbour)
    assert busy.run("move", "status", str(move["id"])).stdout.count("freeze") == 1


def _captured_backlog(fleet: Fleet) -> int:
    with dsnlib.connect(fleet.dsn("eu-1"), autocommit=True) as conn:
        if not conn.execute("SELECT to_regclass('_migrator.changes') IS NOT NULL").fetchone()[0]:
            return 0
        return int(conn.execute("SELECT count(*) FROM _migrator.changes WHERE NOT applied").fetchone()[0])


def _burst(fleet: Fleet) -> None:
    """One large update of the tenant while capture runs: a long catch-up follows."""
    with dsnlib.connect(fleet.dsn("eu-1"), autocommit=True) as conn:
        conn.execute("UPDATE comments SET body = body || '.' WHERE tenant_id = 7")


def test_kill_during_catch_up_then_resume_loses_nothing(busy: Fleet) -> None:
    mover, neighbour = _writers(busy)
    # The copy waits at its last table until a burst of changes is captured: catch-up then has a long
    # backlog to replay, whatever the machine's speed.
    with copy_held(busy, "eu-2"):
        proc = busy.popen("move", "7", "--to", "eu-2", "--yes")
        _wait(lambda: _phase(busy, "7") == "copying", "the copy", proc=proc)
        _burst(busy)
        assert _phase(busy, "7") == "copying"
    _wait(lambda: _phase(busy, "7") == "copied" and _captured_backlog(busy) > 0, "catch-up to run", proc=proc)
    proc.kill()
    proc.wait()
    assert _phase(busy, "7") == "copied" and _captured_backlog(busy) > 0
    result = busy.run("-v", "move", "7", "--to", "eu-2", "--yes", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["resumed"] is True
    _finish(busy, mover, neighbour)


def test_kill_while_fenced_is_shown_and_resumes(busy: Fleet) -> None:
    mover, neighbour = _writers(busy)
    proc = busy.popen("move", "7", "--to", "eu-2", "--yes", "--max-freeze-ms", "60000")
    _wait(lambda: _phase(busy, "7") == "copying", "capture to start", proc=proc)
    held = dsnlib.connect(busy.dsn("eu-1"), pinned=False)  # an application transaction in flight at cutover
    held.execute(
        "UPDATE projects SET name = 'held write' WHERE tenant_id = 7 AND id = "
        "(SELECT min(id) FROM projects WHERE tenant_id = 7)"
    )
    _wait(lambda: _fenced(busy, "7"), "the fence", timeout=240, proc=proc)  # then it waits for `held`
    proc.kill()
    proc.wait()
    held.commit()  # it started before the fence, so it is acknowledged and must reach the target
    held.close()
    status = busy.run("move", "status", "--json")
    assert json.loads(status.stdout)[0]["phase"] == "cutover"
    assert busy.run("doctor", "--stamp", "eu-1").stdout.count("fence") == 1
    _assert_source_fenced(busy)
    result = busy.run("move", "7", "--to", "eu-2", "--yes", "--json")
    assert result.exit_code == 0, result.output
    with dsnlib.connect(busy.dsn("eu-2"), autocommit=True) as conn:
        assert (
            conn.execute("SELECT count(*) FROM projects WHERE tenant_id = 7 AND name = 'held write'").fetchone()[0] == 1
        )
    _finish(busy, mover, neighbour)


def test_freeze_longer_than_allowed_unfences_and_backs_off(busy: Fleet) -> None:
    proc = busy.popen("-v", "move", "7", "--to", "eu-2", "--yes", "--max-freeze-ms", "300")
    _wait(lambda: _phase(busy, "7") == "copying", "capture to start", proc=proc)
    held = dsnlib.connect(busy.dsn("eu-1"), pinned=False)  # a slow application transaction, open at cutover
    held.execute("UPDATE tenants SET name = 'slow transaction' WHERE id = 7")
    try:
        _, err = proc.communicate(timeout=240)
    finally:
        held.commit()
        held.close()
    assert proc.returncode == 1, err
    assert "did not fit in 300 ms" in err
    assert _phase(busy, "7") == "synced"
    assert busy.catalog.route("7").stamp == "eu-1"
    with dsnlib.connect(busy.dsn("eu-1"), autocommit=True, pinned=False) as conn:
        conn.execute("UPDATE tenants SET name = 'writable again' WHERE id = 7")
    result = busy.run("move", "7", "--to", "eu-2", "--yes", "--max-freeze-ms", "5000", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["move"]["freeze_ms"] < 5000


@contextmanager
def _writing_in_the_server(fleet: Fleet, tenant: int) -> Iterator[None]:
    """A loop inside the source server that commits a write of the tenant every millisecond.

    Unlike the Python writers it cannot be starved by a busy test machine for long enough to let
    the change log run empty between two catch-up rounds.
    """
    conn = dsnlib.connect(fleet.dsn("eu-1"), autocommit=True, pinned=False)
    pid = conn.info.backend_pid
    loop = sql.SQL(
        "DO $$ BEGIN LOOP UPDATE projects SET name = name WHERE tenant_id = {} AND id = (SELECT min(id) FROM"
        " projects WHERE tenant_id = {}); COMMIT; PERFORM pg_sleep(0.001); END LOOP; END $$"
    ).format(sql.Literal(tenant), sql.Literal(tenant))
    thread = threading.Thread(target=_run, args=(conn, loop))
    thread.start()
    try:
        yield
        assert thread.is_alive(), "the loop stopped writing"
    finally:
        with dsnlib.connect(fleet.dsn("eu-1"), autocommit=True, pinned=False) as admin:
            admin.execute("SELECT pg_cancel_backend(%s)", (pid,))
        thread.join(timeout=30)
        conn.close()


def _run(conn: psycopg.Connection[Any], statement: sql.Composed) -> None:
    with contextlib.suppress(psycopg.errors.QueryCanceled):
        conn.execute(statement)


def test_catch_up_that_cannot_converge_stops_writable_and_resumable(busy: Fleet) -> None:
    mover, neighbour = _writers(busy)  # a backlog of 0 can never be reached while the tenant writes
    with _writing_in_the_server(busy, 7):
        proc = busy.popen("move", "7", "--to", "eu-2", "--yes", "--cutover-backlog", "0", "--catchup-timeout", "2")
        _, err = proc.communicate(timeout=240)
    assert proc.returncode == 1, err
    assert "did not converge" in err and "stays writable" in err
    # The first catch-up (after the copy) may meet an empty backlog between two writes and reach
    # `synced`; the cutover's catch-up then stops. Either way the move stands before any fence.
    assert _phase(busy, "7") in (Phase.COPIED, Phase.SYNCED)
    assert busy.catalog.route("7").stamp == "eu-1"
    acked = mover.acked
    _wait(lambda: mover.acked > acked + 50, "writes after the stop")  # the tenant still writes on its source
    result = busy.run("move", "7", "--to", "eu-2", "--yes")
    assert result.exit_code == 0, result.output
    _finish(busy, mover, neighbour)
