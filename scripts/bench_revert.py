"""Benchmark: the revert window. The revert's freeze next to the forward move's, with the application's
pause through `migrator.router`, and the cost of the window's capture on the target's writes.

One run, on two local PostgreSQL servers (stamp `a` with the catalog, stamp `b`): a tenant of ROWS
rows is seeded on `a`. MOVES times: writers (migrator/testing/writer.py, through
`migrator.router.Router.run`, RATE writes/s) write the tenant while it moves `a -> b` (online), keep
writing on `b` for WINDOW seconds, and on through `migrator move revert`, which brings it back to
`a`; every acknowledged write must then be on `a`. The revert's leftover on `b` is cleaned up before
the next round. Per round: the freeze of each (`freeze_ms`), the application's pause across it (its
last write acknowledged before the fence to its first after the flip, over all writers), and the
changes the revert replayed. At the end, p50 and p99 of both, and their ratio.

The window's overhead: the tenant is moved `a -> b` once more and an unthrottled writer writes on
`b` for SECONDS with the window open (every write logs its key), then again after `cleanup` closed
it (no trigger); writes/s of both and their ratio, twice, alternating.

`scripts/bench revert [--rows N] [--moves N] [--rate W] [--window S] [--seconds S]`. Every server is
stopped at the end; nothing is written to the repository.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from typing import Any

import benchlib  # scripts/, the directory of this script

from migrator.testing.writer import Workload

TENANT = 1


def _migrator(cli: list[str], *args: str) -> dict[str, Any]:
    """One `migrator ... --json` command with its --verbose log; its JSON, with the log as `_log`."""
    done = subprocess.run([*cli, "--verbose", *args, "--yes", "--json"], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"migrator {' '.join(args)} failed: {done.stderr[-2000:]}")
    return {**json.loads(done.stdout), "_log": done.stderr}


def _cleanup(cli: list[str], move: dict[str, Any]) -> None:
    """`migrator cleanup --move ID` (it closes the move's revert window first)."""
    args = ["cleanup", "--move", str(move["move"]["id"]), "--yes"]
    done = subprocess.run([*cli, *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"migrator {' '.join(args)} failed: {done.stderr[-2000:]}")


def _pause_ms(writers: list[Workload], outcome: dict[str, Any]) -> float:
    """The application's pause across a freeze: from its fence (the log) to the flip (fence + freeze)."""
    fenced = benchlib.fenced_at(outcome["_log"])
    flipped = fenced + float(outcome["move"]["freeze_ms"]) / 1000
    return max(w.pause_across(fenced, flipped) for w in writers) * 1000


def _writes_per_s(catalog_url: str, stamps: dict[str, str], seconds: float, seed: int) -> float:
    """An unthrottled writer's acknowledged writes/s on the tenant, wherever it lives."""
    writer = Workload(catalog_url, stamps, TENANT, seed=seed).start()
    time.sleep(seconds)
    writer.stop()
    if writer.errors:
        raise AssertionError(writer.errors[:3])
    return writer.acked / (writer.stopped_at - writer.started_at)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000, help="rows of the moved tenant")
    parser.add_argument("--moves", type=int, default=5, help="rounds of move, window, revert")
    parser.add_argument("--rate", type=float, default=600.0, help="writes/s on the tenant, all writers")
    parser.add_argument("--writers", type=int, default=2)
    parser.add_argument("--window", type=float, default=3.0, help="seconds of writes on the target before a revert")
    parser.add_argument("--seconds", type=float, default=8.0, help="each overhead measurement")
    args = parser.parse_args()
    with benchlib.moving_pair("migrator-bench-revert-", TENANT, args.rows) as pair:
        stamps, catalog, cli, rows = pair.stamps, pair.catalog, pair.cli, pair.rows
        print(f"tenant rows {rows:,}; writers {args.rate:.0f} writes/s; {args.window:.0f} s of writes on b per window")
        print(
            f"{'round':>5} {'move ms':>8} {'app pause':>10} {'revert ms':>10} {'app pause':>10}"
            f" {'keys on b':>9} {'revert s':>9}"
        )
        forward: list[float] = []
        backward: list[float] = []
        forward_pause: list[float] = []
        backward_pause: list[float] = []
        for number in range(1, args.moves + 1):
            writers = [
                Workload(catalog.url, stamps, TENANT, seed=number * 100 + i, rate=args.rate / args.writers).start()
                for i in range(args.writers)
            ]
            time.sleep(1.0)
            moved = _migrator(cli, "move", str(TENANT), "--to", "b")
            time.sleep(args.window)  # writes on b, captured by the window
            started = time.monotonic()
            reverted = _migrator(cli, "move", "revert", str(moved["move"]["id"]))
            revert_s = time.monotonic() - started
            time.sleep(1.0)
            for writer in writers:
                writer.stop()
            for writer in writers:
                lost = writer.lost_writes(stamps["a"])
                if lost or writer.errors:
                    raise AssertionError("; ".join(lost + writer.errors[:3]))
            forward.append(float(moved["move"]["freeze_ms"]))
            backward.append(float(reverted["move"]["freeze_ms"]))
            forward_pause.append(_pause_ms(writers, moved))
            backward_pause.append(_pause_ms(writers, reverted))
            replayed = len({k for w in writers for k, s in w.touched_on.items() if s == "b"})
            print(
                f"{number:>5} {forward[-1]:>8.1f} {forward_pause[-1]:>10.1f} {backward[-1]:>10.1f}"
                f" {backward_pause[-1]:>10.1f} {replayed:>9} {revert_s:>9.2f}",
                flush=True,
            )
            _cleanup(cli, reverted)
        for name, values, pauses in (("move", forward, forward_pause), ("revert", backward, backward_pause)):
            print(
                f"{name:>6} freeze p50 {statistics.median(values):.1f} ms, p99 {benchlib.p99(values):.1f} ms;"
                f" application pause p50 {statistics.median(pauses):.1f} ms, p99 {benchlib.p99(pauses):.1f} ms"
            )
        ratio = statistics.median(backward) / statistics.median(forward)
        print(f"revert freeze / move freeze (p50): {ratio:.2f}")

        window, plain = [], []
        for turn in range(2):  # alternating: the window open on b, then closed by cleanup
            moved = _migrator(cli, "move", str(TENANT), "--to", "b")
            window.append(_writes_per_s(catalog.url, stamps, args.seconds, seed=turn))
            _cleanup(cli, moved)
            plain.append(_writes_per_s(catalog.url, stamps, args.seconds, seed=10 + turn))
            back = _migrator(cli, "move", str(TENANT), "--to", "a", "--no-revert-window")
            _cleanup(cli, back)
        print(
            "unthrottled writes/s on the target: with the window "
            + ", ".join(f"{w:.0f}" for w in window)
            + "; without "
            + ", ".join(f"{p:.0f}" for p in plain)
            + f"; ratio {statistics.mean(window) / statistics.mean(plain):.2f}"
        )


if __name__ == "__main__":
    main()
