"""Benchmark: the write-freeze window of online moves while a writer keeps the tenant busy.

One run, on two local PostgreSQL servers (stamp `a` with the catalog, stamp `b`), both of SCHEMA
(scripts/benchschemas.py: the sample application's, or the peer's with composite keys; the
catalog's config carries its tenancy): a tenant of ROWS rows is seeded on `a`, then moved
`a -> b -> a -> ...` MOVES times with `migrator move` (online, its own process), each followed by
`migrator cleanup` of the old stamp. During every move a writer (migrator/testing/writer.py,
WRITERS threads, with the schema's writes: the sample's tasks, the peer's clicks and impressions)
inserts, updates (primary-key changes included) and deletes the tenant's rows at RATE writes/s
(0: as fast as it can, never sleeping) through `migrator.router.Router.run`, the library
applications use: routes cached and updated by the catalog's notifications, fenced writes retried
on the new stamp.

Per move it prints the freeze the move measured (fence to flip, `freeze_ms`, and each of its steps,
`freeze_steps_ms`, with the changes its drain replayed and how many times it fenced; at the end, p50
and p99 of them), the application's pause at the cutover (from its last write acknowledged before
the fence to its first after the flip's commit, over all writers: the freeze plus the re-route), the
longest pause between two acknowledged writes at any time of the move and when it began relative to
the fence (from the move's log; the machine's clock serves both), how long after the flip's commit
the writers' routers had the new route cached (the latest of them), the writer's achieved rate, its
fence rejections (inside the window by construction: the source rejects only while fenced) and its
other errors (outside the window; the target is 0), and checks that every acknowledged write is on
the new stamp; at the end also p50 and p99 of the application's pause minus the freeze (issue 28's
goals: freeze p99 < 50 ms, pause at most 30 ms more than the freeze).
`scripts/bench online [--schema sample|peer] [--rows N] [--moves N] [--rate W]`.
Every server is stopped at the end; nothing is written to the repository.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import time

import benchlib  # scripts/, the directory of this script
from benchschemas import SCHEMAS

from migrator.router import Router
from migrator.testing.writer import Workload

TENANT = 1


def _cached_lookup_us(catalog_url: str, stamps: dict[str, str], calls: int = 200_000) -> float:
    """Microseconds per `Router.stamp_of` of a cached tenant."""
    with Router(catalog_url, stamps) as router:
        router.stamp_of(str(TENANT))
        started = time.perf_counter()
        for _ in range(calls):
            router.stamp_of(str(TENANT))
        return (time.perf_counter() - started) / calls * 1e6


def _drained(log: str) -> int:
    """Changes the flipping attempt replayed inside the freeze (its `drain` step), from the move's --verbose log."""
    found = re.findall(r"^\S+ \S+ INFO migrator\.cutover: move \d+: drained (\d+) changes at", log, re.M)
    if not found:
        raise SystemExit("the move's log has no drain line")
    return int(found[-1])


