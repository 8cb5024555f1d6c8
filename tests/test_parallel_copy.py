"""Parallel copy streams (--jobs): key ranges of a large table and independent tables copy at once,
each range resumable to the row; a resume continues the same ranges whatever --jobs it is given."""

from __future__ import annotations

import json
import signal
import time
from typing import Any

import psycopg
import pytest
from conftest import Fleet, tenant_digest
from psycopg import sql

from migrator.db import dsn as dsnlib
from migrator.move import copy, fence, keys
from migrator.stamps.access import ThreadSessions
from migrator.stamps.discovery import Table, key_after, key_upto, tenant_filter


def _parts(fleet: Fleet, table: str) -> list[tuple[int, int, bool]]:
    """(part, rows copied, done) of the copy of `table` on eu-2, as committed."""
    with dsnlib.connect(fleet.dsn("eu-2"), autocommit=True) as conn:
        if not conn.execute("SELECT to_regclass('_migrator.copy_progress') IS NOT NULL").fetchone()[0]:
            return []
        return conn.execute(
            "SELECT part, rows_copied, done FROM _migrator.copy_progress WHERE table_name = %s ORDER BY part",
            (table,),
        ).fetchall()


def _row_versions(fleet: Fleet, table: str) -> set[tuple[str, str]]:
    """(row, xmin) of tenant 7's rows of `table` on eu-2: a row copied again would get a new xmin."""
    with dsnlib.connect(fleet.dsn("eu-2"), autocommit=True) as conn:
        query = sql.SQL("SELECT t::text, t.xmin::text FROM {} t WHERE tenant_id = 7").format(sql.Identifier(table))
        return set(conn.execute(query).fetchall())


def test_kill_during_a_parallel_copy_resumes_every_range_exactly(busy: Fleet) -> None:
    layout = busy.layout()
    source = tenant_digest(busy.dsn("eu-1"), layout, "7")
    args = ("move", "7", "--to", "eu-2", "--batch-rows", "2000", "--rate-limit", "40000", "--yes")
    proc = busy.popen(*args, "--jobs", "4")
    deadline = time.monotonic() + 120
    while sum(1 for _, rows, done in _parts(busy, "tasks") if rows and not done) < 2:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no two ranges of tasks were copying at once"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    parts = _parts(busy, "tasks")
    assert len(parts) == 4  # tasks (about 124,000 rows) was cut into one range per stream
    assert sum(1 for _, rows, done in parts if rows and not done) >= 2
    kept = _row_versions(busy, "tasks")
    assert len(kept) == sum(rows for _, rows, _ in parts)  # exactly the committed batches are on the target

    result = busy.run(*args, "--jobs", "2", "--json")  # fewer streams: the four ranges continue
    assert result.exit_code == 0, result.output + result.stderr
    out = json.loads(result.stdout)
    assert out["resumed"] is True
    assert out["move"]["rows_copied"] == sum(n for n, _ in source.values())
    assert kept <= _row_versions(busy, "tasks")  # rows copied before the kill were kept, not copied again
    assert tenant_digest(busy.dsn("eu-2"), layout, "7") == source
    assert busy.catalog.route("7").stamp == "eu-2"


def _range_sizes(src: psycopg.Connection[Any], tasks: Table, parts: list[copy.Part]) -> list[int]:
    sizes = []
    for part in parts:
        where = sql.SQL("{} AND {} AND {}").format(
            tenant_filter(tasks, ("7",)), key_after(tasks, part.after), key_upto(tasks, part.upto)
        )
        sizes.append(src.execute(sql.SQL("SELECT count(*) FROM tasks WHERE {}").format(where)).fetchone()[0])
    return sizes


@pytest.mark.parametrize("sampled", [True, False], ids=["sampled-pages", "whole-table"])
def test_a_large_table_is_cut_into_ranges_that_partition_its_keys(
    busy: Fleet, monkeypatch: pytest.MonkeyPatch, sampled: bool
) -> None:
    """Bounds come from a sample of the table's pages (keys.SAMPLE_PAGES): ranges are about even
    when the sample is part of the table, even to the row when it is all of it."""
    if not sampled:
        monkeypatch.setattr(keys, "SAMPLE_PAGES", 10**9)
    tasks = next(t for t in busy.layout().tables if t.name == "tasks")
    with dsnlib.connect(busy.dsn("eu-2")) as tgt, tgt.transaction():
        fence.ensure_schema(tgt)
    with (
        dsnlib.connect(busy.dsn("eu-1"), autocommit=True) as src,
        ThreadSessions(busy.dsn("eu-1"), "eu-1") as sources,
        ThreadSessions(busy.dsn("eu-2"), "eu-2") as targets,
    ):
        total = src.execute("SELECT count(*) FROM tasks WHERE tenant_id = 7").fetchone()[0]
        pages = src.execute("SELECT pg_relation_size('tasks') / 8192").fetchone()[0]
        assert (pages > keys.SAMPLE_PAGES) is sampled  # the fixture's table is larger than the sample
        parts = copy.plan_parts(sources, targets, tasks, ("7",), 99, 3, total)
        assert [p.index for p in parts] == [0, 1, 2]
        assert parts[0].after is None and parts[-1].upto is None
        assert all(parts[i].upto == parts[i + 1].after for i in range(2))  # contiguous, no gap, no overlap
        sizes = _range_sizes(src, tasks, parts)
        # Planned once: a second call (a resume, with any --jobs) returns the saved ranges.
        assert copy.plan_parts(sources, targets, tasks, ("7",), 99, 4, total) == parts
    assert sum(sizes) == total
    if sampled:
        assert max(sizes) - min(sizes) <= total * 0.15, sizes  # about even
    else:
        assert max(sizes) - min(sizes) <= 1, sizes  # even to the row


def test_copy_cursors_of_an_earlier_migrator_become_the_first_range(fleet: Fleet) -> None:
    """A stamp whose `_migrator.copy_progress` has one cursor per table (before ranges) keeps its cursors."""
    with dsnlib.connect(fleet.dsn("eu-2"), autocommit=True) as conn:
        conn.execute("CREATE SCHEMA _migrator")
        conn.execute(
            "CREATE TABLE _migrator.copy_progress (move_id bigint NOT NULL, table_name text NOT NULL,"
            " cursor text[], rows_copied bigint NOT NULL DEFAULT 0, done boolean NOT NULL DEFAULT false,"
            " PRIMARY KEY (move_id, table_name))"
        )
        conn.execute("INSERT INTO _migrator.copy_progress VALUES (5, 'tasks', '{41}', 40, false)")
    with dsnlib.connect(fleet.dsn("eu-2")) as conn, conn.transaction():
        fence.ensure_schema(conn)
    tasks = next(t for t in fleet.layout().tables if t.name == "tasks")
    with dsnlib.connect(fleet.dsn("eu-2"), autocommit=True) as conn:
        assert copy.read_parts(conn, 5, tasks) == [copy.Part(0, ["41"], None, 40, False)]
        key = conn.execute(
            "SELECT array_agg(a.attname ORDER BY k.n) FROM pg_index i CROSS JOIN unnest(i.indkey) WITH ORDINALITY"
            " k(attnum, n) JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum"
            " WHERE i.indrelid = '_migrator.copy_progress'::regclass AND i.indisprimary"
        ).fetchone()[0]
    assert key == ["move_id", "table_name", "part"]
