"""Plans run by `migrator worker` processes sharing the catalog's job queue (`apply --queue`).

Every worker here is a real process started from the CLI; the queue is procrastinate's tables in
the test's catalog database. The guarantees are those of a local `apply`: each cohort runs once,
per-stamp and per-tenant limits hold across workers, a worker killed with -9 or stopped with
SIGTERM leaves its move to another, which resumes it without losing or duplicating a row.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import Fleet, RunsCli, copy_held, copy_waits_at_held_table, tenant_digest, wait_until
from test_schema_rollout import HEAD, put_at, revisions, schema_runs

from migrator.catalog import Phase
from migrator.db import dsn as dsnlib
from migrator.local import provision
from migrator.plans.apply import plan_digest
from migrator.queue.follow import follow
from migrator.rollout.runner import FAILED, OK, SKIPPED, RolloutOptions, plan_upgrade
from migrator.stamps.discovery import Layout
from migrator.testing.writer import Workload

STALLED_AFTER = "4"  # seconds without a heartbeat before a worker's jobs are queued again


@contextmanager
def workers(cli: RunsCli, count: int, *args: str) -> Iterator[list[subprocess.Popen[str]]]:
    """`count` worker processes; SIGTERM to each at the end (kill -9 if one does not stop)."""
    procs = [cli.popen("worker", "--stalled-after", STALLED_AFTER, "--concurrency", "1", *args) for _ in range(count)]
    try:
        yield procs
    finally:
        stop_workers(procs)


def stop_workers(procs: list[subprocess.Popen[str]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _seeded(
    fleet: Fleet, ids: Iterable[int], rows: int, but: Collection[str] = ()
) -> tuple[list[str], Layout, dict[str, dict[str, tuple[int, str]]]]:
    """Tenants `ids` seeded on eu-1: their names, the layout, and each one's digest (`but` those a writer changes)."""
    tenants = [str(t) for t in ids]
    fleet.seed_many("eu-1", [int(t) for t in tenants], rows)
    layout = fleet.layout()
    return tenants, layout, {t: tenant_digest(fleet.dsn("eu-1"), layout, t) for t in tenants if t not in but}


def _drain_plan(fleet: Fleet, path: Path, *args: str) -> dict[str, Any]:
    result = fleet.run("plan", "drain", "eu-1", "--to", "eu-2,us-1", "-o", str(path), *args)
    assert result.exit_code == 0, result.output + result.stderr
    return yaml.safe_load(path.read_text())


def _entries(fleet: Fleet, path: Path) -> list[dict[str, Any]]:
    result = fleet.run("plan", "status", str(path), "--json")
    assert result.exit_code == 0, result.output + result.stderr
    return json.loads(result.stdout)["entries"]


def _plan_status(fleet: Fleet, path: Path) -> str:
    result = fleet.run("plan", "status", str(path), "--json")
    return json.loads(result.stdout)["status"] if result.exit_code == 0 else "unknown"


def _moves(fleet: Fleet) -> list[tuple[int, str, str, str, Any, Any, list[str]]]:
    """Every move: id, source, target, phase, created_at, finished_at and its tenants."""
    with fleet.catalog.transaction() as conn:
        return conn.execute(
            "SELECT m.id, m.source, m.target, m.phase, m.created_at, m.finished_at,"
            " array_agg(t.tenant ORDER BY t.position) FROM moves m JOIN move_tenants t ON t.move_id = m.id"
            " GROUP BY m.id ORDER BY m.id"
        ).fetchall()


def _running_move(fleet: Fleet) -> int | None:
    with fleet.catalog.transaction() as conn:
        row = conn.execute("SELECT id FROM moves WHERE finished_at IS NULL AND phase <> 'aborted'").fetchone()
    return None if row is None else int(row[0])


def _assert_each_flipped_once(fleet: Fleet, tenants: list[str]) -> None:
    flipped = [t for m in _moves(fleet) if m[3] == Phase.FLIPPED for t in m[6]]
    assert sorted(flipped) == sorted(tenants)  # every tenant moved by exactly one flipped move


