"""Fleet schema rollouts on real PostgreSQL: drift, canary first, failures, locks, dry runs, refusals."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from alembic import command
from click.testing import CliRunner
from conftest import REPO, Fleet, stamp_snapshot

from migrator import config as configlib
from migrator.catalog import Mode, StampState
from migrator.cli import cli
from migrator.context import Context
from migrator.db import alembic as migrations
from migrator.db import dsn as dsnlib
from migrator.local import pgserver
from migrator.local.provision import sample_app_env
from migrator.rollout.runner import (
    FAILED,
    OK,
    SKIPPED,
    RolloutOptions,
    downgrade_stamps,
    schema_status,
    upgrade_fleet,
)
from migrator.rollout.worker import LOCK_KEY

STAMP_ENV = sample_app_env()
HEAD = "0006_task_checklists"


def put_at(fleet: Fleet, revision: str, *stamps: str) -> None:
    """Downgrade stamps (default: every stamp of the fleet) to `revision` with Alembic directly (test setup
    independent of the engine)."""
    for stamp in stamps or fleet.stamps:
        engine = dsnlib.engine(fleet.dsn(stamp))
        try:
            with engine.connect() as conn:
                command.downgrade(migrations.alembic_config(STAMP_ENV, conn), revision)
        finally:
            engine.dispose()


def revisions(fleet: Fleet) -> dict[str, str | None]:
    return {name: migrations.current_revision(fleet.dsn(name)) for name in sorted(fleet.stamps)}


def schema_runs(fleet: Fleet) -> list[tuple[Any, ...]]:
    with dsnlib.connect(fleet.catalog.url, autocommit=True) as conn:
        return conn.execute(
            "SELECT stamp, result, from_revision, to_revision, error, started_at, finished_at, run_id::text"
            " FROM schema_runs ORDER BY started_at, id"
        ).fetchall()


def context_with(fleet: Fleet, script_location: Path, tmp_path: Path) -> tuple[Context, Path]:
    """A config for the same fleet pointing at another stamp history."""
    path = tmp_path / "migrator-alt.toml"
    path.write_text(configlib.render(fleet.catalog.url, configlib.Tenancy(), script_location))
    return Context.load(path), path


def history_plus(tmp_path: Path, revision: str, body: str) -> Path:
    """A temporary copy of the stamp history with one more revision on top of head."""
    env = tmp_path / "stamp-env"
    shutil.copytree(STAMP_ENV, env, ignore=shutil.ignore_patterns("__pycache__"))
    (env / "versions" / f"{revision}.py").write_text(
        f'"""{revision}"""\nfrom alembic import op\n\nrevision = {revision!r}\ndown_revision = {HEAD!r}\n'
        f"branch_labels = None\ndepends_on = None\n\n\ndef upgrade():\n    op.execute({body!r})\n\n\n"
        "def downgrade():\n    pass\n"
    )
    return env


def test_mixed_fleet_reaches_head_with_one_command_and_status_gates_on_drift(fleet4: Fleet) -> None:
    fleet = fleet4
    put_at(fleet, "0002_collaboration", "eu-1")
    put_at(fleet, "0003_task_priority", "eu-2")
    put_at(fleet, "0004_comments_search_index", "ap-1")
    fleet.seed("eu-1", 1, 600)
    fleet.seed("eu-1", 2, 300)
    fleet.seed("eu-2", 3, 300)
    fleet.seed("us-1", 4, 300)
    fleet.catalog.update_stamp("us-1", state="draining")

    before = fleet.run("schema", "status")
    assert before.exit_code == 3, before.output
    assert "eu-1 (behind 4)" in before.stdout and "eu-2 (behind 3)" in before.stdout
    assert "ap-1 (behind 2)" in before.stdout and "us-1" not in before.stdout.splitlines()[-1]
    data = json.loads(fleet.run("schema", "status", "--json").stdout)
    assert data["drift"] is True and data["head"] == HEAD
    assert {s["stamp"]: s["current"] for s in data["stamps"]}["eu-2"] == "0003_task_priority"

    result = fleet.run("schema", "upgrade", "--yes", "--parallel", "2")
    assert result.exit_code == 0, result.output
    assert set(revisions(fleet).values()) == {HEAD}
    after = fleet.run("schema", "status")
    assert after.exit_code == 0, after.output
    assert f"all 4 stamps at head {HEAD}" in after.stdout

    runs = schema_runs(fleet)
    assert [r[0] for r in runs if r[1] == OK][0] == "ap-1"  # canary: the active stamp with fewest tenants
    assert {(r[0], r[1], r[2]) for r in runs} == {
        ("ap-1", OK, "0004_comments_search_index"),
        ("eu-2", OK, "0003_task_priority"),
        ("eu-1", OK, "0002_collaboration"),
        ("us-1", SKIPPED, HEAD),
    }
    with dsnlib.connect(fleet.dsn("eu-1"), autocommit=True) as conn:  # backfilled from labels, as the seed does
        wrong = conn.execute(
            "SELECT count(*) FROM tasks WHERE priority <> CASE WHEN labels @> ARRAY['p1'] THEN 1"
            " WHEN labels @> ARRAY['bug'] THEN 2 ELSE 3 END"
        ).fetchone()
        assert wrong == (0,)


def test_failing_revision_keeps_stamp_at_previous_revision_and_stops_later_waves(fleet4: Fleet) -> None:
    fleet = fleet4
    put_at(fleet, "0002_collaboration")
    fleet.seed("eu-1", 1, 300)
    fleet.seed("eu-2", 2, 300)
    fleet.seed("eu-2", 3, 300)
    for tenant in (4, 5, 6):
        fleet.seed("us-1", tenant, 200)
    with dsnlib.connect(fleet.dsn("eu-2")) as conn:  # legacy data 0003 refuses to promote
        conn.execute("UPDATE tasks SET meta = jsonb_build_object('priority', 9) WHERE tenant_id = 2 AND id % 5 = 1")

    result = fleet.run("schema", "upgrade", "--yes", "--parallel", "1")
    assert result.exit_code == 1
    assert "eu-2" in result.stderr and "failed" in result.stderr
    assert "0003_task_priority failed, stamp left at 0002_collaboration" in result.stdout
    assert "tasks_priority_range" in result.stdout
    assert revisions(fleet) == {
        "ap-1": HEAD,
        "eu-1": HEAD,
        "eu-2": "0002_collaboration",
        "us-1": "0002_collaboration",
    }
    with dsnlib.connect(fleet.dsn("eu-2"), autocommit=True) as conn:  # the whole revision rolled back
        assert conn.execute(
            "SELECT count(*) FROM information_schema.columns WHERE column_name = 'priority'"
        ).fetchone() == (0,)
    runs = schema_runs(fleet)
    assert [(r[0], r[1]) for r in runs] == [("ap-1", OK), ("eu-1", OK), ("eu-2", FAILED), ("us-1", SKIPPED)]
    assert runs[0][6] <= runs[1][5] <= runs[1][6] <= runs[2][5]  # canary, then one wave after another
    assert "not tried: stopped after wave 2 failed on eu-2" in runs[3][4]

    # A failing canary stops the rollout even with --continue-on-error.
    result = fleet.run("schema", "upgrade", "--yes", "--canary", "eu-2", "--continue-on-error")
    assert result.exit_code == 1 and "stopped after the canary failed on eu-2" in result.stdout
    assert revisions(fleet)["us-1"] == "0002_collaboration"

    # Without the canary in the way, --continue-on-error upgrades the others past the failure.
    rollout = upgrade_fleet(fleet.ctx, RolloutOptions(parallel=2, continue_on_error=True, canary="us-1"))
    assert [(o.stamp, o.result) for o in rollout.outcomes if o.wave is not None] == [("us-1", OK), ("eu-2", FAILED)]
    assert rollout.stopped is None and revisions(fleet)["us-1"] == HEAD


def test_second_upgrade_of_a_stamp_fails_fast_and_the_revision_applies_once(fleet: Fleet, tmp_path: Path) -> None:
    body = "CREATE TABLE applied (at timestamptz DEFAULT now()); INSERT INTO applied DEFAULT VALUES; SELECT pg_sleep(3)"
    env = history_plus(tmp_path, "0006_slow", body)
    ctx, config = context_with(fleet, env, tmp_path)
    first = subprocess.Popen(
        [sys.executable, "-m", "migrator", "--config", str(config), "schema", "upgrade", "--yes", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        deadline = time.monotonic() + 30
        while not [r for r in schema_runs(fleet) if r[1] == "running"]:
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.05)
        canary = [r for r in schema_runs(fleet) if r[1] == "running"][0][0]

        started = time.monotonic()
        second = upgrade_fleet(ctx, RolloutOptions(parallel=4))
        assert time.monotonic() - started < 2.5 and first.poll() is None  # failed while the first still runs
        assert [o.stamp for o in second.failed] == [canary]
        assert f"stamp {canary} is being migrated by another migrator run (backend pid" in str(second.failed[0].error)
        assert second.stopped == f"stopped after the canary failed on {canary}"
    finally:
        out, err = first.communicate(timeout=60)
    assert first.returncode == 0, err
    assert all(s["result"] == OK for s in json.loads(out)["stamps"])
    for name in fleet.stamps:
        assert migrations.current_revision(fleet.dsn(name)) == "0006_slow"
        with dsnlib.connect(fleet.dsn(name), autocommit=True) as conn:
            assert conn.execute("SELECT count(*) FROM applied").fetchone() == (1,)
    oks = [r[0] for r in schema_runs(fleet) if r[1] == OK and r[3] == "0006_slow"]
    assert sorted(oks) == sorted(fleet.stamps)


def test_held_lock_fails_that_stamp_in_a_parallel_wave_naming_it(fleet4: Fleet) -> None:
    fleet = fleet4
    put_at(fleet, "0004_comments_search_index")
    with dsnlib.connect(fleet.dsn("eu-2"), autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))
        pid = holder.info.backend_pid
        started = time.monotonic()
        rollout = upgrade_fleet(fleet.ctx, RolloutOptions(parallel=3, continue_on_error=True))
        assert time.monotonic() - started < 10
    assert rollout.canary == "ap-1"
    assert [(o.stamp, o.wave) for o in rollout.outcomes] == [("ap-1", 0), ("eu-1", 1), ("eu-2", 1), ("us-1", 1)]
    [failed] = rollout.failed
    assert failed.stamp == "eu-2" and failed.at_revision == "0004_comments_search_index"
    assert f"stamp eu-2 is being migrated by another migrator run (backend pid {pid}" in str(failed.error)
    assert revisions(fleet) == {"ap-1": HEAD, "eu-1": HEAD, "eu-2": "0004_comments_search_index", "us-1": HEAD}


def test_dry_run_prints_sql_and_changes_nothing(fleet4: Fleet) -> None:
    fleet = fleet4
    put_at(fleet, "0002_collaboration", "eu-1", "us-1")
    put_at(fleet, "0004_comments_search_index", "ap-1")
    fleet.seed("eu-1", 1, 300)
    before = revisions(fleet)
    snapshots = {name: stamp_snapshot(fleet.dsn(name)) for name in fleet.stamps}

    result = fleet.run("schema", "upgrade", "--dry-run")  # no --yes needed: nothing runs
    assert result.exit_code == 0, result.output
    assert (
        "-- ap-1: 0004_comments_search_index -> 0006_task_checklists"
        " (pending: 0005_task_watchers, 0006_task_checklists)" in result.stdout
    )
    assert "-- eu-1, us-1: 0002_collaboration -> 0006_task_checklists" in result.stdout
    assert "ALTER TABLE tasks ADD COLUMN priority smallint;" in result.stdout
    assert "CREATE INDEX CONCURRENTLY comments_body_search" in result.stdout
    assert "CREATE TABLE task_watchers" in result.stdout
    assert "CREATE TABLE task_checklist_items" in result.stdout
    assert revisions(fleet) == before
    assert {name: stamp_snapshot(fleet.dsn(name)) for name in fleet.stamps} == snapshots
    assert sorted((r[0], r[1]) for r in schema_runs(fleet)) == [
        ("ap-1", "dry-run"),
        ("eu-1", "dry-run"),
        ("eu-2", SKIPPED),
        ("us-1", "dry-run"),
    ]
    data = json.loads(fleet.run("schema", "upgrade", "--dry-run", "--json").stdout)
    assert {s["stamp"]: s["pending"] for s in data["stamps"]}["eu-1"] == [
        "0003_task_priority",
        "0004_comments_search_index",
        "0005_task_watchers",
        HEAD,
    ]


def test_unreachable_stamp_is_reported_and_fails_the_rollout_without_its_password(fleet: Fleet, tmp_path: Path) -> None:
    server = pgserver.start_server(tmp_path / "second", backend="local")
    try:
        with dsnlib.connect(server.dsn(), autocommit=True) as conn:
            conn.execute("CREATE DATABASE lost")
        migrations.upgrade(server.dsn("lost"), STAMP_ENV, "0004_comments_search_index")
        fleet.catalog.add_stamp("lost-1", server.dsn("lost"))
    finally:
        server.stop()
    put_at(fleet, "0004_comments_search_index", "eu-1")

    status = fleet.run("schema", "status")
    assert status.exit_code == 3
    line = next(line for line in status.stdout.splitlines() if "lost-1" in line)
    assert "UNREACHABLE" in line and "cannot connect to stamp lost-1" in line and "***" in line
    upgrade = fleet.run("schema", "upgrade", "--yes", "--continue-on-error")
    assert upgrade.exit_code == 1
    assert "lost-1" in upgrade.stderr and "failed" in upgrade.stderr
    for text in (status.output, upgrade.output):
        assert server.password not in text and fleet.server.password not in text
    assert revisions(fleet)["eu-1"] == HEAD  # the healthy canary went first
    rows = {r[0]: r for r in schema_runs(fleet)}
    assert rows["lost-1"][1] == FAILED and "cannot connect" in rows["lost-1"][4]
    assert server.password not in rows["lost-1"][4]


def test_stamp_with_a_fenced_move_is_refused(fleet: Fleet) -> None:
    fleet.seed("eu-1", 1, 200)
    put_at(fleet, "0004_comments_search_index", "us-1")
    route = fleet.catalog.route("1")
    move = fleet.catalog.create_move([route], "us-1", Mode.ONLINE, 1000)
    fleet.catalog.update_move(move.id, phase="cutover")

    result = fleet.run("schema", "upgrade", "--yes")
    assert result.exit_code == 2
    assert f"stamp us-1 has online move {move.id} (tenant 1, eu-1 -> us-1) in its fenced cutover phase" in result.stderr
    assert revisions(fleet)["us-1"] == "0004_comments_search_index" and schema_runs(fleet) == []
    assert fleet.run("schema", "status").exit_code == 3  # reading is never refused

    fleet.catalog.update_move(move.id, phase="aborted")
    offline = fleet.catalog.create_move([route], "eu-2", Mode.OFFLINE, 1000)
    fleet.catalog.update_move(offline.id, phase="copying")
    result = fleet.run("schema", "downgrade", "0003_task_priority", "--stamp", "eu-2", "--yes")
    assert result.exit_code == 2 and f"offline move {offline.id}" in result.stderr
    fleet.catalog.update_move(offline.id, phase="aborted")
    assert fleet.run("schema", "upgrade", "--yes").exit_code == 0
    assert set(revisions(fleet).values()) == {HEAD}


def test_downgrade_and_back_keeps_data_and_the_log_tells_who_did_what(fleet: Fleet) -> None:
    fleet.seed("eu-1", 1, 400)
    result = fleet.run("schema", "downgrade", "0002_collaboration", "--stamp", "eu-1", "--stamp", "us-1", "--yes")
    assert result.exit_code == 0, result.output
    assert revisions(fleet) == {"eu-1": "0002_collaboration", "eu-2": HEAD, "us-1": "0002_collaboration"}
    with dsnlib.connect(fleet.dsn("eu-1"), autocommit=True) as conn:
        assert conn.execute("SELECT to_regclass('task_watchers')").fetchone() == (None,)
        tasks = conn.execute("SELECT count(*) FROM tasks").fetchone()
    assert fleet.run("schema", "upgrade", "--yes").exit_code == 0
    with dsnlib.connect(fleet.dsn("eu-1"), autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM tasks WHERE priority BETWEEN 1 AND 3").fetchone() == tasks

    log = json.loads(fleet.run("schema", "log", "--stamp", "eu-1", "--json").stdout)
    assert [(r["direction"], r["from_revision"], r["to_revision"], r["result"]) for r in log] == [
        ("upgrade", "0002_collaboration", HEAD, OK),
        ("downgrade", HEAD, "0002_collaboration", OK),
    ]
    assert log[0]["operator"] and log[0]["finished_at"] >= log[0]["started_at"]
    text = fleet.run("schema", "log", "--limit", "2")
    assert text.exit_code == 0 and len(text.stdout.strip().splitlines()) == 3

    history = json.loads(fleet.run("schema", "history", "--json").stdout)
    assert [r["revision"] for r in history][:2] == [HEAD, "0005_task_watchers"]
    assert [r["is_head"] for r in history] == [True, False, False, False, False, False]
    assert "head" in fleet.run("schema", "history").stdout.splitlines()[1]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("schema", "upgrade", "nosuchrev", "--yes"), "unknown revision 'nosuchrev'"),
        (("schema", "upgrade", "--canary", "mars-1", "--yes"), "unknown stamp 'mars-1'"),
        (("schema", "downgrade", "base", "--stamp", "mars-1", "--yes"), "unknown stamp 'mars-1'"),
        (("schema", "log", "--stamp", "mars-1"), "unknown stamp 'mars-1'"),
    ],
)
def test_bad_input_exits_2(fleet: Fleet, args: tuple[str, ...], message: str) -> None:
    result = fleet.run(*args)
    assert result.exit_code == 2 and message in result.stderr
    assert schema_runs(fleet) == []


def test_engine_status_reads_every_stamp(fleet: Fleet) -> None:
    put_at(fleet, "0003_task_priority", "eu-2")
    rows = {r.stamp: r for r in schema_status(fleet.ctx)}
    assert rows["eu-2"].state == "behind" and rows["eu-2"].pending == (
        "0004_comments_search_index",
        "0005_task_watchers",
        HEAD,
    )
    assert rows["eu-1"].state == "up to date" and not rows["eu-1"].drift
    rollout = downgrade_stamps(fleet.ctx, "0004_comments_search_index", ["eu-1", "eu-2"])
    assert [(o.stamp, o.result) for o in rollout.outcomes] == [("eu-1", OK), ("eu-2", SKIPPED)]
    with pytest.raises(psycopg.errors.UndefinedTable), dsnlib.connect(fleet.dsn("eu-1"), autocommit=True) as conn:
        conn.execute("SELECT 1 FROM task_watchers")


def test_a_rollout_names_its_waves_one_way_skips_retired_stamps_saying_so_and_reports_a_failure_once(
    fleet4: Fleet,
) -> None:
    fleet = fleet4
    put_at(fleet, "0002_collaboration")
    fleet.seed("eu-2", 2, 300)  # draining stamps still hold tenants: upgraded
    fleet.seed("us-1", 3, 300)
    fleet.catalog.set_stamp_state("eu-2", StampState.DRAINING)
    fleet.catalog.set_stamp_state("eu-1", StampState.RETIRED)  # holds none: left out, and said so
    with dsnlib.connect(fleet.dsn("us-1")) as conn:  # legacy data 0003 refuses to promote
        conn.execute("UPDATE tasks SET meta = jsonb_build_object('priority', 9) WHERE tenant_id = 3 AND id % 5 = 1")

    result = CliRunner().invoke(
        cli, ["--config", str(fleet.config_path), "schema", "upgrade", "--parallel", "1"], input="y\n"
    )
    assert result.exit_code == 1, result.output
    prompt = result.stderr.split("Upgrade 3 stamp(s)")[0]
    assert "  canary: ap-1\n  wave 1: eu-2\n  wave 2: us-1\n  skipped (retired): eu-1\n" in prompt, prompt
    assert "wave 0" not in result.output
    table = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines()[1:] if line[:1].strip()}
    assert table["ap-1"][:2] == ["canary", "0002_collaboration"]
    assert table["eu-2"][:2] == ["wave", "1"] and table["us-1"][:2] == ["wave", "2"]
    assert "retired: left out of rollouts" in " ".join(table["eu-1"])
    assert revisions(fleet)["eu-1"] == "0002_collaboration" and revisions(fleet)["eu-2"] == HEAD
    summary = result.stdout.strip().splitlines()[-1]
    assert summary.startswith("upgrade to ") and "failed: us-1" in summary
    assert result.output.count("failed: us-1") == 1  # not again as an error line
    assert result.output.count("tasks_priority_range") <= 2  # the stamp's live line and its row in the table


def test_ctrl_c_lets_the_running_step_end_starts_no_more_waves_and_says_how_to_resume(fleet4: Fleet) -> None:
    fleet = fleet4
    put_at(fleet, "0002_collaboration")
    args = ["--config", str(fleet.config_path), "schema", "upgrade", "--yes", "--canary", "ap-1", "--parallel", "2"]
    with dsnlib.connect(fleet.dsn("ap-1"), pinned=False) as hold:  # the canary's ALTER TABLE waits for it
        hold.execute("LOCK TABLE tasks IN ACCESS SHARE MODE")
        proc = subprocess.Popen(
            [sys.executable, "-m", "migrator", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while not hold.execute("SELECT count(*) FROM pg_locks WHERE NOT granted").fetchone()[0]:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)
        time.sleep(0.5)  # the step keeps waiting: a stop does not cut a revision in half
        assert proc.poll() is None
    out, err = proc.communicate(timeout=120)

    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == (
        "error: schema upgrade stopped by SIGINT at a safe point before wave 1: 1 stamp(s) ran their step, 3 not "
        "tried (eu-1, eu-2, us-1); left in place: no lock and no half-applied revision (each started step ran to "
        "its end); resume: `migrator schema upgrade head`"
    ), err
    assert revisions(fleet) == {"ap-1": HEAD, "eu-1": "0002_collaboration", "eu-2": "0002_collaboration",
                                "us-1": "0002_collaboration"}  # fmt: skip
    again = fleet.run("schema", "upgrade", "head", "--yes")  # the command the line gave
    assert again.exit_code == 0, again.output
    assert set(revisions(fleet).values()) == {HEAD}
