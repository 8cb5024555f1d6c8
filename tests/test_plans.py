"""Drain, rebalance and isolate plans: written for review, applied in parallel, resumable after kill -9."""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import Fleet, catalog_snapshot, copy_held, copy_waits_at_held_table, tenant_digest, tenant_row_count
from psycopg import sql

from migrator.db import dsn as dsnlib
from migrator.plans.planners import parse_plan, to_yaml
from migrator.stamps.discovery import tenant_filter


def _seed_many(fleet: Fleet, stamp: str, sizes: dict[int, int]) -> dict[str, int]:
    return {str(tenant): fleet.seed(stamp, tenant, rows) for tenant, rows in sizes.items()}


def _plan_moves(fleet: Fleet) -> list[tuple[int, str, str, int | None]]:
    with dsnlib.connect(fleet.catalog.url, autocommit=True) as conn:
        return conn.execute("SELECT position, tenant, status, move_id FROM plan_moves ORDER BY position").fetchall()


def _done(fleet: Fleet) -> int:
    return sum(1 for _, _, status, _ in _plan_moves(fleet) if status == "done")


def _plans_recorded(fleet: Fleet) -> int:
    with dsnlib.connect(fleet.catalog.url, autocommit=True) as conn:
        return int(conn.execute("SELECT count(*) FROM plans").fetchone()[0])


