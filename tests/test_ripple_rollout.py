"""Rollouts that ripple, on real PostgreSQL: --waves sizes, --bake between waves, --check gating the next
wave (and seeing the wave's stamps), a Ctrl-C during a bake; locally and on `migrator worker` processes.

Every stamp starts at the sample application's head and the rollout goes to one more revision on top
of it (`history_plus`): cheap, so the waves' timing is the bake's, not the migrations'.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from conftest import REPO, Fleet, RunsCli, wait_until
from test_schema_rollout import HEAD, context_with, history_plus, revisions
from test_workers import workers

from migrator.cli import cli
from migrator.context import Context
from migrator.db import dsn as dsnlib
from migrator.local import provision
from migrator.rollout.ripple import Waves
from migrator.rollout.runner import OK, SKIPPED, RolloutOptions, upgrade_fleet

TARGET = "0007_ripple"
EXTRA = ("ap-2", "ap-3", "ap-4")  # with fleet4's: seven stamps, a canary and six after it


@dataclass
class Rippling(RunsCli):
    """The fleet under a config whose stamp history has TARGET on top of the sample application's head."""

    fleet: Fleet
    config_path: Path
    root: Path  # where the checks write what they saw

    def cli(self, *args: str, answer: str | None = None) -> Result:
        return CliRunner().invoke(cli, ["--config", str(self.config_path), *args], input=answer)


@pytest.fixture
def fleet7(fleet4: Fleet, templates: dict[str, str], tmp_path: Path) -> Rippling:
    """fleet4 plus three stamps at head, under a config that knows TARGET."""
    fleet = fleet4
    for name in EXTRA:
        db = fleet.databases[0].removesuffix("_catalog") + "_" + name.replace("-", "_")
        fleet.databases.append(db)
        fleet.stamps[name] = provision.create_database(fleet.server, db, template=templates["stamp"])
        fleet.catalog.add_stamp(name, fleet.stamps[name], region="ap")
    env = history_plus(tmp_path, TARGET, "CREATE TABLE rippled (at timestamptz DEFAULT now())")
    _, config = context_with(fleet, env, tmp_path)
    return Rippling(fleet, config, tmp_path)


def recording_check(root: Path, exit_code: int = 0) -> str:
    """A --check that appends what it saw of its wave to root/check.log, says something, and exits."""
    log = shlex.quote(str(root / "check.log"))
    return (
        f'echo "$MIGRATOR_WAVE|$MIGRATOR_WAVE_NAME|$MIGRATOR_WAVE_STAMPS|$MIGRATOR_TARGET_REVISION" >> {log}; '
        f'echo "checked $MIGRATOR_WAVE_NAME"; echo "error budget burnt" >&2; exit {exit_code}'
    )


def checked(root: Path) -> list[list[str]]:
    path = root / "check.log"
    return [line.split("|") for line in path.read_text().splitlines()] if path.exists() else []


def rows(fleet: Fleet, run_id: str | None = None) -> list[dict[str, Any]]:
    """The schema_runs rows (of one run), oldest first."""
    with dsnlib.connect(fleet.catalog.url, autocommit=True) as conn:
        found = conn.execute(
            "SELECT stamp, result, wave, error, started_at, finished_at, run_id::text FROM schema_runs"
            " WHERE %(run)s::text IS NULL OR run_id::text = %(run)s ORDER BY started_at, id",
            {"run": run_id},
        ).fetchall()
    keys = ("stamp", "result", "wave", "error", "started_at", "finished_at", "run_id")
    return [dict(zip(keys, row, strict=True)) for row in found]


def waves_of(found: list[dict[str, Any]]) -> dict[int, list[str]]:
    waves: dict[int, list[str]] = {}
    for row in found:
        if row["wave"] is not None:
            waves.setdefault(row["wave"], []).append(row["stamp"])
    return {number: sorted(names) for number, names in sorted(waves.items())}


