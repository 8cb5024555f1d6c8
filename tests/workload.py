"""A tenant's application, for online-move tests: writes through the routing catalog as fast as it can.

`rate` (writes/s) paces it instead, for `scripts/bench online`, which also reads `longest_pause_s`:
the longest wait between two acknowledged writes, i.e. the freeze as the application saw it.

It inserts, updates (including primary-key changes) and deletes the tenant's tasks, one
autocommit transaction each, and records every write the database acknowledged, with the stamp
that took it. On the fence's SQLSTATE it re-reads the route and retries, like a real application.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import psycopg

from migrator.db import dsn as dsnlib
from migrator.move.fence import FENCED_SQLSTATE


@dataclass
class Workload:
    catalog_url: str
    stamps: dict[str, str]
    tenant: int
    seed: int = 1
    rate: float | None = None
    alive: dict[int, str] = field(default_factory=dict)  # task id -> title the last acknowledged write set
    deleted: set[int] = field(default_factory=set)
    acked: int = 0
    fenced_errors: int = 0
    errors: list[str] = field(default_factory=list)
    touched_on: dict[int, str] = field(default_factory=dict)  # task id -> stamp of its last write
    longest_pause_s: float = 0.0
    longest_pause_ended: float = 0.0  # wall clock, to place the pause in a log
    started_at: float = 0.0
    stopped_at: float = 0.0
    _last_ack: float = 0.0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def route(self) -> str:
        with dsnlib.connect(self.catalog_url, autocommit=True) as conn:
            row = conn.execute("SELECT stamp FROM routes WHERE tenant = %s", (str(self.tenant),)).fetchone()
        assert row is not None
        return str(row[0])

    def start(self) -> Workload:
        self._thread = threading.Thread(target=self._run, name=f"writer-{self.tenant}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> Workload:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(timeout=60)
        return self

    def _run(self) -> None:
        rng = random.Random(self.seed)
        stamp = self.route()
        conn = dsnlib.connect(self.stamps[stamp], autocommit=True, pinned=False)
        project = conn.execute(
            "SELECT id FROM projects WHERE tenant_id = %s ORDER BY id LIMIT 1", (self.tenant,)
        ).fetchone()[0]
        n = 0
        self.started_at = self._last_ack = due = time.monotonic()
        while not self._stop.is_set():
            n += 1
            if self.rate:
                due = max(due + 1 / self.rate, time.monotonic() - 0.1)
                time.sleep(max(0.0, due - time.monotonic()))
            try:
                self._one(conn, rng, project, n, stamp)
            except psycopg.Error as exc:
                if exc.sqlstate == FENCED_SQLSTATE:
                    self.fenced_errors += 1
                    new_stamp = self.route()
                    if new_stamp != stamp:
                        conn.close()
                        stamp = new_stamp
                        conn = dsnlib.connect(self.stamps[stamp], autocommit=True, pinned=False)
                    else:
                        time.sleep(0.002)
                else:
                    self.errors.append(f"{type(exc).__name__}: {exc}")
                    if conn.closed or conn.broken:
                        conn = dsnlib.connect(self.stamps[stamp], autocommit=True, pinned=False)
        self.stopped_at = time.monotonic()
        conn.close()

    def _one(self, conn: psycopg.Connection[Any], rng: random.Random, project: int, n: int, stamp: str) -> None:
        op = rng.random()
        if op < 0.45 or len(self.alive) < 20:
            title = f"w{self.tenant}-{n}"
            task = conn.execute(
                "INSERT INTO tasks (tenant_id, project_id, title, meta) VALUES (%s, %s, %s, %s) RETURNING id",
                (self.tenant, project, title, '{"writer": true}'),
            ).fetchone()[0]
            self._ack(task, title, stamp)
        elif op < 0.75:
            task = rng.choice(list(self.alive))
            title = f"u{self.tenant}-{n}"
            if (
                conn.execute(
                    "UPDATE tasks SET title = %s WHERE tenant_id = %s AND id = %s", (title, self.tenant, task)
                ).rowcount
                == 1
            ):
                self._ack(task, title, stamp)
        elif op < 0.85:
            task = rng.choice(list(self.alive))
            row = conn.execute(
                "UPDATE tasks SET id = DEFAULT WHERE tenant_id = %s AND id = %s RETURNING id", (self.tenant, task)
            ).fetchone()
            if row is not None:  # a primary-key change: the old key must vanish, the new one appear
                title = self.alive.pop(task)
                self.deleted.add(task)
                self.touched_on[task] = stamp
                self._ack(row[0], title, stamp)
        else:
            task = rng.choice(list(self.alive))
            if conn.execute("DELETE FROM tasks WHERE tenant_id = %s AND id = %s", (self.tenant, task)).rowcount:
                del self.alive[task]
                self.deleted.add(task)
                self.touched_on[task] = stamp
                self._acknowledged()

    def _ack(self, task: int, title: str, stamp: str) -> None:
        self.alive[task] = title
        self.deleted.discard(task)
        self.touched_on[task] = stamp
        self._acknowledged()

    def _acknowledged(self) -> None:
        now = time.monotonic()
        if now - self._last_ack > self.longest_pause_s:
            self.longest_pause_s, self.longest_pause_ended = now - self._last_ack, time.time()
        self._last_ack = now
        self.acked += 1

    def assert_all_acknowledged_writes_on(self, dsn: str) -> None:
        """Every acknowledged write is on the stamp with its final value; deleted keys are absent."""
        with dsnlib.connect(dsn, autocommit=True) as conn:
            rows = dict(conn.execute("SELECT id, title FROM tasks WHERE tenant_id = %s", (self.tenant,)).fetchall())
        missing = {k: v for k, v in self.alive.items() if rows.get(k) != v}
        resurrected = sorted(k for k in self.deleted if k in rows)
        assert not missing, f"{len(missing)} acknowledged writes missing or stale, e.g. {list(missing.items())[:5]}"
        assert not resurrected, f"deleted rows came back: {resurrected[:5]}"
