"""Two operators at once: one tenant is moved by exactly one of them; different tenants move side by side.

Every migrator here is a real process (`python -m migrator`), so the tenant lock is contended
between sessions exactly as between two operators' terminals.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

from conftest import Fleet, copy_held, tenant_digest, tenant_row_count

from migrator.catalog import Move
from migrator.db import dsn as dsnlib


def _wait(predicate: Callable[[], bool], what: str, procs: list[subprocess.Popen[str]], timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        for proc in procs:
            assert proc.poll() is None, f"a migrator exited while waiting for {what}: {proc.communicate()}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _open(fleet: Fleet, tenant: str) -> Move | None:
    return fleet.catalog.open_move(tenant)


def _in_phase(fleet: Fleet, tenant: str, phase: str) -> bool:
    move = _open(fleet, tenant)
    return move is not None and move.phase == phase


@contextmanager
def _reaped(*procs: subprocess.Popen[str]) -> Iterator[None]:
    """Never leave a migrator running after a failed assertion."""
    try:
        yield
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


def _finish(proc: subprocess.Popen[str], timeout: float = 240) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def _copy_progress(fleet: Fleet, stamp: str) -> dict[int, int]:
    """Rows copied per move id, as the target's own cursors say."""
    with dsnlib.connect(fleet.dsn(stamp), autocommit=True) as conn:
        if conn.execute("SELECT to_regclass('_migrator.copy_progress') IS NULL").fetchone() == (True,):
            return {}
        return dict(conn.execute("SELECT move_id, sum(rows_copied) FROM _migrator.copy_progress GROUP BY 1"))


def test_second_move_of_the_same_tenant_is_refused_naming_the_running_move(fleet: Fleet) -> None:
    fleet.seed("eu-1", 7, 3_000)
    layout = fleet.layout()
    before = tenant_digest(fleet.dsn("eu-1"), layout, "7")
    first = fleet.popen("move", "7", "--to", "eu-2", "--batch-rows", "200", "--yes")
    with _reaped(first):
        with copy_held(fleet, "eu-2"):
            _wait(lambda: _in_phase(fleet, "7", "copying"), "the first move to copy", [first])
            running = _open(fleet, "7")
            assert running is not None
            second = fleet.popen("move", "7", "--to", "eu-2", "--yes")
            with _reaped(second):
                code, out, err = _finish(second, timeout=60)
            assert code == 1, (out, err)
            assert err.count("\n") == 1 and err.startswith("error: tenant 7 is locked by another running migrator")
            assert f"move {running.id} of tenant 7 (eu-1 -> eu-2, phase copying)" in err
            assert f"migrator move status {running.id}" in err
            aborted = fleet.run("move", "abort", str(running.id), "--yes")  # a third operator: refused as well
            assert aborted.exit_code == 1 and f"move {running.id} of tenant 7" in aborted.stderr, aborted.stderr
            assert first.poll() is None, "the refused operator must not disturb the running move"
        code, out, err = _finish(first)
    assert code == 0, (out, err)
    assert f"move {running.id}: tenant 7 now on eu-2" in out
    moves = fleet.catalog.moves("7")
    assert [(m.id, m.phase, m.error) for m in moves] == [(running.id, "flipped", None)]
    assert fleet.catalog.route("7").stamp == "eu-2"
    assert tenant_digest(fleet.dsn("eu-2"), layout, "7") == before


def test_two_moves_of_one_tenant_started_together_one_wins(fleet: Fleet) -> None:
    """No head start: whoever takes the lock moves; the other is refused and names the winner's move."""
    fleet.seed("eu-1", 7, 2_000)
    layout = fleet.layout()
    before = tenant_digest(fleet.dsn("eu-1"), layout, "7")
    args = ("move", "7", "--to", "eu-2", "--batch-rows", "200", "--rate-limit", "1000", "--yes")
    procs = [fleet.popen(*args), fleet.popen(*args)]
    with _reaped(*procs):
        results = [_finish(p) for p in procs]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 1], results
    (_, won, _), (_, _, lost) = sorted(results, key=lambda r: r[0])
    moves = fleet.catalog.moves("7")
    assert len(moves) == 1 and moves[0].phase == "flipped"
    assert f"move {moves[0].id}: tenant 7 now on eu-2" in won
    assert re.search(rf"tenant 7 is locked by another running migrator: move {moves[0].id} of tenant 7", lost), lost
    assert tenant_digest(fleet.dsn("eu-2"), layout, "7") == before


def test_two_tenants_move_into_one_target_side_by_side(fleet: Fleet) -> None:
    fleet.seed("eu-1", 7, 3_000)
    fleet.seed("eu-1", 8, 3_000)
    fleet.seed("eu-2", 9, 300)  # already on the target: must stay untouched
    layout = fleet.layout()
    before = {t: tenant_digest(fleet.dsn("eu-1"), layout, t) for t in ("7", "8")}
    resident = tenant_digest(fleet.dsn("eu-2"), layout, "9")

    limits = ("--batch-rows", "200", "--yes")
    with ExitStack() as running:
        first = fleet.popen("move", "7", "--to", "eu-2", *limits)
        running.enter_context(_reaped(first))
        with copy_held(fleet, "eu-2"):  # both copies stall at the last table: they overlap for sure
            _wait(lambda: _in_phase(fleet, "7", "copying"), "tenant 7's copy", [first])
            second = fleet.popen("move", "8", "--to", "eu-2", *limits)
            running.enter_context(_reaped(second))
            _wait(
                lambda: _in_phase(fleet, "7", "copying") and _in_phase(fleet, "8", "copying"),
                "both copies at once",
                [first, second],
            )
            ids = {t: _open(fleet, t).id for t in ("7", "8")}  # type: ignore[union-attr]
            _wait(
                lambda: all(_copy_progress(fleet, "eu-2").get(i, 0) > 0 for i in ids.values()),
                "cursors of both moves on the target",
                [first, second],
            )
        results = {"7": _finish(first), "8": _finish(second)}

    for tenant, (code, out, err) in results.items():
        assert code == 0, (tenant, out, err)
        move = fleet.catalog.move(ids[tenant])
        assert move.phase == "flipped" and move.error is None
        assert move.rows_copied == move.rows_total == sum(rows for rows, _ in before[tenant].values())
        assert all(t.done and t.rows_copied == t.rows_total for t in fleet.catalog.tables(move.id))
        assert fleet.catalog.route(tenant).stamp == "eu-2"
        assert tenant_digest(fleet.dsn("eu-2"), layout, tenant) == before[tenant]
        verify = fleet.run("verify", tenant, "--source", "eu-1", "--target", "eu-2")
        assert verify.exit_code == 0, verify.output
        assert f"tenant {tenant}: {len(layout.tables)} tables equal" in verify.output
    assert _copy_progress(fleet, "eu-2") == {}  # each move forgot its own cursors, and only its own
    assert tenant_digest(fleet.dsn("eu-2"), layout, "9") == resident

    for tenant in ("7", "8"):
        result = fleet.run("cleanup", tenant, "--stamp", "eu-1", "--yes")
        assert result.exit_code == 0, result.output
        assert tenant_row_count(fleet.dsn("eu-1"), layout, tenant) == 0
    doctor = fleet.run("doctor")
    assert doctor.exit_code == 0, doctor.output
