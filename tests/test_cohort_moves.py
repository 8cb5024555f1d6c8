"""Cohort moves: many tenants move as one unit, with one move id, and their routes flip all or none."""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest
from conftest import (
    Fleet,
    catalog_snapshot,
    copy_held,
    copy_waits_at_held_table,
    stamp_snapshot,
    tenant_digest,
    tenant_row_count,
    wait_until,
)
from psycopg import sql

from migrator.catalog import Phase
from migrator.db import dsn as dsnlib
from migrator.errors import RouteConflict
from migrator.local.seed import TenantSpec, seed_tenant
from migrator.move import MoveOptions, move_tenants
from migrator.move.fence import FENCED_SQLSTATE
from migrator.progress import Silent
from migrator.testing.writer import Workload


def _routes(fleet: Fleet, tenants: list[str]) -> dict[str, tuple[str, int]]:
    return {r.tenant: (r.stamp, r.version) for r in fleet.catalog.routes_of(tenants)}


def _assert_fenced(fleet: Fleet, stamp: str, tenant: str) -> None:
    with dsnlib.connect(fleet.dsn(stamp), autocommit=True, pinned=False) as conn:
        with pytest.raises(psycopg.Error) as caught:
            conn.execute("UPDATE tenants SET name = 'late write' WHERE id = %s", (int(tenant),))
        assert caught.value.sqlstate == FENCED_SQLSTATE


def _writable(fleet: Fleet, stamp: str, tenant: str) -> None:
    with dsnlib.connect(fleet.dsn(stamp), autocommit=True, pinned=False) as conn:
        assert conn.execute("UPDATE tenants SET name = name WHERE id = %s", (int(tenant),)).rowcount == 1


def _phase(fleet: Fleet, tenant: str) -> str | None:
    move = fleet.catalog.open_move(tenant)
    return move.phase if move else None


def test_a_cohort_of_50_moves_as_one_unit_with_writers_and_every_route_flips_once(fleet: Fleet) -> None:
    ids = list(range(101, 151))
    cohort = [str(t) for t in ids]
    fleet.seed_many("eu-1", ids, 150)
    fleet.seed_many("eu-1", [200], 150)  # a neighbour that stays
    layout = fleet.layout()
    written = {"101", "125", "150"}
    before = {t: tenant_digest(fleet.dsn("eu-1"), layout, t) for t in cohort if t not in written}
    versions = _routes(fleet, cohort)
    writers = [Workload(fleet.catalog.url, fleet.stamps, int(t), seed=int(t)).start() for t in sorted(written)]
    wait_until(lambda: all(w.acked > 50 for w in writers), "the writers to start")

    outcome = move_tenants(fleet.ctx, tuple(cohort), "eu-2", MoveOptions(batch_rows=500), Silent())

    wait_until(lambda: all("eu-2" in w.touched_on.values() for w in writers), "writes on the new stamp", timeout=30)
    for writer in writers:
        writer.stop()
        assert writer.errors == [] and "eu-1" in writer.touched_on.values()
        assert not writer.lost_writes(fleet.dsn("eu-2"))
    assert outcome.move is not None and outcome.move.tenants == tuple(cohort) and outcome.move.phase == Phase.FLIPPED
    assert [r.tenant for r in outcome.routes] == cohort
    after = _routes(fleet, cohort)
    assert after == {t: ("eu-2", versions[t][1] + 1) for t in cohort}  # each route once, +1
    with dsnlib.connect(fleet.catalog.url, autocommit=True) as conn:  # now() of one transaction, one xmin
        stamped = conn.execute(
            "SELECT count(DISTINCT updated_at), count(DISTINCT xmin::text) FROM routes WHERE tenant = ANY(%s)",
            (cohort,),
        ).fetchone()
    assert stamped == (1, 1)
    for tenant, digest in before.items():
        assert tenant_digest(fleet.dsn("eu-2"), layout, tenant) == digest, tenant
    for tenant in ("101", "140"):
        _assert_fenced(fleet, "eu-1", tenant)
    _writable(fleet, "eu-1", "200")
    assert [m.id for m in fleet.catalog.moves("137")] == [outcome.move.id]  # one move id for the cohort

    result = fleet.run("cleanup", "--move", str(outcome.move.id), "--yes")
    assert result.exit_code == 0, result.output
    assert all(tenant_row_count(fleet.dsn("eu-1"), layout, t) == 0 for t in cohort)
    assert fleet.catalog.move(outcome.move.id).phase == Phase.CLEANED
    assert fleet.run("doctor").exit_code == 0


class _FailsTheFlip(Silent):
    """Offline, just before the flip: another operator bumps one route, or the catalog fails on one."""

    def __init__(self, catalog_url: str, how: str, tenant: str) -> None:
        self.catalog_url, self.how, self.tenant = catalog_url, how, tenant

    def phase(self, message: str) -> None:
        if not message.startswith("flipping route"):
            return
        with psycopg.connect(self.catalog_url, autocommit=True) as conn:
            if self.how == "route changed":
                conn.execute("UPDATE routes SET version = version + 1 WHERE tenant = %s", (self.tenant,))
            else:
                conn.execute(
                    sql.SQL(
                        "CREATE FUNCTION fail_one() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
                        " IF NEW.tenant = {} THEN RAISE EXCEPTION 'injected flip failure'; END IF;"
                        " RETURN NEW; END $$"
                    ).format(sql.Literal(self.tenant))
                )
                conn.execute("CREATE TRIGGER fail_one BEFORE UPDATE ON routes FOR EACH ROW EXECUTE FUNCTION fail_one()")