def _assert_no_overlap(moves: list[tuple[int, str, str, str, Any, Any, list[str]]], key: Callable[..., Any]) -> None:
    """Moves sharing `key` (a target stamp, a tenant) never ran at the same time."""
    groups: dict[Any, list[tuple[Any, Any]]] = {}
    for m in moves:
        for k in key(m):
            groups.setdefault(k, []).append((m[4], m[5]))
    for k, spans in groups.items():
        spans.sort()
        for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
            assert end is not None and end <= start, f"two moves of {k} overlapped"


def test_two_workers_run_every_cohort_once_and_a_worker_killed_mid_move_is_finished_by_the_other(
    fleet: Fleet, tmp_path: Path
) -> None:
    written = {"103", "110"}
    tenants, layout, before = _seeded(fleet, range(101, 113), 200, but=written)
    plan = _drain_plan(fleet, tmp_path / "drain.yaml", "--cohort-tenants", "3")
    assert len(plan["moves"]) == 4 and all(len(m["tenants"]) == 3 for m in plan["moves"])
    writers = [Workload(fleet.catalog.url, fleet.stamps, int(t), seed=int(t), rate=50).start() for t in written]
    held = copy_held(fleet, "eu-2")
    held.__enter__()  # the first move into eu-2 waits at its last table, on the first worker
    try:
        result = fleet.run("apply", str(tmp_path / "drain.yaml"), "--queue", "--per-stamp", "2", "--yes")
        assert result.exit_code == 0, result.output + result.stderr
        first = fleet.popen("worker", "--stalled-after", STALLED_AFTER, "--concurrency", "1")
        try:
            wait_until(lambda: copy_waits_at_held_table(fleet, "eu-2"), "a move to wait at the held table")
            interrupted = _running_move(fleet)
            first.send_signal(signal.SIGKILL)
            first.wait()
        finally:
            if first.poll() is None:
                first.kill()
    finally:
        held.__exit__(None, None, None)
    assert interrupted is not None and fleet.catalog.move(interrupted).phase == Phase.COPYING
    with workers(fleet, 1) as procs:
        wait_until(lambda: _plan_status(fleet, tmp_path / "drain.yaml") != "running", "the plan to end", timeout=120)
        assert procs[0].poll() is None
    for writer in writers:
        writer.stop()
        assert writer.errors == []
    entries = _entries(fleet, tmp_path / "drain.yaml")
    assert [e["status"] for e in entries] == ["done"] * 4
    moves = _moves(fleet)
    assert len(moves) == 4 and interrupted in {m[0] for m in moves}  # the killed move resumed, not redone
    _assert_each_flipped_once(fleet, tenants)
    _assert_no_overlap(moves, lambda m: m[6])
    for writer in writers:
        assert not writer.lost_writes(fleet.dsn(fleet.catalog.route(str(writer.tenant)).stamp))
    for tenant, digest in before.items():
        assert tenant_digest(fleet.dsn(fleet.catalog.route(tenant).stamp), layout, tenant) == digest, tenant


def test_entries_planned_by_region_are_run_only_by_a_worker_of_their_target_region(
    fleet: Fleet, tmp_path: Path
) -> None:
    """`plan drain --queue-by-region` puts each entry on its target's region queue: a worker of `us`
    runs the moves into us-1 and leaves those into eu-2 queued until a worker of `eu` comes."""
    ids = [301, 302, 303, 304]
    fleet.seed_many("eu-1", ids, 40)
    path = tmp_path / "drain.yaml"
    plan = _drain_plan(fleet, path, "--queue-by-region", "--cohort-tenants", "1")
    queues = {m["to"]: m["queue"] for m in plan["moves"]}
    eu_moves = sum(m["queue"] == "eu" for m in plan["moves"])
    assert queues == {"eu-2": "eu", "us-1": "us"}, plan["moves"]  # every entry named, both regions planned
    assert fleet.run("apply", str(path), "--queue", "--yes").exit_code == 0
    assert {(e["target"], e["queue"]) for e in _entries(fleet, path)} == {("eu-2", "eu"), ("us-1", "us")}
    with workers(fleet, 1, "--queue", "us"):
        wait_until(
            lambda: all(e["status"] == "done" for e in _entries(fleet, path) if e["target"] == "us-1"),
            "the moves into us-1",
        )
        time.sleep(1)  # a worker that took any queue would have started an eu-2 move by now
        assert {m[2] for m in _moves(fleet)} == {"us-1"}
        said: list[str] = []  # --wait names the queue no live worker takes
        with pytest.raises(TimeoutError):
            follow(fleet.ctx, plan_digest(path), said.append, poll_s=0.2, timeout_s=3, unclaimed_after_s=1)
        assert [line for line in said if line.startswith("waiting on queue")] == [
            f"waiting on queue eu: {eu_moves} move(s) unclaimed for over 1 s; every worker is busy,"
            " or none takes eu (`migrator worker --queue eu`)"
        ], said
    with workers(fleet, 1, "--queue", "eu"):
        result = fleet.run("plan", "wait", str(path), "--json")
    assert result.exit_code == 0, result.output + result.stderr
    _assert_each_flipped_once(fleet, [str(t) for t in ids])
    assert {fleet.catalog.route(str(t)).stamp for t in ids} == {"eu-2", "us-1"}