def assert_baked(found: list[dict[str, Any]], bake_s: float) -> None:
    """Each wave started at least `bake_s` after the one before it ended."""
    spans: dict[int, tuple[Any, Any]] = {}
    for row in found:
        if row["wave"] is None:
            continue
        start, end = spans.get(row["wave"], (row["started_at"], row["finished_at"]))
        spans[row["wave"]] = (min(start, row["started_at"]), max(end, row["finished_at"]))
    for number in sorted(spans)[1:]:
        gap = spans[number][0] - spans[number - 1][1]
        assert gap >= timedelta(seconds=bake_s), f"wave {number} started {gap} after wave {number - 1} ended"


# Stamps in rollout order: fewest tenants first, then by name; no stamp holds a tenant here.
ORDER = ["ap-1", "ap-2", "ap-3", "ap-4", "eu-1", "eu-2", "us-1"]


def test_waves_are_cumulative_sizes_after_the_canary_and_each_is_baked_and_checked_with_its_stamps(
    fleet7: Rippling,
) -> None:
    fleet, root = fleet7.fleet, fleet7.root
    check = recording_check(root)
    args = ("schema", "upgrade", "--waves", "1,50%,100%", "--bake", "1s", "--check", check, "--parallel", "2")

    dry = fleet7.cli(*args, "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert "-- canary: ap-1\n-- wave 1: ap-2\n-- wave 2: ap-3, ap-4\n-- wave 3: eu-1, eu-2, us-1\n" in dry.stdout
    assert f"-- between two waves: bake 1s, then check `{check}`" in dry.stdout
    assert set(revisions(fleet).values()) == {HEAD} and not checked(root)

    result = fleet7.cli(*args, answer="y\n")
    assert result.exit_code == 0, result.output
    prompt = result.stderr.split("Upgrade 7 stamp(s)")[0]
    assert "canary ap-1, then 3 wave(s)" in prompt
    assert "  wave 1: ap-2\n  wave 2: ap-3, ap-4\n  wave 3: eu-1, eu-2, us-1\n" in prompt
    assert set(revisions(fleet).values()) == {TARGET}

    dry_run = {r["stamp"]: r["wave"] for r in rows(fleet) if r["result"] == "dry-run"}
    found = [r for r in rows(fleet) if r["result"] != "dry-run"]
    assert dry_run == {r["stamp"]: r["wave"] for r in found}  # the dry run showed the waves that ran
    assert waves_of(found) == {0: ["ap-1"], 1: ["ap-2"], 2: ["ap-3", "ap-4"], 3: ["eu-1", "eu-2", "us-1"]}
    assert all(r["result"] == OK for r in found)
    assert_baked(found, 1.0)
    # The check ran after the canary and each wave but the last, and saw that wave's stamps.
    assert checked(root) == [
        ["0", "canary", "ap-1", TARGET],
        ["1", "wave 1", "ap-2", TARGET],
        ["2", "wave 2", "ap-3,ap-4", TARGET],
    ]
    log = result.stderr
    assert "baking before wave 1: 1s left" in log and "baking before wave 3: 1s left" in log
    assert "check | checked canary" in log and "check | error budget burnt" in log
    assert "check after wave 2 passed" in log and "check after wave 3" not in log


def test_a_failing_check_after_the_canary_stops_the_rollout_and_leaves_every_other_stamp_untouched(
    fleet7: Rippling,
) -> None:
    fleet, root = fleet7.fleet, fleet7.root
    check = recording_check(root, exit_code=3)
    result = fleet7.cli("schema", "upgrade", "--yes", "--check", check, "--waves", "50%,100%")

    assert result.exit_code == 1, result.output
    assert revisions(fleet) == {name: TARGET if name == "ap-1" else HEAD for name in ORDER}
    assert checked(root) == [["0", "canary", "ap-1", TARGET]]
    found = {r["stamp"]: r for r in rows(fleet)}
    assert (found["ap-1"]["result"], found["ap-1"]["wave"]) == (OK, 0)
    for name in ORDER[1:]:
        assert found[name]["result"] == SKIPPED and found[name]["wave"] is None
        assert found[name]["error"] == (
            "not tried: stopped after check failed on the canary (exit 3); "
            "its last output: checked canary | error budget burnt"
        )
        assert found[name]["started_at"] >= found["ap-1"]["finished_at"]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: schema upgrade stopped after check failed on the canary (exit 3) after "), line
    assert "its last output: checked canary | error budget burnt; 6 stamp(s) not tried (" in line
    assert line.endswith(f"resume: `migrator schema upgrade head --waves 50%,100% --check {shlex.quote(check)}`")

    # Healthy again: the same command goes on from where it stopped (ap-1 is done; a new canary leads).
    again = fleet7.cli("schema", "upgrade", "--yes", "--check", recording_check(root), "--waves", "50%,100%")
    assert again.exit_code == 0, again.output
    assert set(revisions(fleet).values()) == {TARGET}
    assert checked(root)[1:] == [["0", "canary", "ap-2", TARGET], ["1", "wave 1", "ap-3,ap-4,eu-1", TARGET]]


def test_ctrl_c_during_a_bake_stops_before_the_next_wave_at_once_and_says_how_to_resume(fleet7: Rippling) -> None:
    fleet = fleet7.fleet
    args = ["schema", "upgrade", "--yes", "--bake", "5m", "--waves", "100%"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "migrator", "--config", str(fleet7.config_path), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, start_new_session=True,
    )  # fmt: skip
    wait_until(lambda: any(r["result"] == OK for r in rows(fleet)), "the canary's step", proc=proc)
    time.sleep(0.5)  # into the bake
    asked = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert time.monotonic() - asked < 5  # the bake does not run out first
    assert proc.returncode == 130, err
    assert "baking before wave 1: 5m left" in err
    assert err.strip().splitlines()[-1] == (
        "error: schema upgrade stopped by SIGINT at a safe point before wave 1: 1 stamp(s) ran their step, 6 not "
        "tried (ap-2, ap-3, ap-4, eu-1, eu-2, us-1); left in place: no lock and no half-applied revision (each "
        "started step ran to its end); resume: `migrator schema upgrade head --waves 100% --bake 5m`"
    ), err
    assert revisions(fleet) == {name: TARGET if name == "ap-1" else HEAD for name in ORDER}


def test_ctrl_c_during_a_check_ends_the_check_and_stops_before_the_next_wave(fleet7: Rippling) -> None:
    fleet, started = fleet7.fleet, fleet7.root / "check-started"
    check = f"touch {shlex.quote(str(started))}; sleep 313"
    proc = subprocess.Popen(
        [sys.executable, "-m", "migrator", "--config", str(fleet7.config_path), "schema", "upgrade", "--yes",
         "--check", check],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, start_new_session=True,
    )  # fmt: skip
    wait_until(started.exists, "the check after the canary", proc=proc)
    os.killpg(proc.pid, signal.SIGINT)  # the check runs in a session of its own: migrator ends it
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "at a safe point before wave 1: 1 stamp(s) ran their step, 6 not tried" in err.strip().splitlines()[-1]
    assert revisions(fleet) == {name: TARGET if name == "ap-1" else HEAD for name in ORDER}
    survivors = subprocess.run(["pgrep", "-f", "sleep 313"], capture_output=True, text=True).stdout.split()
    assert not survivors, f"the check's sleep outlived the rollout: {survivors}"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--waves", "1,50%"), "the last wave must be 100%"),
        (("--waves", "10%,5%,100%"), "the percents must grow"),
        (("--waves", "0,100%"), "'0' must be at least 1"),
        (("--waves", "one,100%"), "'one' is neither a count of stamps (5) nor a percent (25%)"),
        (("--bake", "5 minutes"), "expected a duration such as 30s, 5m or 1h30m, got '5 minutes'"),
    ],
)
def test_a_bad_wave_spec_or_bake_is_refused_in_one_line_before_anything_runs(
    fleet7: Rippling, flags: tuple[str, ...], message: str
) -> None:
    for command in (("schema", "upgrade"), ("schema", "downgrade", HEAD), ("schema", "upgrade", "--queue")):
        result = fleet7.cli(*command, "--yes", *flags)
        assert result.exit_code == 2, result.output
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert rows(fleet7.fleet) == [] and set(revisions(fleet7.fleet).values()) == {HEAD}


