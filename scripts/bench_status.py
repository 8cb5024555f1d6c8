"""Benchmark: `schema status` with structural fingerprints against the revision-only survey.

Starts --servers local PostgreSQL servers, clones --stamps small stamp databases (the sample
application at head) from a template on each, round-robin, and registers them in a catalog on the
first server. After one untimed survey (a database's first session builds its relation cache
file) and a first `schema status` with fingerprints (timed apart: it reads every fingerprint in full
and keeps it in its stamp), one stamp is changed by hand; then it times, alternately and --rounds
times each, the revision-only survey (`schema_status`, one `alembic_version` read per stamp) and
`schema status` with fingerprints (`fleet_status`: the revision and the fingerprint in the same
session, the fingerprint from the stamp's cache unless its catalog changed), both within
--connections-per-server sessions on each server, while a watcher samples `pg_stat_activity` for the
most migrator sessions seen on one server. The fingerprinted runs must find the changed stamp (its
cache no longer matches its catalog) and nothing else. Goal: the fingerprinted status under 2x the
revision-only one. Run with `scripts/bench status [--stamps 1000 --servers 3]`. Nothing is written
to the repository.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import benchlib  # scripts/, the directory of this script

from migrator.context import Context
from migrator.db import dsn as dsnlib
from migrator.local import pgserver, provision
from migrator.rollout.drift import fleet_status
from migrator.rollout.runner import schema_status

GOAL_RATIO = 2.0


class SessionWatch:
    """The most sessions named `migrator` on stamp databases seen at once on each server, sampled every
    few milliseconds (a session that just closed may linger there a moment: the peak can overstate)."""

    def __init__(self, servers: list[pgserver.LocalServer]) -> None:
        self.servers = servers
        self.peak = [0] * len(servers)
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        conns = [dsnlib.connect(s.dsn(), autocommit=True, application_name="bench-watch") for s in self.servers]
        try:
            while not self.done.is_set():
                for n, conn in enumerate(conns):
                    row = conn.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'migrator'"
                        " AND datname LIKE 'stamp\\_%'"  # the stamps' sessions: not the catalog's
                    )
                    self.peak[n] = max(self.peak[n], int(row.fetchone()[0]))  # type: ignore[index]
                time.sleep(0.003)
        finally:
            for conn in conns:
                conn.close()

    def __enter__(self) -> SessionWatch:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join()


def create_stamps(servers: list[pgserver.LocalServer], stamps: int) -> list[tuple[str, str]]:
    """(name, DSN) of `stamps` databases cloned from a template at head, dealt round-robin to the servers
    (each server's clones are made one after another, the servers in parallel)."""
    for server in servers:
        provision.stamp_database(server, "bench_template")
    names = [f"stamp-{n:04d}" for n in range(1, stamps + 1)]

    def on_server(index: int) -> list[tuple[str, str]]:
        mine = names[index :: len(servers)]
        return [
            (name, provision.create_database(servers[index], name.replace("-", "_"), template="bench_template"))
            for name in mine
        ]

    with ThreadPoolExecutor(len(servers)) as pool:
        made = [pair for batch in pool.map(on_server, range(len(servers))) for pair in batch]
    return sorted(made)


def timed(run: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    result = run()
    return time.perf_counter() - started, result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stamps", type=int, default=1000)
    parser.add_argument("--servers", type=int, default=3)
    parser.add_argument("--connections-per-server", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    names = [f"server{n}" for n in range(1, args.servers + 1)]
    with benchlib.local_servers("drift-bench-status-", names) as (base, servers):
        started = time.perf_counter()
        catalog, config = benchlib.catalog_with_config(servers[0], base)
        made = create_stamps(servers, args.stamps)
        for name, dsn in made:
            catalog.add_stamp(name, dsn)
        catalog.close()
        print(f"{args.stamps} stamps on {args.servers} servers made in {time.perf_counter() - started:.0f} s")
        ctx = Context.load(config)
        budget = args.connections_per_server
        plain: list[float] = []
        printed: list[float] = []
        schema_status(ctx, per_server=budget)  # untimed: each database's first session builds its caches
        first, _ = timed(lambda: fleet_status(ctx, per_server=budget))  # every fingerprint read and kept
        odd_name, odd_dsn = made[len(made) // 2]
        with dsnlib.connect(odd_dsn, autocommit=True) as conn:  # an incident's hot-fix index, after the first
            conn.execute("CREATE INDEX tasks_due_idx ON tasks (tenant_id, due_at)")
        with SessionWatch(servers) as watch:
            for _ in range(args.rounds):
                wall, rows = timed(lambda: schema_status(ctx, per_server=budget))
                plain.append(wall)
                wall, status = timed(lambda: fleet_status(ctx, per_server=budget))
                printed.append(wall)
        ctx.catalog.close()
    unreachable = [r.stamp for r in (*rows, *status.stamps) if r.error]
    odd = [r.stamp for r in status.stamps if r.odd]
    if unreachable or odd != [odd_name]:
        print(f"FAILED: unreachable {unreachable[:3]}, drifted {odd[:3]} (expected {odd_name})", file=sys.stderr)
        return 1
    base_s, with_s = statistics.median(plain), statistics.median(printed)
    ratio = with_s / base_s
    print(f"schema status over {args.stamps} stamps on {args.servers} servers, {budget} sessions per server")
    print(f"  revision-only survey: {base_s:.2f} s (median of {args.rounds}: {', '.join(f'{s:.2f}' for s in plain)})")
    print(f"  with fingerprints:    {with_s:.2f} s (median of {args.rounds}: {', '.join(f'{s:.2f}' for s in printed)})")
    per_stamp = f"{base_s / args.stamps * 1000:.1f} ms vs {with_s / args.stamps * 1000:.1f} ms"
    print(f"  ratio: {ratio:.2f}x; wall per stamp: {per_stamp}")
    print(f"  the first with fingerprints (each read in full and kept in its stamp): {first:.2f} s")
    print(f"  most migrator sessions seen on one server: {max(watch.peak)} (budget {budget}); found drifted: {odd[0]}")
    print(f"  goal under {GOAL_RATIO:.0f}x: {'met' if ratio < GOAL_RATIO else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