@pytest.mark.parametrize("how", ["route changed", "catalog error"])
def test_a_failure_in_the_flip_leaves_every_route_of_the_cohort_unflipped(fleet: Fleet, how: str) -> None:
    ids = list(range(101, 151))
    cohort = [str(t) for t in ids]
    fleet.seed_many("eu-1", ids, 60)
    layout = fleet.layout()
    before = {t: tenant_digest(fleet.dsn("eu-1"), layout, t) for t in cohort}
    versions = _routes(fleet, cohort)

    with pytest.raises((RouteConflict, psycopg.Error)) as failed:
        move_tenants(
            fleet.ctx, tuple(cohort), "eu-2", MoveOptions(online=False), _FailsTheFlip(fleet.catalog.url, how, "149")
        )
    if how == "route changed":
        assert "route of tenant 149 changed under move" in str(failed.value)
        assert "none of its 50 routes flipped" in str(failed.value)
    bumped = {"149": ("eu-1", versions["149"][1] + 1)} if how == "route changed" else {}
    assert _routes(fleet, cohort) == {**versions, **bumped}  # all 50 stayed; only the other operator's change
    move = fleet.catalog.open_move("101")
    assert move is not None and move.phase == Phase.VERIFIED and move.tenants == tuple(cohort)
    with dsnlib.connect(fleet.catalog.url, autocommit=True) as conn:
        conn.execute("DROP TRIGGER IF EXISTS fail_one ON routes")

    result = fleet.run("move", "abort", str(move.id), "--yes")  # abort of a cohort: all writable, none on target
    assert result.exit_code == 0, result.output
    assert "50 tenants (101, 102, 103, 104, 105, ...) stay on eu-1, writable" in result.output
    for tenant in cohort:
        assert tenant_digest(fleet.dsn("eu-1"), layout, tenant) == before[tenant]
        assert tenant_row_count(fleet.dsn("eu-2"), layout, tenant) == 0
    for tenant in ("101", "149", "150"):
        _writable(fleet, "eu-1", tenant)
    assert all(fleet.catalog.open_move(t) is None for t in cohort)
    assert fleet.run("doctor").exit_code == 0


def test_a_preflight_failure_of_one_tenant_refuses_the_whole_cohort_naming_it(fleet: Fleet, tmp_path: Path) -> None:
    ids = list(range(101, 121))
    fleet.seed_many("eu-1", ids, 60)
    with dsnlib.connect(fleet.dsn("eu-2")) as conn:  # tenant 113's rows are already on the target
        seed_tenant(conn, TenantSpec(113, 60))
    listed = tmp_path / "cohort.txt"
    listed.write_text("# the cohort\n" + "\n".join(str(t) for t in ids[1:]) + "\n\n")
    before = (catalog_snapshot(fleet), stamp_snapshot(fleet.dsn("eu-1")), stamp_snapshot(fleet.dsn("eu-2")))

    result = fleet.run("move", "101", "--tenants-file", str(listed), "--to", "eu-2", "--yes")

    assert result.exit_code == 2, result.output
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1 and "target eu-2 already holds rows of tenant 113 in tenants" in line, line
    assert line.startswith("error: "), line
    after = (catalog_snapshot(fleet), stamp_snapshot(fleet.dsn("eu-1")), stamp_snapshot(fleet.dsn("eu-2")))
    assert after == before  # nothing written anywhere, not even a move record


def test_a_cohort_spread_over_two_stamps_or_naming_a_tenant_twice_is_refused(fleet: Fleet) -> None:
    fleet.seed_many("eu-1", [1, 2], 40)
    fleet.seed_many("us-1", [3], 40)
    before = catalog_snapshot(fleet)
    spread = fleet.run("move", "1", "2", "3", "--to", "eu-2", "--yes")
    assert (
        spread.exit_code == 2
        and "a cohort moves from one stamp, these tenants live on 2 (eu-1: 1, 2; us-1: 3)" in spread.stderr
    )
    twice = fleet.run("move", "1", "2", "1", "--to", "eu-2", "--yes")
    assert twice.exit_code == 2 and "tenant(s) 1 listed more than once" in twice.stderr
    assert catalog_snapshot(fleet) == before


def _hold_at_copy(fleet: Fleet, proc: subprocess.Popen[str], stack: list[object]) -> None:
    """Keep the cohort's copy waiting at its last table."""
    held = copy_held(fleet, "eu-2")
    held.__enter__()
    stack.append(held)
    wait_until(lambda: copy_waits_at_held_table(fleet, "eu-2"), "the copy to wait at the held table", proc=proc)