def test_a_local_apply_counts_the_per_stamp_slots_of_the_workers_moves(fleet: Fleet, tmp_path: Path) -> None:
    """--per-stamp is slots in the catalog that every apply and worker takes: while a worker's move
    into eu-2 waits at a held table, a local apply of another plan into eu-2 starts no move there,
    says why, and runs it once the worker's move is done."""
    fleet.seed_many("eu-1", [401, 402], 60)
    fleet.seed_many("us-1", [411], 60)
    queued, local = tmp_path / "queued.yaml", tmp_path / "local.yaml"
    for source, path in (("eu-1", queued), ("us-1", local)):
        assert fleet.run("plan", "drain", source, "--to", "eu-2", "-o", str(path)).exit_code == 0
    with workers(fleet, 1):
        with copy_held(fleet, "eu-2"):
            assert fleet.run("apply", str(queued), "--queue", "--per-stamp", "1", "--yes").exit_code == 0
            wait_until(lambda: copy_waits_at_held_table(fleet, "eu-2"), "the worker's move to wait at the held table")
            apply = fleet.popen("apply", str(local), "--per-stamp", "1", "--yes", "--no-progress")
            time.sleep(3)  # time enough to start a move, were the slot not taken
            assert apply.poll() is None and [m[1] for m in _moves(fleet)] == ["eu-1"]  # none from us-1 yet
        out, err = apply.communicate(timeout=120)
        assert apply.returncode == 0, out + err
        wait_until(lambda: _plan_status(fleet, queued) != "running", "the queued plan to end")
    assert "waiting: 1 move(s) into eu-2 already running elsewhere" in err, err
    moves = _moves(fleet)
    assert sorted(m[1] for m in moves) == ["eu-1", "us-1"] and all(m[3] == Phase.FLIPPED for m in moves)
    _assert_no_overlap(moves, lambda m: [m[2]])  # one move into eu-2 at a time, whoever ran it


def test_per_stamp_and_per_tenant_limits_hold_with_three_workers_and_two_plans(fleet: Fleet, tmp_path: Path) -> None:
    fleet.seed_many("eu-1", list(range(201, 209)), 300)
    fleet.seed_many("us-1", list(range(301, 305)), 300)
    first = _drain_plan(fleet, tmp_path / "a.yaml", "--cohort-tenants", "2")
    first["moves"] = [{**m, "to": "eu-2"} for m in first["moves"]]  # every cohort into eu-2
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(first, sort_keys=False))
    second = {
        **first,
        "moves": [
            {"tenants": ["301", "302"], "from": "us-1", "to": "eu-2", "rows": 0, "bytes": 0},
            {"tenants": ["303", "304"], "from": "us-1", "to": "eu-2", "rows": 0, "bytes": 0},
            {"tenant": "201", "from": "eu-1", "to": "us-1", "rows": 0, "bytes": 0},  # also in the first plan
        ],
    }
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(second, sort_keys=False))
    for plan in ("a.yaml", "b.yaml"):
        result = fleet.run("apply", str(tmp_path / plan), "--queue", "--per-stamp", "1", "--batch-rows", "50", "--yes")
        assert result.exit_code == 0, result.output + result.stderr
    with workers(fleet, 3):
        for plan in ("a.yaml", "b.yaml"):
            wait_until(
                lambda plan=plan: _plan_status(fleet, tmp_path / plan) != "running", f"{plan} to end", timeout=180
            )
    moves = _moves(fleet)
    _assert_no_overlap(moves, lambda m: [m[2]] if m[2] == "eu-2" else [])  # --per-stamp 1 into eu-2, fleet-wide
    _assert_no_overlap(moves, lambda m: m[6])  # never two moves of one tenant at once
    into_eu2 = [t for m in moves if m[2] == "eu-2" and m[3] == Phase.FLIPPED for t in m[6]]
    assert len(moves) >= 6 and {"301", "302", "303", "304"} <= set(into_eu2)
    # Tenant 201 was in both plans: exactly one of them moved it, the other's entry failed as stale.
    entries = _entries(fleet, tmp_path / "a.yaml") + _entries(fleet, tmp_path / "b.yaml")
    with_201 = [e for e in entries if "201" in e["tenants"]]
    assert sorted(e["status"] for e in with_201) == ["done", "failed"], with_201
    loser = next(e for e in with_201 if e["status"] == "failed")
    assert "stale plan entry: tenant 201" in loser["error"] and loser["failures"] == 0
    assert [e["status"] for e in entries if "201" not in e["tenants"]] == ["done"] * (len(entries) - 2)
    assert sum(1 for m in moves if "201" in m[6] and m[3] == Phase.FLIPPED) == 1