def test_the_engine_splits_waves_in_the_plan_and_gates_a_downgrade_the_same_way(fleet7: Rippling) -> None:
    fleet, root = fleet7.fleet, fleet7.root
    ctx = Context.load(fleet7.config_path)
    options = RolloutOptions(waves=Waves.parse("2,3,100%"), parallel=1)
    rollout = upgrade_fleet(ctx, options)
    assert not rollout.failed and rollout.stopped is None
    assert {o.stamp: o.wave for o in rollout.outcomes} == {
        "ap-1": 0, "ap-2": 1, "ap-3": 1, "ap-4": 2, "eu-1": 3, "eu-2": 3, "us-1": 3,
    }  # fmt: skip

    down = fleet7.cli("schema", "downgrade", HEAD, "--yes", "--waves", "3,100%", "--check", recording_check(root))
    assert down.exit_code == 0, down.output
    assert set(revisions(fleet).values()) == {HEAD}
    assert checked(root) == [["0", "canary", "ap-1", HEAD], ["1", "wave 1", "ap-2,ap-3,ap-4", HEAD]]


# -- on workers ------------------------------------------------------------------------------------------


def test_a_queued_rollout_honours_waves_bake_and_check_on_workers(fleet7: Rippling) -> None:
    fleet, root = fleet7.fleet, fleet7.root
    check = recording_check(root)
    args = ("schema", "upgrade", "--queue", "--yes", "--waves", "1,50%,100%", "--bake", "1s", "--check", check)
    with workers(fleet7, 2):
        result = fleet7.run(*args, "--wait", "--json")
    assert result.exit_code == 0, result.output + result.stderr
    assert "then 3 wave(s) of 1, 2, 3 stamp(s); between waves: bake 1s, then check" in result.stderr
    assert "released 1 stamp(s), the next wave: ap-2\n" in result.stderr  # --wait follows the waves
    assert "released 3 stamp(s), the next wave: eu-1, eu-2, us-1\n" in result.stderr
    run_id = json.loads(result.stdout)["run_id"]
    assert set(revisions(fleet).values()) == {TARGET}
    found = rows(fleet, run_id)
    assert sorted((r["stamp"], r["result"]) for r in found) == [(name, OK) for name in ORDER]  # each once
    assert waves_of(found) == {0: ["ap-1"], 1: ["ap-2"], 2: ["ap-3", "ap-4"], 3: ["eu-1", "eu-2", "us-1"]}
    assert_baked(found, 1.0)
    assert checked(root) == [
        ["0", "canary", "ap-1", TARGET],
        ["1", "wave 1", "ap-2", TARGET],
        ["2", "wave 2", "ap-3,ap-4", TARGET],
    ]


