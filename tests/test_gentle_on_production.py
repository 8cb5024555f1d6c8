"""Gentle on production: copies yield to a real streaming standby's replay lag and to load, the cutover
waits for the target's standby, and the fleet's limits change under a running move.

A fresh PostgreSQL server per module with a streaming standby of it (`pg_basebackup -R`, a physical
slot `r1`); lag is made honestly, by pausing the standby's replay or delaying it
(`recovery_min_apply_delay`). Row counts on the standby are read on the standby itself.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import Fleet, new_fleet, tenant_row_count, wait_until
from psycopg.conninfo import conninfo_to_dict
from test_real_schemas_shapes import ShapedFactory, shaped  # noqa: F401

from migrator.db import dsn as dsnlib
from migrator.local import pgserver, provision
from migrator.move.throttle import CHECK_EVERY_S
from migrator.testing.standby import FlipWatch, LagSampler

ROWS = 3_000


@pytest.fixture(scope="module")
def primary() -> Iterator[tuple[pgserver.LocalServer, pgserver.LocalServer, dict[str, str]]]:
    """A server of its own with template databases, and its streaming standby `r1`."""
    base = Path(tempfile.mkdtemp(prefix="migrator-standby-"))
    base.chmod(0o755)
    server = pgserver.start_server(base / "primary", settings={"wal_level": "logical"})  # CDC slots too
    standby = None
    try:
        provision.catalog_database(server, "tpl_catalog")
        provision.stamp_database(server, "tpl_stamp")
        standby = pgserver.start_standby(server, base / "standby", "r1")
        yield server, standby, {"catalog": "tpl_catalog", "stamp": "tpl_stamp"}
    finally:
        if standby is not None:
            standby.stop("immediate")
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def replicated(
    primary: tuple[pgserver.LocalServer, pgserver.LocalServer, dict[str, str]], tmp_path: Path
) -> Iterator[tuple[Fleet, pgserver.LocalServer]]:
    """A fleet on the primary, tenant 7 seeded on eu-1; the standby streaming and replaying again after."""
    server, standby, templates = primary
    with new_fleet(server, templates, tmp_path) as fleet:
        fleet.seed("eu-1", 7, ROWS)
        try:
            yield fleet, standby
        finally:
            standby.start()
            _standby_sql(standby, "SELECT pg_wal_replay_resume()")
            _standby_sql(standby, "ALTER SYSTEM RESET recovery_min_apply_delay")
            _standby_sql(standby, "SELECT pg_reload_conf()")


def _standby_sql(standby: pgserver.LocalServer, statement: str, db: str = "postgres") -> None:
    with dsnlib.connect(standby.dsn(db), autocommit=True) as conn:
        conn.execute(statement)


def _copied(fleet: Fleet) -> int:
    return tenant_row_count(fleet.dsn("eu-2"), fleet.layout(), "7")


def _apply_delay(standby: pgserver.LocalServer, delay: str) -> None:
    _standby_sql(standby, f"ALTER SYSTEM SET recovery_min_apply_delay = '{delay}'")
    _standby_sql(standby, "SELECT pg_reload_conf()")


def _finish(proc: subprocess.Popen[str], timeout: float = 120) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def test_the_copy_pauses_while_the_standby_does_not_replay_and_resumes_after(
    replicated: tuple[Fleet, pgserver.LocalServer],
) -> None:
    fleet, standby = replicated
    total = tenant_row_count(fleet.dsn("eu-1"), fleet.layout(), "7")
    limited = ("--batch-rows", "100", "--rate-limit", "400", "--max-replica-lag", "1")  # unthrottled: ~8 s
    proc = fleet.popen("move", "7", "--to", "eu-2", "--yes", *limited)
    try:
        wait_until(lambda: _copied(fleet) > 0, "the first batch", 30, proc)
        _standby_sql(standby, "SELECT pg_wal_replay_pause()")
        time.sleep(2.5)  # the lag passes 1 s about a second after the pause
        held = _copied(fleet)
        time.sleep(3)
        assert _copied(fleet) == held < total  # not a batch while the standby does not replay
        _standby_sql(standby, "SELECT pg_wal_replay_resume()")
        code, out, err = _finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 0, err
    assert "throttled: replica lag" in err and "> 1 s (eu-" in err and "standby r1)" in err, err
    assert "throttle lifted" in err, err
    assert _copied(fleet) == total and "rows copied and verified" in out


COPIED = "SELECT (SELECT count(*) FROM tasks WHERE tenant_id = 7) + (SELECT count(*) FROM comments WHERE tenant_id = 7)"


def _sampler(fleet: Fleet, target: str) -> LagSampler:
    """The standby's lag, with the copy's rows committed on `target` (two of the sample app's tables)."""

    def copied() -> int:
        with dsnlib.connect(fleet.dsn(target), autocommit=True) as conn:
            row = conn.execute(COPIED).fetchone()
        return int(row[0]) if row else 0

    return LagSampler(fleet.server.dsn(), "r1", copied)


def test_with_a_delayed_standby_the_limit_keeps_its_lag_down_and_the_copy_slows(
    replicated: tuple[Fleet, pgserver.LocalServer],
) -> None:
    fleet, standby = replicated
    _apply_delay(standby, "2s")
    paced = ("--batch-rows", "100", "--rate-limit", "600", "--json")  # ~5 s of copy unthrottled
    with _sampler(fleet, "eu-2") as unthrottled:
        back = fleet.run("move", "7", "--to", "eu-2", "--yes", "--no-replica-wait", *paced)
    assert back.exit_code == 0, back.output
    free = json.loads(back.stdout)["seconds"]
    assert fleet.run("cleanup", "7", "--stamp", "eu-1", "--yes").exit_code == 0
    with _sampler(fleet, "eu-1") as throttled:
        moved = fleet.run("move", "7", "--to", "eu-1", "--yes", "--no-replica-wait", *paced, "--max-replica-lag", "1")
    assert moved.exit_code == 0, moved.output
    held = json.loads(moved.stdout)["seconds"]
    # while copying: unthrottled, every write waits 2 s to be replayed and the copy writes on regardless;
    # throttled, no batch starts while the lag is past 1 s (read every CHECK_EVERY_S)
    assert max(lag for _, lag, _ in unthrottled.copying()) >= 1.9, unthrottled.samples
    assert max(throttled.lag_at_batches()) <= 1 + CHECK_EVERY_S + 0.1, throttled.samples
    assert len(throttled.lag_at_batches()) >= 5 and max(unthrottled.lag_at_batches()) >= 1.5
    assert held["throttled"] >= 2 and held["copy"] > free["copy"] + 1, (free, held)
    assert tenant_row_count(fleet.dsn("eu-1"), fleet.layout(), "7") == ROWS + 1  # the tenant's row too


def test_the_route_flips_only_once_the_targets_standby_has_replayed_the_copy(
    replicated: tuple[Fleet, pgserver.LocalServer],
) -> None:
    fleet, standby = replicated
    _apply_delay(standby, "1500ms")
    layout, database = fleet.layout(), conninfo_to_dict(fleet.dsn("eu-2"))["dbname"]

    def counts() -> dict[str, int]:
        standby_rows = tenant_row_count(standby.dsn(database), layout, "7")
        return {"standby": standby_rows, "primary": tenant_row_count(fleet.dsn("eu-2"), layout, "7")}

    with FlipWatch(fleet.catalog.url, "7", "eu-2", counts) as flip:
        moved = fleet.run("move", "7", "--to", "eu-2", "--yes", "--json")
        assert moved.exit_code == 0, moved.output
    assert flip.seen and flip.seen["standby"] == flip.seen["primary"] > 0, flip.seen
    seconds = json.loads(moved.stdout)["seconds"]
    assert seconds["standby_wait"] >= 1.0, seconds


def test_a_stopped_standby_stops_the_move_unflipped_naming_it(
    replicated: tuple[Fleet, pgserver.LocalServer],
) -> None:
    fleet, standby = replicated
    standby.stop()
    moved = fleet.run("move", "7", "--to", "eu-2", "--yes", "--replica-wait", "2")
    assert moved.exit_code == 1, moved.output
    line = moved.stderr.strip().splitlines()[-1]
    assert "the standbys of eu-2 did not replay the copy within 2 s: r1 (down)" in line, line
    assert "not flipped" in line, line
    assert fleet.catalog.route("7").stamp == "eu-1"
    standby.start()
    again = fleet.run("move", "7", "--to", "eu-2", "--yes")
    assert again.exit_code == 0, again.output
    assert fleet.catalog.route("7").stamp == "eu-2"


def test_the_copy_waits_while_a_cdc_slot_retains_more_wal_than_allowed(
    replicated: tuple[Fleet, pgserver.LocalServer],
) -> None:
    fleet, _ = replicated
    with dsnlib.connect(fleet.dsn("eu-1"), autocommit=True) as conn:  # a CDC consumer that stopped reading
        conn.execute("SELECT pg_create_logical_replication_slot('cdc', 'test_decoding')")
        conn.execute("CHECKPOINT")
        row = conn.execute(
            "SELECT pg_current_wal_lsn() - restart_lsn FROM pg_replication_slots WHERE slot_name = 'cdc'"
        ).fetchone()
    retained = int(row[0]) if row else 0
    # the copy's own WAL passes this within a few batches (3,000 rows write a few MB); the slot keeps it all
    limited = ("--batch-rows", "100", "--rate-limit", "400", "--max-slot-lag", str(retained + 500_000))
    proc = fleet.popen("move", "7", "--to", "eu-2", "--yes", *limited)
    try:
        wait_until(lambda: _copied(fleet) > 0, "the first batch", 30, proc)
        time.sleep(3)
        held = _copied(fleet)
        time.sleep(2)
        assert _copied(fleet) == held < tenant_row_count(fleet.dsn("eu-1"), fleet.layout(), "7")
        with dsnlib.connect(fleet.dsn("eu-1"), autocommit=True) as conn:  # the consumer catches up (or goes)
            conn.execute("SELECT pg_drop_replication_slot('cdc')")
        code, _, err = _finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
        with dsnlib.connect(fleet.dsn("eu-1"), autocommit=True) as conn:
            conn.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = 'cdc'")
    assert code == 0, err
    assert "throttled: slot lag" in err and "(eu-1, slot cdc)" in err, err


def test_throttle_set_during_a_copy_takes_effect_without_a_restart(
    replicated: tuple[Fleet, pgserver.LocalServer],
) -> None:
    fleet, standby = replicated
    _standby_sql(standby, "SELECT pg_wal_replay_pause()")
    proc = fleet.popen("move", "7", "--to", "eu-2", "--yes", "--batch-rows", "50", "--rate-limit", "200")
    try:
        wait_until(lambda: _copied(fleet) > 0, "the first batch", 30, proc)
        assert fleet.run("throttle", "set", "--max-replica-lag", "1").exit_code == 0
        time.sleep(4)  # the limits are re-read every 2 s; the lag is already past 1 s
        held = _copied(fleet)
        time.sleep(3)
        assert _copied(fleet) == held  # paused by the fleet's limit, set while it ran
        shown = fleet.run("throttle", "show", "--json")
        assert json.loads(shown.stdout)["max_replica_lag_s"] == 1
        assert fleet.run("throttle", "set", "--clear").exit_code == 0
        wait_until(lambda: _copied(fleet) > held, "the copy to go on once lifted", 15, proc)  # replay still paused
        _standby_sql(standby, "SELECT pg_wal_replay_resume()")
        code, _, err = _finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 0, err
    assert "throttled: replica lag" in err, err


def test_a_critical_load_stops_the_move_unfenced_and_it_resumes(
    replicated: tuple[Fleet, pgserver.LocalServer],
) -> None:
    fleet, _ = replicated
    sleeper = psycopg.connect(fleet.dsn("eu-1"), autocommit=True, application_name="app")
    busy = threading.Thread(target=lambda: _sleep(sleeper), daemon=True)
    busy.start()
    try:
        wait_until(lambda: _active(fleet) >= 1, "the application's session to be active", 10)
        stopped = fleet.run("move", "7", "--to", "eu-2", "--yes", "--critical-load", "1")
        assert stopped.exit_code == 1, stopped.output
        line = stopped.stderr.strip().splitlines()[-1]
        assert "stopped at critical load: 1 active sessions >= 1 (eu-1)" in line, line
        assert "nothing is fenced" in line and "migrator move --move" in line, line
    finally:
        sleeper.cancel_safe()
        busy.join(10)
        sleeper.close()
    assert fleet.catalog.route("7").stamp == "eu-1"
    with dsnlib.connect(fleet.dsn("eu-1"), autocommit=True) as conn:  # the tenant still writes on its source
        conn.execute("UPDATE tenants SET name = name || '!' WHERE id = 7")
    move_id = fleet.catalog.moves("7")[0].id
    wait_until(lambda: _active(fleet) == 0, "the application's session to end", 10)
    resumed = fleet.run("move", "--move", str(move_id), "--yes")
    assert resumed.exit_code == 0, resumed.output
    assert fleet.catalog.route("7").stamp == "eu-2"


def _sleep(conn: psycopg.Connection[Any]) -> None:
    """An application session busy for a while (cancelled by the test)."""
    with contextlib.suppress(psycopg.errors.QueryCanceled):
        conn.execute("SELECT pg_sleep(60)")


def _active(fleet: Fleet) -> int:
    with dsnlib.connect(fleet.dsn("eu-1"), autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND state = 'active'"
            " AND pid <> pg_backend_pid() AND application_name <> 'migrator'"
        ).fetchone()
    return int(row[0]) if row else 0


def test_a_limit_this_role_cannot_see_is_refused_before_anything_changes(
    shaped: ShapedFactory,  # noqa: F811
    tmp_path: Path,
) -> None:
    fleet = shaped(("CREATE TABLE orders (id bigint PRIMARY KEY, tenant_id bigint NOT NULL REFERENCES tenants)",))
    fleet.execute("eu-1", "INSERT INTO tenants VALUES (42, 'forty-two')")
    fleet.catalog.set_route("42", "eu-1")
    before = fleet.snapshot()
    for flag in (("--max-replica-lag", "5"), ("--max-active-sessions", "10"), ("--critical-load", "50")):
        refused = fleet.run("move", "42", "--to", "eu-2", "--yes", *flag)
        assert refused.exit_code == 2, refused.output
        line = refused.stderr.strip()
        assert len(line.splitlines()) == 1 and "GRANT pg_monitor (or pg_read_all_stats)" in line, line
        assert fleet.snapshot() == before
    plan = tmp_path / "drain.yaml"
    assert fleet.run("plan", "drain", "eu-1", "--to", "eu-2", "-o", str(plan)).exit_code == 0
    queued = fleet.run("apply", str(plan), "--yes", "--queue", "default", "--max-replica-lag", "5")
    assert queued.exit_code == 2 and "throttled by the workers that run them" in queued.stderr, queued.output
    applied = fleet.run("apply", str(plan), "--yes", "--json", "--max-replica-lag", "5")  # each move's flag
    assert applied.exit_code == 1, applied.output
    assert "GRANT pg_monitor" in json.dumps(json.loads(applied.stdout)["results"]), applied.stdout
    assert fleet.catalog.route("42").stamp == "eu-1"
    assert fleet.run("move", "42", "--to", "eu-2", "--yes", "--max-slot-lag", "1000000").exit_code == 0


def test_the_configs_throttle_section_is_every_moves_default_and_is_validated(
    shaped: ShapedFactory,  # noqa: F811
) -> None:
    fleet = shaped(("CREATE TABLE orders (id bigint PRIMARY KEY, tenant_id bigint NOT NULL REFERENCES tenants)",))
    fleet.execute("eu-1", "INSERT INTO tenants VALUES (42, 'forty-two')")
    fleet.catalog.set_route("42", "eu-1")
    text = fleet.config_path.read_text()
    for wrong, said in (("max_replica_lag = -1", "positive number of seconds, got -1"), ("max_lag = 1", "unknown key")):
        fleet.config_path.write_text(f"{text}\n[throttle]\n{wrong}\n")
        refused = fleet.run("route", "list")
        assert refused.exit_code == 2 and said in refused.stderr and "[throttle]" in refused.stderr, refused.stderr
    fleet.config_path.write_text(f"{text}\n[throttle]\nmax_replica_lag = 5\n")
    before = fleet.snapshot()
    refused = fleet.run("move", "42", "--to", "eu-2", "--yes")  # no flag: the config's limit applies
    assert refused.exit_code == 2 and "GRANT pg_monitor" in refused.stderr, refused.output
    assert fleet.snapshot() == before