def test_sigterm_during_a_copy_stops_the_worker_at_a_safe_point_and_another_resumes_the_move(
    fleet: Fleet, tmp_path: Path
) -> None:
    tenants, layout, before = _seeded(fleet, range(401, 405), 400)
    _drain_plan(fleet, tmp_path / "drain.yaml", "--cohort-tenants", "4")
    plan = yaml.safe_load((tmp_path / "drain.yaml").read_text())
    plan["moves"] = [{"tenants": tenants, "from": "eu-1", "to": "eu-2", "rows": 1600, "bytes": 0}]  # one cohort
    (tmp_path / "drain.yaml").write_text(yaml.safe_dump(plan, sort_keys=False))
    assert fleet.run("apply", str(tmp_path / "drain.yaml"), "--queue", "--batch-rows", "100", "--yes").exit_code == 0
    held = copy_held(fleet, "eu-2")
    held.__enter__()
    proc = fleet.popen("worker", "--stalled-after", STALLED_AFTER, "--concurrency", "1")
    try:
        wait_until(lambda: copy_waits_at_held_table(fleet, "eu-2"), "the copy to wait at the held table")
        move_id = _running_move(fleet)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
    finally:
        held.__exit__(None, None, None)  # the held batch commits; the next batch is not started
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert "stopped at a safe point" in stderr and "stopped" in stderr.splitlines()[-1]
    assert move_id is not None
    stopped = fleet.catalog.move(move_id)
    assert stopped.phase == Phase.COPYING and stopped.is_open  # where it stood, unflipped
    assert {r.stamp for r in fleet.catalog.routes_of(tuple(tenants))} == {"eu-1"}
    [entry] = _entries(fleet, tmp_path / "drain.yaml")
    assert entry["status"] == "pending" and "safe point" in entry["error"] and entry["failures"] == 0

    with workers(fleet, 1):
        wait_until(lambda: _plan_status(fleet, tmp_path / "drain.yaml") == "done", "the plan to finish")
    [move] = _moves(fleet)
    assert move[0] == move_id and move[3] == Phase.FLIPPED  # resumed, not started again
    for tenant, digest in before.items():
        assert tenant_digest(fleet.dsn("eu-2"), layout, tenant) == digest, tenant


def test_apply_queue_without_a_worker_says_so_and_wait_reports_waiting_for_a_worker(
    fleet: Fleet, tmp_path: Path
) -> None:
    fleet.seed_many("eu-1", [501, 502], 100)
    _drain_plan(fleet, tmp_path / "drain.yaml")
    queued = fleet.run("apply", str(tmp_path / "drain.yaml"), "--queue", "--yes")
    assert queued.exit_code == 0 and "no worker is running" in queued.stderr, queued.stderr
    again = fleet.run("apply", str(tmp_path / "drain.yaml"), "--queue", "--yes")
    assert "no new jobs" in again.stderr and "already queued" in again.stderr  # nothing queued twice
    refused = fleet.run("apply", str(tmp_path / "drain.yaml"), "--wait")  # following is `plan wait`'s
    assert refused.exit_code == 2 and f"`migrator plan wait {tmp_path / 'drain.yaml'}`" in refused.stderr
    waiting = fleet.popen("plan", "wait", str(tmp_path / "drain.yaml"))
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(waiting.stderr.readline, "")), daemon=True)  # type: ignore[union-attr]
    reader.start()
    started = time.monotonic()
    try:
        wait_until(lambda: any("waiting for a worker" in line for line in lines), "a line saying it waits", timeout=15)
        assert time.monotonic() - started < 10
        with workers(fleet, 1):
            waiting.wait(timeout=90)
    finally:
        if waiting.poll() is None:
            waiting.kill()
    reader.join(timeout=5)
    assert waiting.returncode == 0, lines
    out = waiting.stdout.read()  # type: ignore[union-attr]
    assert "plan " in out and ": done" in out
    assert any(line.startswith("done ") for line in lines)
    _assert_each_flipped_once(fleet, ["501", "502"])