def test_a_queued_rollout_whose_check_fails_after_the_canary_leaves_the_others_untouched(fleet7: Rippling) -> None:
    fleet, root = fleet7.fleet, fleet7.root
    check = recording_check(root, exit_code=4)
    with workers(fleet7, 2):
        result = fleet7.run(
            "schema", "upgrade", "--queue", "--yes", "--bake", "3s", "--check", check, "--wait", "--json"
        )
    assert result.exit_code == 1, result.output + result.stderr
    assert "before the next wave, baking: " in result.stderr  # --wait says the bake as it goes
    data = json.loads(result.stdout)
    assert revisions(fleet) == {name: TARGET if name == "ap-1" else HEAD for name in ORDER}
    assert checked(root) == [["0", "canary", "ap-1", TARGET]]
    stamps = {s["stamp"]: s for s in data["stamps"]}
    assert stamps["ap-1"]["result"] == OK
    for name in ORDER[1:]:
        assert stamps[name]["result"] == SKIPPED
        assert stamps[name]["error"].startswith("not tried: stopped after check failed on the canary (exit 4)")
    line = result.stderr.strip().splitlines()[-1]
    assert "stopped after check failed on the canary (exit 4); its last output: checked canary" in line
    assert "6 stamp(s) not tried" in line and line.endswith(
        f"resume: `migrator schema upgrade head --bake 3s --check {shlex.quote(check)} --queue migrator`"
    )
