"""kill -9 in the middle of a copy, then the same command again: it resumes, no row lost or doubled."""

from __future__ import annotations

import json
import signal
import time

from conftest import Fleet, copied_on, tenant_digest
from psycopg import sql

from migrator.db import dsn as dsnlib

ROWS = 60_000


def _row_versions(fleet: Fleet) -> set[tuple[str, str, str]]:
    """(table, key, xmin) of every tenant row on the target: a re-copied row would get a new xmin."""
    out = set()
    with dsnlib.connect(fleet.dsn("eu-2"), autocommit=True) as conn:
        for table in ("tenants", "users", "projects", "tasks", "comments", "attachments"):
            key = "id" if table == "tenants" else "tenant_id"
            query = sql.SQL("SELECT t::text, t.xmin::text FROM {} t WHERE {} = 7").format(
                sql.Identifier(table), sql.Identifier(key)
            )
            for row, xmin in conn.execute(query):
                out.add((table, row, xmin))
    return out


def test_resume_after_kill_does_not_duplicate_or_restart(fleet: Fleet) -> None:
    total = fleet.seed("eu-1", 7, ROWS)
    layout = fleet.layout()
    source = tenant_digest(fleet.dsn("eu-1"), layout, "7")
    args = ("move", "7", "--to", "eu-2", "--batch-rows", "500", "--rate-limit", "15000", "--yes", "--json")
    proc = fleet.popen(*args)
    deadline = time.monotonic() + 60
    while sum(copied_on(fleet).values()) < total // 4:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "copy did not progress"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    interrupted = fleet.catalog.open_move("7")
    assert interrupted is not None and interrupted.phase == "copying"
    partial = sum(copied_on(fleet).values())
    assert 0 < partial < total
    before_resume = _row_versions(fleet)
    assert len(before_resume) == partial
    assert fleet.catalog.route("7").stamp == "eu-1"

    result = fleet.run(*args)  # the same command again
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["resumed"] is True and out["move"]["id"] == interrupted.id
    assert out["move"]["rows_copied"] == total
    assert before_resume <= _row_versions(fleet)  # rows copied before the kill were kept, not re-copied
    assert tenant_digest(fleet.dsn("eu-2"), layout, "7") == source
    assert fleet.catalog.route("7").stamp == "eu-2"