def test_a_failure_that_no_retry_cures_fails_the_entry_at_once_and_transient_ones_stop_at_max_attempts(
    fleet: Fleet, tmp_path: Path
) -> None:
    fleet.seed_many("eu-1", [601], 100)
    fleet.seed_many("eu-1", [602], 100)
    plan = _drain_plan(fleet, tmp_path / "drain.yaml", "--cohort-tenants", "1")
    plan["moves"] = [{**m, "to": "eu-2" if m["tenant"] == "601" else "us-1"} for m in plan["moves"]]
    (tmp_path / "drain.yaml").write_text(yaml.safe_dump(plan, sort_keys=False))
    args = ("apply", str(tmp_path / "drain.yaml"), "--queue", "--max-attempts", "2", "--yes")
    assert fleet.run(*args).exit_code == 0
    # After queueing: tenant 601's rows appear on eu-2 (preflight refuses: never retried), and
    # us-1 stops answering (refused connections are transient: retried twice, then failed).
    with dsnlib.connect(fleet.dsn("eu-2")) as conn:
        conn.execute("INSERT INTO tenants (id, name) VALUES (601, 'stray')")
        conn.commit()
    fleet.catalog.update_stamp("us-1", dsn=fleet.dsn("us-1").replace(f":{fleet.server.port}/", ":1/"))
    with workers(fleet, 1):
        wait_until(lambda: _plan_status(fleet, tmp_path / "drain.yaml") == "failed", "the plan to fail", timeout=120)
    by_tenant = {e["tenants"][0]: e for e in _entries(fleet, tmp_path / "drain.yaml")}
    refused, unreachable = by_tenant["601"], by_tenant["602"]
    assert refused["status"] == "failed" and refused["failures"] == 0
    assert "target eu-2 already holds rows of tenant 601" in refused["error"]
    assert unreachable["status"] == "failed" and unreachable["failures"] == 2
    assert "failed 2 times, the limit" in unreachable["error"]
    status = fleet.run("plan", "status", str(tmp_path / "drain.yaml"))
    assert "plan " in status.stdout and ": failed" in status.stdout


def test_a_queued_rollout_upgrades_the_canary_first_then_every_stamp_once_within_the_connection_budget(
    fleet4: Fleet,
) -> None:
    fleet = fleet4
    put_at(fleet, "0002_collaboration")
    fleet.seed("eu-1", 1, 50)  # the others hold no tenant: the canary is the emptiest, ap-1 (by name)
    args = ("schema", "upgrade", "--queue", "--connections-per-server", "1", "--yes")
    with workers(fleet, 2):
        result = fleet.run(*args, "--wait", "--json")
    assert result.exit_code == 0, result.output + result.stderr
    out = json.loads(result.stdout)
    assert out["canary"] == "ap-1" and sorted(s["stamp"] for s in out["stamps"]) == sorted(fleet.stamps)
    assert revisions(fleet) == dict.fromkeys(sorted(fleet.stamps), HEAD)
    runs = [r for r in schema_runs(fleet) if r[7] == out["run_id"]]
    assert sorted((r[0], r[1]) for r in runs) == [(name, OK) for name in sorted(fleet.stamps)]  # each exactly once
    spans = sorted((r[5], r[6], r[0]) for r in runs)
    assert spans[0][2] == "ap-1"  # the canary ran first and alone
    for (_, end, _), (start, _, _) in zip(spans, spans[1:], strict=False):
        assert end <= start  # one connection per server: the steps never overlapped, whichever worker ran them

    # A failing canary: nothing else is tried, every other stamp is recorded as skipped.
    put_at(fleet, "0002_collaboration", "eu-2", "us-1")
    fleet.seed("eu-2", 2, 300)
    with dsnlib.connect(fleet.dsn("eu-2")) as conn:  # legacy data that 0003 refuses to promote
        conn.execute("UPDATE tasks SET meta = jsonb_build_object('priority', 9) WHERE tenant_id = 2 AND id % 5 = 1")
    with workers(fleet, 2):
        failed = fleet.run(*args, "--canary", "eu-2", "--wait", "--json")
    assert failed.exit_code == 1
    stamps = {s["stamp"]: s for s in json.loads(failed.stdout)["stamps"]}
    assert stamps["eu-2"]["result"] == FAILED and stamps["us-1"]["result"] == SKIPPED
    assert "stopped after the canary failed on eu-2" in stamps["us-1"]["error"]
    assert revisions(fleet)["us-1"] == "0002_collaboration"