def _hold_at_catch_up(fleet: Fleet, proc: subprocess.Popen[str], stack: list[object]) -> None:
    """Let the copy finish, but keep the catch-up's replay of the writers' tasks waiting on the target.

    The writers alone may leave fewer changes than the cutover backlog (200) when the machine is
    loaded, and the catch-up would then go straight on to the freeze: 250 new tasks of a written
    tenant make sure it has tasks to replay.
    """
    _hold_at_copy(fleet, proc, stack)
    tasks = dsnlib.connect(fleet.dsn("eu-2"), pinned=False)
    tasks.execute("LOCK TABLE tasks IN SHARE MODE")  # its copy is complete: only the replay writes it now
    stack.append(tasks)
    with dsnlib.connect(fleet.dsn("eu-1"), autocommit=True, pinned=False) as src:
        src.execute(
            "INSERT INTO tasks (tenant_id, project_id, title) SELECT tenant_id, project_id, 'burst ' || g"
            " FROM (SELECT tenant_id, project_id FROM tasks WHERE tenant_id = 105 LIMIT 1) t, generate_series(1, 250) g"
        )
    held = stack.pop(0)
    held.__exit__(None, None, None)  # type: ignore[attr-defined]
    wait_until(lambda: _phase(fleet, "101") == Phase.COPIED, "the catch-up", proc=proc)
    wait_until(lambda: _waiting_locks(fleet.dsn("eu-2")) > 0, "the replay to wait on tasks", proc=proc)


def _hold_at_cutover(fleet: Fleet, proc: subprocess.Popen[str], stack: list[object]) -> None:
    """A REPEATABLE READ writer of a cohort tenant holds its guard's row: the freeze waits to fence it."""
    wait_until(lambda: _phase(fleet, "101") == Phase.SYNCED, "the bulk copy to be verified", proc=proc)
    writer = dsnlib.connect(fleet.dsn("eu-1"), pinned=False)
    writer.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
    writer.execute("UPDATE tenants SET name = name WHERE id = 110")
    stack.append(writer)
    wait_until(lambda: _phase(fleet, "101") == Phase.CUTOVER, "the cutover", proc=proc)
    wait_until(lambda: _waiting_locks(fleet.dsn("eu-1"), "tuple") > 0, "the fence to wait", proc=proc)


def _waiting_locks(dsn: str, kind: str = "relation") -> int:
    with dsnlib.connect(dsn, autocommit=True, pinned=False) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_locks WHERE NOT granted AND locktype IN (%s, 'transactionid')", (kind,)
        )
        return int(row.fetchone()[0])  # type: ignore[index]


@pytest.mark.parametrize(
    ("phase", "hold"),
    [("copy", _hold_at_copy), ("catch-up", _hold_at_catch_up), ("cutover", _hold_at_cutover)],
    ids=["copy", "catch-up", "cutover"],
)
def test_kill_9_of_a_cohort_move_then_the_same_command_resumes_it_exactly(
    fleet: Fleet, tmp_path: Path, phase: str, hold: Callable[[Fleet, subprocess.Popen[str], list[object]], None]
) -> None:
    ids = list(range(101, 121))
    cohort = [str(t) for t in ids]
    fleet.seed_many("eu-1", ids, 300)
    layout = fleet.layout()
    written = {"105", "118"}
    before = {t: tenant_digest(fleet.dsn("eu-1"), layout, t) for t in cohort if t not in written}
    versions = _routes(fleet, cohort)
    listed = tmp_path / "cohort.txt"
    listed.write_text("\n".join(cohort))
    writers = [
        Workload(fleet.catalog.url, fleet.stamps, int(t), seed=int(t), rate=100).start() for t in sorted(written)
    ]
    args = ("move", "--tenants-file", str(listed), "--to", "eu-2", "--batch-rows", "200", "--max-freeze-ms", "20000")
    stack: list[object] = []
    proc = fleet.popen(*args, "--yes", "--json")
    try:
        hold(fleet, proc, stack)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        for held in reversed(stack):
            if isinstance(held, psycopg.Connection):
                held.close()
            else:
                held.__exit__(None, None, None)  # type: ignore[attr-defined]
    interrupted = fleet.catalog.open_move("113")
    assert interrupted is not None and interrupted.tenants == tuple(cohort)
    assert _routes(fleet, cohort) == versions  # nothing flipped

    result = fleet.run(*args, "--yes", "--json")  # the same command again
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["resumed"] is True and out["move"]["id"] == interrupted.id
    wait_until(lambda: all("eu-2" in w.touched_on.values() for w in writers), "writes on the new stamp", timeout=30)
    for writer in writers:
        writer.stop()
        assert writer.errors == []
        assert not writer.lost_writes(fleet.dsn("eu-2"))
    assert _routes(fleet, cohort) == {t: ("eu-2", versions[t][1] + 1) for t in cohort}
    for tenant, digest in before.items():
        assert tenant_digest(fleet.dsn("eu-2"), layout, tenant) == digest, tenant
    status = fleet.run("move", "status", str(interrupted.id))
    assert f"move {interrupted.id}: 20 tenants (101, 102, 103, 104, 105, ...) eu-1 -> eu-2" in status.output
    assert "tenants: " + " ".join(cohort) in status.output