def _wait(condition: Callable[[], bool], what: str, proc: Any, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, (what, proc.communicate())
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _plan(fleet: Fleet, tmp_path: Path, *args: str) -> dict[str, Any]:
    out = tmp_path / "plan.yaml"
    result = fleet.run("plan", *args, "-o", str(out), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["path"] == str(out) and parse_plan(out.read_bytes())  # what was written parses back
    return data


def _routed_rows(fleet: Fleet) -> dict[str, int]:
    """Rows of the tenants routed to each stamp, counted on the stamps (independent of migrator.sizes)."""
    layout = fleet.layout()
    used = dict.fromkeys(fleet.stamps, 0)
    for route in fleet.catalog.routes():
        used[route.stamp] += tenant_row_count(fleet.dsn(route.stamp), layout, route.tenant)
    return used


def test_drain_killed_halfway_resumes_and_empties_the_stamp(fleet: Fleet, tmp_path: Path) -> None:
    rng = random.Random(5)
    sizes = _seed_many(fleet, "eu-1", {tenant: rng.randint(300, 4_000) for tenant in range(101, 121)})
    for stamp in ("eu-2", "us-1"):  # without a capacity a stamp counts as unlimited and would take them all
        fleet.catalog.update_stamp(stamp, capacity_rows=200_000)
    layout = fleet.layout()
    before = {t: tenant_digest(fleet.dsn("eu-1"), layout, t) for t in sizes}
    refused = fleet.run("stamp", "set-state", "eu-1", "retired")
    assert refused.exit_code == 2 and "20 tenant(s) routed" in refused.stderr
    assert fleet.run("stamp", "set-state", "eu-1", "draining").exit_code == 0

    plan = _plan(fleet, tmp_path, "drain", "eu-1", "--to", "eu-2,us-1", "--cohort-tenants", "1")
    rows = [m["rows"] for m in plan["moves"]]
    assert sorted(m["tenant"] for m in plan["moves"]) == sorted(sizes) and rows == sorted(rows, reverse=True)
    assert {m["to"] for m in plan["moves"]} == {"eu-2", "us-1"}
    assert plan["utilisation"]["eu-1"]["rows_after"] == 0 and sum(rows) == sum(sizes.values())
    args = ("apply", str(tmp_path / "plan.yaml"), "--parallel", "2", "--batch-rows", "500", "--yes")
    proc = fleet.popen(*args)
    _wait(lambda: _done(fleet) >= 5, "five finished moves", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = _done(fleet)
    assert 5 <= finished < 20, finished

    result = fleet.run(*args, "--json")  # the same command again
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["status"] == "done"
    skipped = [r for r in out["results"] if r["status"] == "skipped"]
    assert len(skipped) >= finished and all("earlier run" in r["reason"] or "already" in r["reason"] for r in skipped)
    assert len(skipped) + sum(r["status"] == "done" for r in out["results"]) == 20
    assert fleet.catalog.routes("eu-1") == []
    for move in plan["moves"]:
        assert fleet.catalog.route(move["tenant"]).stamp == move["to"]
        assert tenant_digest(fleet.dsn(move["to"]), layout, move["tenant"]) == before[move["tenant"]]
    with dsnlib.connect(fleet.catalog.url, autocommit=True) as conn:  # --per-stamp 1: no overlap per target
        spans = conn.execute("SELECT target, created_at, finished_at FROM moves ORDER BY target, created_at").fetchall()
    for (target, _, end), (next_target, start, _) in zip(spans, spans[1:], strict=False):
        assert target != next_target or end <= start, (target, end, start)

    for tenant in sizes:
        assert fleet.run("cleanup", tenant, "--stamp", "eu-1", "--yes").exit_code == 0
    with dsnlib.connect(fleet.dsn("eu-1"), autocommit=True) as conn:
        for table in layout.tables:
            assert conn.execute(sql.SQL("SELECT count(*) FROM {}").format(table.ident)).fetchone()[0] == 0, table
    retired = fleet.run("stamp", "set-state", "eu-1", "retired")
    assert retired.exit_code == 0, retired.output
    assert fleet.catalog.stamp("eu-1").state == "retired"


def test_drain_groups_small_tenants_into_cohorts_and_apply_moves_each_cohort_as_one(
    fleet: Fleet, tmp_path: Path
) -> None:
    sizes = {**fleet.seed_many("eu-1", list(range(101, 125)), 150), **fleet.seed_many("eu-1", [1, 2], 6_000)}
    rows = {str(t): n for t, n in sizes.items()}
    layout = fleet.layout()
    before = {t: tenant_digest(fleet.dsn("eu-1"), layout, t) for t in rows}
    plan = _plan(
        fleet, tmp_path, "drain", "eu-1", "--to", "eu-2,us-1", "--cohort-rows", "5000", "--cohort-tenants", "8"
    )

    alone = [m for m in plan["moves"] if "tenant" in m]
    cohorts = [m for m in plan["moves"] if "tenants" in m]
    assert sorted(m["tenant"] for m in alone) == ["1", "2"] and plan["moves"][:2] == alone  # large ones first, alone
    assert len(cohorts) >= 3 and all(1 < len(m["tenants"]) <= 8 and m["rows"] <= 5_000 for m in cohorts)
    assert all(m["rows"] == sum(rows[t] for t in m["tenants"]) for m in cohorts)  # each cohort with its size
    listed = [t for m in cohorts for t in m["tenants"]]
    assert sorted(listed) == sorted(str(t) for t in range(101, 125)) and len(listed) == len(set(listed))
    written = (tmp_path / "plan.yaml").read_text()
    assert "tenants: [" in written  # a cohort's tenants on its own line of the file
    shown = fleet.run("plan", "show", str(tmp_path / "plan.yaml"))
    assert shown.exit_code == 0 and f"{len(plan['moves'])} moves of 26 tenants" in shown.stdout

    result = fleet.run("apply", str(tmp_path / "plan.yaml"), "--parallel", "2", "--per-stamp", "2", "--yes")
    assert result.exit_code == 0, result.output + result.stderr
    first = cohorts[0]["tenants"]
    assert f"done    {len(first)} tenants ({', '.join(first[:5])}" in result.stderr  # a line per finished cohort
    assert "plan: 26/26 tenants" in result.stderr  # the overall counter counts tenants as well as rows
    assert "\r" not in result.stderr and "\x1b" not in result.stderr
    assert fleet.catalog.routes("eu-1") == []
    for entry in plan["moves"]:
        tenants = entry.get("tenants") or [entry["tenant"]]
        moves = {m.id for t in tenants for m in fleet.catalog.moves(t)}
        assert len(moves) == 1, (tenants, moves)  # one move per cohort
        for tenant in tenants:
            assert fleet.catalog.route(tenant).stamp == entry["to"]
            assert tenant_digest(fleet.dsn(entry["to"]), layout, tenant) == before[tenant]


def test_capacity_is_reckoned_once_a_full_stamp_fits_and_one_more_row_overruns() -> None:
    """The planners and apply's stale-plan check share this reckoning: exactly full fits, beyond is short."""
    from migrator.catalog import Stamp
    from migrator.plans.capacity import Overrun, StampUsage, shift

    capped = StampUsage(Stamp("a", "service=a", None, 100, 1_000, "active"), 90, 500, None)
    unlimited = StampUsage(Stamp("b", "service=b", None, None, None, "active"), 10**9, 10**12, None)
    assert capped.fits(10, 500) and not capped.fits(11, 0) and not capped.fits(0, 501)
    assert capped.shifted(20, 600).overruns() == [Overrun("rows", 110, 100), Overrun("bytes", 1_100, 1_000)]
    assert [o.short for o in capped.shifted(20, 600).overruns()] == [10, 100]
    assert capped.utilisation == 0.9 and unlimited.utilisation is None and unlimited.fits(10**9, 10**12)
    usage = {"a": capped, "b": unlimited}
    shift(usage, "a", "b", 40, 100)
    assert (usage["a"].rows, usage["a"].bytes, usage["b"].rows) == (50, 400, 10**9 + 40)
    assert capped.rows == 90  # the reckoning never changes the measured usage it started from


def test_drain_that_cannot_fit_is_refused_naming_the_shortfall(fleet: Fleet, tmp_path: Path) -> None:
    sizes = _seed_many(fleet, "eu-1", {1: 3_000, 2: 2_000, 3: 1_000})
    fleet.catalog.update_stamp("eu-2", capacity_rows=sizes["1"] - 500)
    fleet.catalog.update_stamp("us-1", capacity_rows=1_500)
    snapshot = catalog_snapshot(fleet)
    out = tmp_path / "drain.yaml"
    result = fleet.run("plan", "drain", "eu-1", "-o", str(out))
    assert result.exit_code == 2
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1
    assert (
        "tenant 1 " in line
        and "eu-2 is 500 rows short" in line
        and f"us-1 is {sizes['1'] - 1_500:,} rows short" in line
    )
    assert not out.exists() and catalog_snapshot(fleet) == snapshot

    fleet.catalog.update_stamp("eu-2", capacity_rows=100_000, capacity_bytes=1_000)
    fleet.catalog.update_stamp("us-1", capacity_rows=100_000, capacity_bytes=1_000)
    result = fleet.run("plan", "drain", "eu-1", "-o", str(out))
    assert result.exit_code == 2 and "bytes short" in result.stderr and not out.exists()
    assert _plans_recorded(fleet) == 0


def test_rebalance_plan_is_within_threshold_and_apply_achieves_it(fleet: Fleet, tmp_path: Path) -> None:
    _seed_many(fleet, "eu-1", {1: 3_000, 2: 2_500, 3: 2_000, 4: 1_500, 5: 1_200, 6: 1_000, 7: 800})
    _seed_many(fleet, "eu-2", {8: 1_500, 9: 1_000})
    for stamp in fleet.stamps:
        assert fleet.run("stamp", "update", stamp, "--capacity-rows", "20000").exit_code == 0
    plan = _plan(fleet, tmp_path, "rebalance", "--threshold", "0.1", "--cohort-tenants", "1")
    used = _routed_rows(fleet)
    mean = sum(used.values()) / 60_000
    assert "notes" not in plan and plan["moves"]
    tenants = [m["tenant"] for m in plan["moves"]]
    assert len(tenants) == len(set(tenants))
    for stamp, use in plan["utilisation"].items():
        assert use["rows_before"] == used[stamp]
        assert abs(use["after"] - mean) <= 0.1 + 1e-4, (stamp, use, mean)

    shown = fleet.run("plan", "show", str(tmp_path / "plan.yaml"))
    assert shown.exit_code == 0 and "utilisation" in shown.stdout and "eu-1" in shown.stdout
    result = fleet.run("apply", str(tmp_path / "plan.yaml"), "--parallel", "3", "--yes", "--json")
    assert result.exit_code == 0, result.output
    after = _routed_rows(fleet)
    for stamp, use in plan["utilisation"].items():
        assert after[stamp] == use["rows_after"]
        assert abs(after[stamp] / 20_000 - use["after"]) < 1e-3
        assert abs(after[stamp] / 20_000 - mean) <= 0.1 + 1e-4


def test_stale_plan_is_refused_naming_the_entry(fleet: Fleet, tmp_path: Path) -> None:
    _seed_many(fleet, "eu-1", {1: 900, 2: 600, 3: 300})
    _plan(fleet, tmp_path, "drain", "eu-1", "--to", "eu-2", "--cohort-tenants", "1")
    assert fleet.run("move", "2", "--to", "us-1", "--yes").exit_code == 0  # by hand, since the plan was made
    snapshot = catalog_snapshot(fleet)
    result = fleet.run("apply", str(tmp_path / "plan.yaml"), "--yes")
    assert result.exit_code == 2
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1 and "stale plan" in line
    assert "moves[1] (line" in line and "tenant 2: is routed to us-1, the plan moves it from eu-1" in line
    assert catalog_snapshot(fleet) == snapshot and _plans_recorded(fleet) == 0

    fleet.catalog.update_stamp("eu-2", state="draining")
    result = fleet.run("apply", str(tmp_path / "plan.yaml"), "--dry-run")
    assert result.exit_code == 2 and "target eu-2 is draining" in result.stderr


def test_failed_move_does_not_stop_the_others_and_rerun_retries_it(fleet: Fleet, tmp_path: Path) -> None:
    from migrator.local.seed import TenantSpec, seed_tenant

    _seed_many(fleet, "eu-1", {1: 1_200, 2: 500, 3: 400})
    _plan(fleet, tmp_path, "drain", "eu-1", "--to", "eu-2", "--cohort-tenants", "1")
    with dsnlib.connect(fleet.dsn("eu-2")) as conn:  # a stray copy of tenant 1 on the target: preflight refuses
        seed_tenant(conn, TenantSpec(1, 50))
    plan_file = str(tmp_path / "plan.yaml")

    result = fleet.run("apply", plan_file, "--stop-on-error", "--yes")
    assert result.exit_code == 1 and "1 of 3 moves failed" in result.stderr
    assert "already holds rows of tenant 1" in result.stdout and "not started: --stop-on-error" in result.stdout
    assert [r.stamp for r in map(fleet.catalog.route, "123")] == ["eu-1"] * 3

    result = fleet.run("apply", plan_file, "--yes", "--json")
    assert result.exit_code == 1
    statuses = {r["tenants"][0]: r["status"] for r in json.loads(result.stdout)["results"]}
    assert statuses == {"1": "failed", "2": "done", "3": "done"}

    with dsnlib.connect(fleet.dsn("eu-2"), autocommit=True) as conn:
        for table in reversed(fleet.layout().tables):
            conn.execute(sql.SQL("DELETE FROM {} WHERE {}").format(table.ident, tenant_filter(table, ("1",))))
    result = fleet.run("apply", plan_file, "--yes", "--json")
    assert result.exit_code == 0, result.output
    assert [s for _, _, s, _ in _plan_moves(fleet)] == ["done"] * 3 and fleet.catalog.routes("eu-1") == []


def test_ctrl_c_stops_the_running_move_at_a_safe_point_and_says_how_to_resume_or_abort(
    fleet: Fleet, tmp_path: Path
) -> None:
    _seed_many(fleet, "eu-1", {1: 4_000, 2: 3_000, 3: 2_000, 4: 1_000})
    _plan(fleet, tmp_path, "drain", "eu-1", "--to", "eu-2", "--cohort-tenants", "1")
    plan_file = str(tmp_path / "plan.yaml")
    args = ("apply", plan_file, "--parallel", "1", "--batch-rows", "200", "--yes")
    heard: list[str] = []  # the run's stderr, line by line as it comes
    with copy_held(fleet, "eu-2"):  # the first move waits inside its copy until the signal is heard
        proc = fleet.popen(*args, start_new_session=True)
        reader = threading.Thread(target=heard.extend, args=(proc.stderr,), daemon=True)
        reader.start()
        _wait(lambda: copy_waits_at_held_table(fleet, "eu-2"), "the copy to wait at the held table", proc)
        os.killpg(proc.pid, signal.SIGINT)
        # Held until the handler ran: on a loaded machine it may run late, and a copy let go first
        # could finish and go on past the next safe point before the stop is set.
        _wait(lambda: any("stopping at the next safe point" in line for line in heard), "the signal heard", proc)
    assert proc.stdout is not None
    proc.stdout.read()
    proc.wait(timeout=120)
    reader.join(timeout=10)
    err = "".join(heard)

    assert proc.returncode == 130, err
    stopped = fleet.catalog.open_move("1")
    assert stopped is not None and stopped.phase == "copying"
    assert err.strip().splitlines()[-1] == (
        f"error: apply {plan_file} stopped by SIGINT: 1 move(s) stopped at a safe point (move {stopped.id} of "
        "tenant 1 (eu-1 -> eu-2) at phase copying: the capture trigger on eu-1 (writes go on and are recorded), "
        f"no fence), 3 not started; resume: `migrator apply {plan_file}`, abort a stopped move: "
        f"`migrator move abort {stopped.id}`"
    ), err
    assert [s for _, _, s, _ in _plan_moves(fleet)] == ["pending"] * 4
    assert all(fleet.catalog.open_move(t) is None for t in "234")
    result = fleet.run(*args)  # the command the line gave
    assert result.exit_code == 0, result.output
    assert fleet.catalog.routes("eu-1") == []


def test_a_plan_already_being_applied_is_refused_and_left_running(fleet: Fleet, tmp_path: Path) -> None:
    _seed_many(fleet, "eu-1", {1: 3_000, 2: 2_000})
    _plan(fleet, tmp_path, "drain", "eu-1", "--to", "eu-2", "--cohort-tenants", "1")
    args = ("apply", str(tmp_path / "plan.yaml"), "--batch-rows", "100", "--yes")
    first = fleet.popen(*args)
    _wait(lambda: any(s == "running" for _, _, s, _ in _plan_moves(fleet)), "a running move", first)
    second = fleet.run(*args)
    assert second.exit_code == 1 and "is being applied by another running migrator" in second.stderr, second.output
    _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err  # the refused run changed nothing of the first one's work
    assert [s for _, _, s, _ in _plan_moves(fleet)] == ["done"] * 2 and fleet.catalog.routes("eu-1") == []


def test_isolate_needs_an_empty_stamp(fleet: Fleet, tmp_path: Path) -> None:
    _seed_many(fleet, "eu-1", {1: 2_000, 2: 300})
    fleet.seed("us-1", 3, 300)
    refused = fleet.run("plan", "isolate", "1", "--to", "us-1", "-o", str(tmp_path / "x.yaml"))
    assert refused.exit_code == 2 and "us-1 already holds 1 tenant(s) (3)" in refused.stderr
    plan = _plan(fleet, tmp_path, "isolate", "1", "--to", "eu-2")
    assert [(m["tenant"], m["from"], m["to"]) for m in plan["moves"]] == [("1", "eu-1", "eu-2")]
    assert plan["kind"] == "isolate" and "***" in plan["catalog"]
    listed = fleet.run("tenant", "list", "--stamp", "eu-1", "--sizes", "--json")
    assert listed.exit_code == 0, listed.output
    one = next(t for t in json.loads(listed.stdout) if t["tenant"] == "1")
    with dsnlib.connect(fleet.dsn("eu-1"), autocommit=True) as conn:  # independent: row by row, summed here
        query = "SELECT pg_column_size(t.*) FROM {} t WHERE {}"
        payload = sum(
            size
            for table in fleet.layout().tables
            for (size,) in conn.execute(
                sql.SQL(query).format(table.ident, tenant_filter(table, ("1",), sql.Identifier("t")))
            )
        )
    assert one["bytes"] == payload == plan["moves"][0]["bytes"] == sum(one["table_bytes"].values())
    assert one["rows"] == plan["moves"][0]["rows"] == tenant_row_count(fleet.dsn("eu-1"), fleet.layout(), "1")


def _mutations() -> list[tuple[str, Callable[[str], str], str]]:
    def edit_move(key: str, value: Any) -> Callable[[str], str]:
        def change(text: str) -> str:
            data = yaml.safe_load(text)
            data["moves"][1][key] = value
            return yaml.safe_dump(data, sort_keys=False, default_flow_style=None)

        return change

    def drop(key: str) -> Callable[[str], str]:
        def change(text: str) -> str:
            data = yaml.safe_load(text)
            del data[key]
            return yaml.safe_dump(data, sort_keys=False, default_flow_style=None)

        return change

    return [
        ("bad yaml", lambda t: t.replace("moves:", "moves: [", 1), "malformed YAML at line"),
        ("not a mapping", lambda t: "- just\n- a list\n", "not a plan"),
        ("missing key", drop("reason"), "plan: missing key 'reason'"),
        ("wrong type", edit_move("rows", "many"), "moves[1].rows: must be a non-negative integer, got 'many'"),
        ("negative", edit_move("bytes", -5), "moves[1].bytes: must be a non-negative integer, got -5"),
        ("tenant twice", edit_move("tenant", "1"), "tenant 1 appears twice (first at line"),
        ("unknown key", lambda t: t.replace("reason:", "raeson:", 1), "raeson: unknown key"),
        ("duplicate key", lambda t: t + "kind: drain\n", "duplicate key 'kind'"),
        ("version", lambda t: t.replace("version: 1", "version: 7", 1), "unsupported plan version 7"),
        ("unknown stamp", edit_move("to", "mars-1"), "to: unknown stamp 'mars-1' (tenant 2)"),
    ]


@pytest.mark.parametrize(("name", "mutate", "message"), _mutations(), ids=[m[0] for m in _mutations()])
def test_malformed_plan_is_one_clear_line(
    fleet: Fleet, tmp_path: Path, name: str, mutate: Callable[[str], str], message: str
) -> None:
    _seed_many(fleet, "eu-1", {1: 300, 2: 200})
    _plan(fleet, tmp_path, "drain", "eu-1", "--to", "eu-2", "--cohort-tenants", "1")
    bad = tmp_path / "bad.yaml"
    bad.write_text(mutate((tmp_path / "plan.yaml").read_text()))
    result = fleet.run("apply", str(bad), "--yes")
    assert result.exit_code == 2, result.output
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1 and str(bad) in line and message in line, line
    if name not in ("bad yaml", "not a mapping", "missing key", "duplicate key", "version"):
        assert "line " in line  # the entry at fault is located
    assert _plans_recorded(fleet) == 0


def test_a_plan_entry_may_name_its_queue_and_the_file_keeps_it() -> None:
    text = (
        "version: 1\nkind: drain\ncreated: '2026-12-03T00:00:00+00:00'\ncatalog: c\nfleet_schema_revision: null\n"
        "reason: r\nutilisation: {}\nmoves:\n"
        "- {tenant: '1', from: a, to: b, rows: 1, bytes: 1, queue: eu}\n"
        "- {tenants: ['2', '3'], from: a, to: b, rows: 2, bytes: 2}\n"
    )
    plan = parse_plan(text)
    assert [m.queue for m in plan.moves] == ["eu", None]
    assert parse_plan(to_yaml(plan)).moves == plan.moves