@dataclass
class _DeployedElsewhere(RunsCli):
    """Workers started with a config of their own (another deployment of the application's migrations)."""

    config_path: Path


def test_a_queued_rollout_whose_canary_worker_lacks_the_revision_skips_the_other_stamps(
    fleet: Fleet, tmp_path: Path
) -> None:
    put_at(fleet, "0002_collaboration")
    older = tmp_path / "older" / "sample_app"  # the worker's migrations stop before the head
    shutil.copytree(provision.sample_app_env(), older, ignore=shutil.ignore_patterns("__pycache__", f"{HEAD}.py"))
    elsewhere = _DeployedElsewhere(
        provision.write_config(tmp_path / "older" / "migrator.toml", fleet.catalog.url, script_location=older)
    )
    with workers(elsewhere, 1):
        waiting = fleet.popen("schema", "upgrade", "--queue", "--yes", "--wait", "--json")
        try:
            out, err = waiting.communicate(timeout=90)  # the other stamps were left queued for ever: no end
        finally:
            waiting.kill()
    assert waiting.returncode == 1, err
    result = json.loads(out)
    stamps = {s["stamp"]: s for s in result["stamps"]}
    canary = stamps.pop(result["canary"])
    assert canary["result"] == FAILED and f"revision {HEAD} is not in this worker's" in canary["error"]
    assert stamps and all(s["result"] == SKIPPED for s in stamps.values()), stamps
    assert all(f"stopped after the canary failed on {result['canary']}" in s["error"] for s in stamps.values())
    assert set(revisions(fleet).values()) == {"0002_collaboration"}


def _survey_sessions(fleet: Fleet) -> int:
    """Migrator sessions open on the fleet's stamp databases (the survey's, waiting on the locks)."""
    with dsnlib.connect(fleet.server.dsn(), autocommit=True, application_name="test") as admin:
        row = admin.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'migrator' AND datname = ANY(%s)",
            ([db for db in fleet.databases if not db.endswith("_catalog")],),
        ).fetchone()
    return int(row[0]) if row else 0


def test_the_revision_survey_before_a_queued_rollout_keeps_to_the_connection_budget(fleet4: Fleet) -> None:
    """Every stamp's alembic_version is locked, so each survey session waits while open: with a budget
    of 1 per server (all four stamps share the test's server) only one may be open at a time."""
    fleet = fleet4
    holds = [dsnlib.connect(fleet.dsn(name), application_name="test") for name in sorted(fleet.stamps)]
    surveyed: list[object] = []
    try:
        for conn in holds:
            conn.execute("LOCK TABLE alembic_version IN ACCESS EXCLUSIVE MODE")
        budget = RolloutOptions(connections_per_server=1)
        planner = threading.Thread(target=lambda: surveyed.append(plan_upgrade(fleet.ctx, budget)))
        planner.start()
        wait_until(lambda: _survey_sessions(fleet) >= 1, "the survey's first session")
        peak = 0
        for _ in range(25):  # half a second: unbounded, the other three connect well within it
            peak = max(peak, _survey_sessions(fleet))
            time.sleep(0.02)
        assert peak == 1, f"{peak} survey sessions open at once on one server, budget 1"
    finally:
        for conn in holds:
            conn.close()
    planner.join(timeout=60)
    assert len(surveyed) == 1  # every stamp was read once its lock went
