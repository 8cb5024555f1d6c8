"""Progress is what the target committed: `move status` after a kill, a resumed move's totals, and rows
the tenant wrote during the copy shown as such (never past 100%)."""

from __future__ import annotations

import json
import re
import signal
import time

import pytest
from conftest import Fleet, copied_on

from migrator.cli import render
from migrator.db import dsn as dsnlib
from migrator.move import MoveOptions, move_tenants

ROWS = 80_000  # tasks: 46,400 rows, copied in two key ranges by --jobs 2


def test_status_after_kill_shows_committed_rows_and_the_resume_counts_them(fleet: Fleet) -> None:
    total = fleet.seed("eu-1", 7, ROWS)
    args = ("move", "7", "--to", "eu-2", "--batch-rows", "500", "--jobs", "2", "--rate-limit", "15000", "--yes")
    proc = fleet.popen(*args, "--json")
    deadline = time.monotonic() + 60
    while copied_on(fleet).get("tasks", 0) < 5_000:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "copy did not progress"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    committed = copied_on(fleet)
    move = fleet.catalog.open_move("7")
    assert move is not None and move.phase == "copying"

    status = json.loads(fleet.run("move", "status", str(move.id), "--json").stdout)["copy"]
    assert status["source"] == "target"
    tables = {t["table"]: t for t in status["tables"]}
    assert {name: t["rows"] for name, t in tables.items() if t["rows"]} == committed
    for t in tables.values():
        assert t["rows"] == sum(r["rows"] for r in t["ranges"])  # each key range as committed
    assert any(len(t["ranges"]) > 1 for t in tables.values())  # the large tables copied in ranges
    text = fleet.run("move", "status", str(move.id)).stdout
    assert f"{sum(committed.values()):,}/{total:,} rows (" in text and "committed on eu-2" in text

    resumed = fleet.popen(*args[:-3], "--yes")  # piped: plain progress lines; no rate limit
    out, err = resumed.communicate(timeout=180)
    assert resumed.returncode == 0, err
    assert f"total: {total:,}/{total:,} rows (100%)" in err  # counted from what was already copied
    text = fleet.run("move", "status", str(move.id)).stdout
    assert f"{total:,}/{total:,} rows (100%) copied, as the catalog recorded" in text


class WritesDuringCopy(render.Bars):
    """The CLI's progress, while the tenant writes 32 comments once the copy of comments has begun."""

    def __init__(self, dsn: str) -> None:
        super().__init__()
        self.dsn, self.wrote = dsn, False

    def advance(self, part: str, count: int) -> None:
        super().advance(part, count)
        if part.endswith("comments") and not self.wrote:
            self.wrote = True
            with dsnlib.connect(self.dsn, autocommit=True) as conn:
                conn.execute(
                    "INSERT INTO comments (tenant_id, id, task_id, body)"
                    " SELECT 7, (SELECT max(id) FROM comments WHERE tenant_id = 7) + g, t.id, 'later'"
                    " FROM generate_series(1, 32) g,"
                    " (SELECT id FROM tasks WHERE tenant_id = 7 ORDER BY id LIMIT 1) t"
                )


def test_rows_written_during_the_copy_are_shown_as_such(fleet: Fleet, capfd: pytest.CaptureFixture[str]) -> None:
    total = fleet.seed("eu-1", 7, 3_000)
    with dsnlib.connect(fleet.dsn("eu-1"), autocommit=True) as conn:
        comments = conn.execute("SELECT count(*) FROM comments WHERE tenant_id = 7").fetchone()[0]
    assert comments > 100
    bars = WritesDuringCopy(fleet.dsn("eu-1"))
    try:
        outcome = move_tenants(fleet.ctx, ("7",), "eu-2", MoveOptions(batch_rows=100, jobs=1), bars)
    finally:
        bars.close()
    assert bars.wrote and outcome.move is not None
    err = capfd.readouterr().err
    assert f"comments: {comments + 32:,} rows: {comments:,} at start + 32 written since" in err
    assert f"total: {total + 32:,} rows: {total:,} at start + 32 written since" in err
    assert max(int(p) for p in re.findall(r"\((\d+)%\)", err)) == 100  # never past 100%

    status = fleet.run("move", "status", str(outcome.move.id))
    assert f"{total + 32:,} rows: {total:,} at start + 32 written since" in status.stdout
    row = next(line for line in status.stdout.splitlines() if line.split()[:1] == ["comments"])
    assert row.split()[1:4] == [f"{comments + 32:,}", f"{comments:,}", "32"]
