"""Ctrl-C (SIGINT) or SIGTERM to a running `migrator move`: the move stops at its next safe point and
the command ends with one line saying where it stopped, what is left in place and how to go on, with
the shell's exit status for the signal. The signal goes to the whole process group, as a terminal's
Ctrl-C does."""

from __future__ import annotations

import os
import signal

import pytest
from conftest import Fleet, copied_on, tenant_row_count, wait_until

ROWS = 60_000


@pytest.mark.parametrize(
    ("signum", "mode", "exit_code", "left"),
    [
        (signal.SIGINT, "--online", 130, "left in place: the capture trigger on eu-1 (writes go on and are recorded), "
         "no fence;"),
        (signal.SIGTERM, "--offline", 143, "left in place: the fence on eu-1 (writes of tenant 7 are refused);"),
    ],
    ids=["ctrl-c-online", "sigterm-offline"],
)  # fmt: skip
def test_a_signal_stops_a_move_at_a_safe_point_with_one_line_saying_how_to_resume_or_abort(
    fleet: Fleet, signum: signal.Signals, mode: str, exit_code: int, left: str
) -> None:
    fleet.seed("eu-1", 7, ROWS)
    flags = [mode] if mode == "--offline" else []
    args = ("move", "7", "--to", "eu-2", *flags, "--batch-rows", "500", "--rate-limit", "15000", "--yes")
    proc = fleet.popen(*args, start_new_session=True)  # its own process group, as a terminal's job
    wait_until(lambda: sum(copied_on(fleet).values()) > 0, "the copy to start", proc=proc)
    os.killpg(proc.pid, signum)
    out, err = proc.communicate(timeout=60)

    assert proc.returncode == exit_code, err
    move = fleet.catalog.open_move("7")
    assert move is not None and move.phase == "copying"
    last = err.strip().splitlines()[-1]
    assert last == (
        f"error: move {move.id} of tenant 7 (eu-1 -> eu-2) stopped by {signum.name} at phase copying; {left} "
        f"resume: `migrator move --move {move.id}`, abort: `migrator move abort {move.id}`"
    ), err
    assert "Traceback" not in err and "Aborted" not in err
    assert fleet.catalog.route("7").stamp == "eu-1"

    resumed = fleet.run("move", "--move", str(move.id), "--yes")  # the command the line gave
    assert resumed.exit_code == 0, resumed.output
    assert fleet.catalog.route("7").stamp == "eu-2"


def test_ctrl_c_stops_a_cleanup_between_batches_and_the_same_command_finishes_it(fleet: Fleet) -> None:
    total = fleet.seed("eu-1", 7, ROWS)
    assert fleet.run("move", "7", "--to", "eu-2", "--yes").exit_code == 0
    layout = fleet.layout()
    proc = fleet.popen("cleanup", "7", "--stamp", "eu-1", "--batch-rows", "50", "--yes", start_new_session=True)
    wait_until(lambda: 0 < tenant_row_count(fleet.dsn("eu-1"), layout, "7") < total, "deletes to start", proc=proc)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=60)

    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == (
        "error: cleanup of tenant 7 on eu-1 stopped by SIGINT between two delete batches; left in place: the rows "
        "not yet deleted and the fence on eu-1; resume: `migrator cleanup 7 --stamp eu-1`"
    ), err
    assert tenant_row_count(fleet.dsn("eu-1"), layout, "7") > 0

    again = fleet.run("cleanup", "7", "--stamp", "eu-1", "--yes")  # the command the line gave
    assert again.exit_code == 0, again.output
    assert tenant_row_count(fleet.dsn("eu-1"), layout, "7") == 0
