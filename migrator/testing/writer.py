"""The sample application's writer: one tenant's writes through `migrator.router`, as fast as it can.

Used by the online-move tests, `scripts/bench online` and `scripts/demo` (`python -m
migrator.testing.writer`, which writes until it is stopped and then says what the application saw).

`rate` (writes/s) paces it instead, for `scripts/bench online`, which also reads `longest_pause_s`:
the longest wait between two acknowledged writes, i.e. the freeze as the application saw it.

It inserts, updates (including primary-key changes) and deletes the tenant's tasks, one
transaction each through `migrator.router.Router.run` (the library applications use: cached
routes updated by the catalog's notifications, retries on the fence's SQLSTATE), and records every
write the database acknowledged, with the stamp that took it.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import psycopg

from migrator.db import dsn as dsnlib
from migrator.router import Router, TenantFenced


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
    acked_at: list[float] = field(default_factory=list)  # wall clock of every acknowledged write
    route_cached_at: float = 0.0  # wall clock when the router first cached the tenant's current route
    started_at: float = 0.0
    stopped_at: float = 0.0
    _last_ack: float = 0.0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _router: Router | None = None

    def start(self) -> Workload:
        self._router = Router(self.catalog_url, self.stamps)
        self._thread = threading.Thread(target=self._run, name=f"writer-{self.tenant}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> Workload:
        self._stop.set()
        assert self._thread is not None and self._router is not None
        self._thread.join(timeout=60)
        self.fenced_errors = self._router.stats.fenced_retries
        changed = self._router.updated_at(str(self.tenant))
        if changed is not None:
            self.route_cached_at = time.time() - (time.monotonic() - changed)
        self._router.close()
        return self

    def _run(self) -> None:
        assert self._router is not None
        rng = random.Random(self.seed)
        project = self._router.run(str(self.tenant), self._project)
        n = 0
        self.started_at = self._last_ack = due = time.monotonic()
        while not self._stop.is_set():
            n += 1
            if self.rate:
                due = max(due + 1 / self.rate, time.monotonic() - 0.1)
                time.sleep(max(0.0, due - time.monotonic()))
            try:
                self._one(rng, project, n)
            except (psycopg.Error, TenantFenced) as exc:  # what reaches the application: none expected
                self.errors.append(f"{type(exc).__name__}: {exc}")
        self.stopped_at = time.monotonic()

    def _project(self, conn: psycopg.Connection[Any]) -> int:
        row = conn.execute(
            "SELECT id FROM projects WHERE tenant_id = %s ORDER BY id LIMIT 1", (self.tenant,)
        ).fetchone()
        assert row is not None, f"tenant {self.tenant} has no project"
        return int(row[0])

    def _one(self, rng: random.Random, project: int, n: int) -> None:
        """One write through `Router.run` (its own transaction, retried there on the fence), then its bookkeeping."""
        assert self._router is not None
        router, tenant = self._router, str(self.tenant)
        op = rng.random()
        if op < 0.45 or len(self.alive) < 20:
            title = f"w{self.tenant}-{n}"

            def insert(conn: psycopg.Connection[Any]) -> tuple[int, str]:
                row = conn.execute(
                    "INSERT INTO tasks (tenant_id, project_id, title, meta) VALUES (%s, %s, %s, %s) RETURNING id",
                    (self.tenant, project, title, '{"writer": true}'),
                ).fetchone()
                assert row is not None
                return row[0], router.stamp_of(tenant)

            task, stamp = router.run(tenant, insert)
            self._ack(task, title, stamp)
        elif op < 0.75:
            task = rng.choice(list(self.alive))
            title = f"u{self.tenant}-{n}"

            def update(conn: psycopg.Connection[Any]) -> tuple[int, str]:
                cur = conn.execute(
                    "UPDATE tasks SET title = %s WHERE tenant_id = %s AND id = %s", (title, self.tenant, task)
                )
                return cur.rowcount, router.stamp_of(tenant)

            updated, stamp = router.run(tenant, update)
            if updated == 1:
                self._ack(task, title, stamp)
        elif op < 0.85:
            task = rng.choice(list(self.alive))

            def rekey(conn: psycopg.Connection[Any]) -> tuple[Any, str]:
                row = conn.execute(
                    "UPDATE tasks SET id = DEFAULT WHERE tenant_id = %s AND id = %s RETURNING id", (self.tenant, task)
                ).fetchone()
                return row, router.stamp_of(tenant)

            row, stamp = router.run(tenant, rekey)
            if row is not None:  # a primary-key change: the old key must vanish, the new one appear
                title = self.alive.pop(task)
                self.deleted.add(task)
                self.touched_on[task] = stamp
                self._ack(row[0], title, stamp)
        else:
            task = rng.choice(list(self.alive))

            def delete(conn: psycopg.Connection[Any]) -> tuple[int, str]:
                cur = conn.execute("DELETE FROM tasks WHERE tenant_id = %s AND id = %s", (self.tenant, task))
                return cur.rowcount, router.stamp_of(tenant)

            deleted, stamp = router.run(tenant, delete)
            if deleted:
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
        self.acked_at.append(time.time())

    def pause_across(self, start: float, end: float) -> float:
        """Seconds between the last write acknowledged before `start` and the first after `end` (wall
        clock): the stop the application saw around that window, e.g. a move's freeze."""
        before = max((t for t in self.acked_at if t <= start), default=start)
        after = min((t for t in self.acked_at if t >= end), default=end)
        return after - before

    def lost_writes(self, dsn: str) -> list[str]:
        """What the stamp at `dsn` contradicts of the writes the application saw acknowledged: keys
        missing or not at their last acknowledged value, deleted keys back. Empty: nothing lost.

        Tests and benchmarks assert on it; the writer itself only reports.
        """
        with dsnlib.connect(dsn, autocommit=True) as conn:
            rows = dict(conn.execute("SELECT id, title FROM tasks WHERE tenant_id = %s", (self.tenant,)).fetchall())
        missing = {k: v for k, v in self.alive.items() if rows.get(k) != v}
        resurrected = sorted(k for k in self.deleted if k in rows)
        lost = [f"{len(missing)} acknowledged writes missing or stale, e.g. {list(missing.items())[:5]}"]
        back = [f"deleted rows came back: {resurrected[:5]}"]
        return (lost if missing else []) + (back if resurrected else [])


def main() -> None:
    """`python -m migrator.testing.writer --config FILE --tenant T [--rate W]`: write until SIGTERM/SIGINT."""
    import argparse
    import signal

    from migrator.context import Context

    parser = argparse.ArgumentParser(description="write to one tenant through migrator.router until stopped")
    parser.add_argument("--config", required=True)
    parser.add_argument("--tenant", type=int, required=True)
    parser.add_argument("--rate", type=float, default=200.0, help="writes/s")
    args = parser.parse_args()
    ctx = Context.load(args.config)
    stamps = {s.name: s.dsn for s in ctx.catalog.stamps()}
    ctx.catalog.close()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    writer = Workload(ctx.config.catalog_url, stamps, args.tenant, rate=args.rate).start()
    stop.wait()
    writer.stop()
    seconds = writer.stopped_at - writer.started_at
    print(
        f"application (tenant {args.tenant}, through migrator.router): {writer.acked} writes in {seconds:.1f} s"
        f" ({writer.acked / seconds:.0f}/s), {writer.fenced_errors} fenced retries, longest pause"
        f" {writer.longest_pause_s * 1000:.0f} ms, {len(writer.errors)} errors",
        flush=True,
    )


if __name__ == "__main__":
    main()