def _freezes(log: str) -> int:
    """Cutover attempts that fenced the tenant, from the move's --verbose log: all but the last were
    released (over --max-freeze-ms), each a pause of the application before the one that flipped."""
    return len(re.findall(r"^\S+ \S+ INFO migrator\.cutover: move \d+: fenced, in-flight", log, re.M))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2_000_000, help="rows of the moved tenant")
    parser.add_argument("--moves", type=int, default=5)
    parser.add_argument(
        "--rate", type=float, default=600.0, help="writes/s on the moving tenant, all writers (0: unthrottled)"
    )
    parser.add_argument("--writers", type=int, default=2, help="writer threads (connections) sharing --rate")
    parser.add_argument("--max-freeze-ms", type=float, default=1000.0)
    parser.add_argument("--schema", choices=sorted(SCHEMAS), default="sample", help="whose schema the tenant lives in")
    args = parser.parse_args()
    schema = SCHEMAS[args.schema]
    with benchlib.moving_pair("migrator-bench-online-", TENANT, args.rows, schema) as pair:
        stamps, catalog, cli, rows = pair.stamps, pair.catalog, pair.cli, pair.rows

        target_rate = f"{args.rate:.0f} writes/s" if args.rate else "unthrottled"
        print(
            f"tenant rows {rows:,} ({schema.name} schema); writers {args.writers}, {target_rate};"
            f" --max-freeze-ms {args.max_freeze_ms:.0f}"
        )
        header = (
            f"{'move':>4} {'route':>6} {'freeze ms':>10} {'app pause ms':>15} {'longest pause ms':>16}"
            f" {'from fence':>13} {'writes/s':>9}"
        )
        print(f"{header} {'cache after flip ms':>20} {'fence rejections':>17} {'other errors':>13} {'move s':>7}")
        freezes: list[float] = []
        steps: dict[str, list[float]] = {}  # the freeze's steps (`freeze_steps_ms`), per move
        pauses: list[float] = []
        cache_lags: list[float] = []
        other_errors = 0
        slowest_rate = float("inf")
        source = "a"
        for number in range(1, args.moves + 1):
            target = "b" if source == "a" else "a"
            writers = [
                Workload(
                    catalog.url,
                    stamps,
                    TENANT,
                    seed=number * 100 + i,
                    rate=args.rate / args.writers,
                    writes=schema.writes,
                ).start()
                for i in range(args.writers)
            ]
            time.sleep(1.0)  # the writer is at speed before the move starts
            started = time.monotonic()
            moved = subprocess.run(
                [
                    *cli,
                    "--verbose",
                    "move",
                    str(TENANT),
                    "--to",
                    target,
                    "--yes",
                    "--json",
                    "--max-freeze-ms",
                    str(args.max_freeze_ms),
                ],
                check=True,
                capture_output=True,
                text=True,
            )
            move_s = time.monotonic() - started
            time.sleep(1.0)  # and keeps writing on the target afterwards
            errors: list[str] = []
            for writer in writers:  # all stopped before any check reads the tenant (that stalls the others)
                writer.stop()
            for writer in writers:
                lost = writer.lost_writes(stamps[target])
                if lost:
                    raise AssertionError("; ".join(lost))
                errors += writer.errors
            outcome = json.loads(moved.stdout)
            freeze_ms = float(outcome["move"]["freeze_ms"])
            freezes.append(freeze_ms)
            freeze_steps = {step: float(ms) for step, ms in outcome["freeze_steps_ms"].items()}
            for step, ms in freeze_steps.items():
                steps.setdefault(step, []).append(ms)
            rate = sum(w.acked / (w.stopped_at - w.started_at) for w in writers)
            longest = max(writers, key=lambda w: w.longest_pause_s)
            pause_ms = longest.longest_pause_s * 1000
            fenced_at = benchlib.fenced_at(moved.stderr)
            pause_from = (longest.longest_pause_ended - longest.longest_pause_s - fenced_at) * 1000
            rejections = sum(w.fenced_errors for w in writers)
            flipped_at = fenced_at + freeze_ms / 1000
            cache_ms = (max(w.route_cached_at for w in writers) - flipped_at) * 1000
            fence_pause_ms = max(w.pause_across(fenced_at, flipped_at) for w in writers) * 1000
            pauses.append(fence_pause_ms)
            cache_lags.append(cache_ms)
            slowest_rate = min(slowest_rate, rate)
            other_errors += len(errors)
            print(
                f"{number:>4} {source + '->' + target:>6} {freeze_ms:>10.1f} {fence_pause_ms:>15.1f}"
                f" {pause_ms:>16.1f} {pause_from:>+13.0f} {rate:>9.0f} {cache_ms:>20.1f} {rejections:>17}"
                f" {len(errors):>13} {move_s:>7.1f}",
                flush=True,
            )
            print(
                "     freeze steps ms: "
                + ", ".join(f"{step} {ms:.1f}" for step, ms in freeze_steps.items())
                + f"; the drain replayed {_drained(moved.stderr)} changes; {_freezes(moved.stderr)} freeze(s)"
            )
            for error in errors[:3]:
                print(f"     writer error: {error}")
            subprocess.run([*cli, "cleanup", str(TENANT), "--stamp", source, "--yes"], check=True, capture_output=True)
            source = target
        p50, p99 = statistics.median(freezes), benchlib.p99(freezes)
        print(f"freeze window p50 {p50:.1f} ms, p99 {p99:.1f} ms (target p99 < 50 ms)")
        print(
            "freeze steps, ms: "
            + "; ".join(
                f"{step} p50 {statistics.median(ms):.1f} p99 {benchlib.p99(ms):.1f}" for step, ms in steps.items()
            )
        )
        print(f"writer: slowest move {slowest_rate:.0f} writes/s (target >= 500); errors outside it {other_errors}")
        beyond = [p - f for p, f in zip(pauses, freezes, strict=True)]
        print(
            f"application pause at the cutover - freeze: p50 {statistics.median(beyond):.1f} ms,"
            f" p99 {benchlib.p99(beyond):.1f} ms, max {max(beyond):.1f} ms (target <= 30 ms)"
        )
        print(f"router cache updated after the flip's commit: max {max(cache_lags):.1f} ms (target < 50 ms)")
        print(f"cached Router.stamp_of: {_cached_lookup_us(catalog.url, stamps):.2f} us per call (target < 5 us)")


if __name__ == "__main__":
    main()
