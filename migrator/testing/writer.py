"""The applications' writer: one tenant's writes through `migrator.router`, as fast as it can.

Used by the online-move tests, `scripts/bench online` and `scripts/demo` (`python -m
migrator.testing.writer`, which writes until it is stopped and then says what the application saw).

`rate` (writes/s) paces it instead, for `scripts/bench online`, which also reads `longest_pause_s`:
the longest wait between two acknowledged writes, i.e. the freeze as the application saw it.

It inserts, updates (including primary-key changes) and deletes rows of the tenant, one
transaction each through `migrator.router.Router.run` (the library applications use: cached
routes updated by the catalog's notifications, retries on the fence's SQLSTATE), and records every
write the database acknowledged, with the stamp that took it. Which rows, in which schema, is its
`writes` (`Writes`): the sample application's tasks (`Tasks`) unless told; the loop, the pause
accounting and the oracle of acknowledged writes (`lost_writes`) are the same for every schema.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Collection, Hashable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import psycopg

from migrator.db import dsn as dsnlib
from migrator.router import Router, TenantFenced

T = TypeVar("T")


class Writes(Protocol):
    """One schema's writes of a tenant's rows, each inside the transaction `Router.run` gives it.

    A row is named by a key (any hashable: the sample's task id, a table and an id) and carries one
    text value the writer sets and `read` returns, so `Workload` can tell which acknowledged write
    a stamp contradicts without knowing the schema.
    """

    def prepare(self, conn: psycopg.Connection[Any]) -> None:
        """Read what the writes need of the tenant's existing rows (parents to refer to), once."""

    def insert(self, conn: psycopg.Connection[Any], n: int, value: str) -> Hashable:
        """Insert a row holding `value` (`n`: the write's number, unique in this writer); its key."""

    def update(self, conn: psycopg.Connection[Any], key: Hashable, value: str) -> bool:
        """Set the row's value; whether the row was there."""

    def rekey(self, conn: psycopg.Connection[Any], key: Hashable, n: int) -> Hashable | None:
        """Change the row's primary key; its new key, None if the row was gone."""

    def delete(self, conn: psycopg.Connection[Any], key: Hashable) -> bool:
        """Delete the row; whether it was there."""

    def read(self, conn: psycopg.Connection[Any], keys: Collection[Hashable]) -> dict[Hashable, str]:
        """The value of each of these rows the stamp holds (rows it lacks are left out)."""


@dataclass
class Tasks:
    """The sample application's writes: the tenant's tasks, in its first project, ids from their sequence."""

    tenant: int
    seed: int
    project: int = 0

    def prepare(self, conn: psycopg.Connection[Any]) -> None:
        row = conn.execute(
            "SELECT id FROM projects WHERE tenant_id = %s ORDER BY id LIMIT 1", (self.tenant,)
        ).fetchone()
        assert row is not None, f"tenant {self.tenant} has no project"
        self.project = int(row[0])

    def insert(self, conn: psycopg.Connection[Any], n: int, value: str) -> Hashable:
        row = conn.execute(
            "INSERT INTO tasks (tenant_id, project_id, title, meta) VALUES (%s, %s, %s, %s) RETURNING id",
            (self.tenant, self.project, value, '{"writer": true}'),
        ).fetchone()
        assert row is not None
        return int(row[0])

    def update(self, conn: psycopg.Connection[Any], key: Hashable, value: str) -> bool:
        cur = conn.execute("UPDATE tasks SET title = %s WHERE tenant_id = %s AND id = %s", (value, self.tenant, key))
        return cur.rowcount == 1

    def rekey(self, conn: psycopg.Connection[Any], key: Hashable, n: int) -> Hashable | None:
        row = conn.execute(
            "UPDATE tasks SET id = DEFAULT WHERE tenant_id = %s AND id = %s RETURNING id", (self.tenant, key)
        ).fetchone()
        return int(row[0]) if row else None

    def delete(self, conn: psycopg.Connection[Any], key: Hashable) -> bool:
        cur = conn.execute("DELETE FROM tasks WHERE tenant_id = %s AND id = %s", (self.tenant, key))
        return cur.rowcount == 1

    def read(self, conn: psycopg.Connection[Any], keys: Collection[Hashable]) -> dict[Hashable, str]:
        rows = conn.execute(
            "SELECT id, title FROM tasks WHERE tenant_id = %s AND id = ANY(%s)", (self.tenant, list(keys))
        ).fetchall()
        return dict(rows)


@dataclass
class Workload:
    catalog_url: str
    stamps: dict[str, str]
    tenant: int
    seed: int = 1
    rate: float | None = None  # writes/s; None or 0: as fast as it can
    writes: Callable[[int, int], Writes] = Tasks  # (tenant, seed) -> the schema's writes
    alive: dict[Hashable, str] = field(default_factory=dict)  # key -> value the last acknowledged write set
    deleted: set[Hashable] = field(default_factory=set)
    acked: int = 0
    fenced_errors: int = 0
    errors: list[str] = field(default_factory=list)
    touched_on: dict[Hashable, str] = field(default_factory=dict)  # key -> stamp of its last write
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
    _writes: Writes = field(init=False)

    def __post_init__(self) -> None:
        self._writes = self.writes(self.tenant, self.seed)

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
        self._router.run(str(self.tenant), self._writes.prepare)
        n = 0
        self.started_at = self._last_ack = due = time.monotonic()
        while not self._stop.is_set():
            n += 1
            if self.rate:
                due = max(due + 1 / self.rate, time.monotonic() - 0.1)
                time.sleep(max(0.0, due - time.monotonic()))
            try:
                self._one(rng, n)
            except (psycopg.Error, TenantFenced) as exc:  # what reaches the application: none expected
                self.errors.append(f"{type(exc).__name__}: {exc}")
        self.stopped_at = time.monotonic()

    def _write(self, fn: Callable[[psycopg.Connection[Any]], T]) -> tuple[T, str]:
        """`fn` in its own transaction through `Router.run` (retried there on the fence), and the stamp that took it."""
        assert self._router is not None
        router, tenant = self._router, str(self.tenant)
        return router.run(tenant, lambda conn: (fn(conn), router.stamp_of(tenant)))

    def _one(self, rng: random.Random, n: int) -> None:
        """One write, then its bookkeeping."""
        writes = self._writes
        op = rng.random()
        if op < 0.45 or len(self.alive) < 20:
            value = f"w{self.tenant}-{n}"
            key, stamp = self._write(lambda conn: writes.insert(conn, n, value))
            self._ack(key, value, stamp)
        elif op < 0.75:
            key = rng.choice(list(self.alive))
            value = f"u{self.tenant}-{n}"
            updated, stamp = self._write(lambda conn: writes.update(conn, key, value))
            if updated:
                self._ack(key, value, stamp)
        elif op < 0.85:
            key = rng.choice(list(self.alive))
            new, stamp = self._write(lambda conn: writes.rekey(conn, key, n))
            if new is not None:  # a primary-key change: the old key must vanish, the new one appear
                value = self.alive.pop(key)
                self._gone(key, stamp)
                self._ack(new, value, stamp)
        else:
            key = rng.choice(list(self.alive))
            deleted, stamp = self._write(lambda conn: writes.delete(conn, key))
            if deleted:
                del self.alive[key]
                self._gone(key, stamp)
                self._acknowledged()

    def _ack(self, key: Hashable, value: str, stamp: str) -> None:
        self.alive[key] = value
        self.deleted.discard(key)
        self.touched_on[key] = stamp
        self._acknowledged()

    def _gone(self, key: Hashable, stamp: str) -> None:
        self.deleted.add(key)
        self.touched_on[key] = stamp

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
            rows = self._writes.read(conn, [*self.alive, *self.deleted])
        missing = {k: v for k, v in self.alive.items() if rows.get(k) != v}
        resurrected = [k for k in self.deleted if k in rows]
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
