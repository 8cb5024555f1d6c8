"""Benchmark: drain a stamp of 50 small tenants onto 2 stamps, `apply --parallel 1` against `--parallel 4`.

Each run gets a fresh local fleet (migrator.fleet: one catalog and 3 stamps, by default each stamp on
its own PostgreSQL server) so both start from the same state: stamp-1 seeded with TENANTS tenants of
about ROWS rows each (migrator.seed), stamp-2 and stamp-3 with equal row capacities. The drain is
planned (`plan_drain`) and applied through the engine (`apply.prepare` + `apply.run`), like
`migrator plan drain stamp-1` then `migrator apply FILE --parallel N`. Only the apply is timed.
With two target stamps, --parallel 4 needs --per-stamp 2 to run 4 moves at once; --parallel 1
keeps the default --per-stamp 1. Run with `scripts/bench drain [--tenants N --rows N --servers N]`.
Every server is stopped at the end; nothing is written to the repository.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import benchlib  # scripts/, the directory of this script

from migrator.context import Context
from migrator.local.fleet import STATE_FILE, fleet_down, fleet_up
from migrator.local.seed import TenantSpec, seed_fleet_stamp
from migrator.plans.apply import ApplyOptions, EntryResult, SilentApply, prepare, run
from migrator.plans.planners import plan_drain, write_plan


class Quiet(SilentApply):
    """An apply reporter that only keeps failed moves and notes (the benchmark prints its own lines)."""

    def __init__(self) -> None:
        self.failed: list[EntryResult] = []

    def finished(self, result: EntryResult) -> None:
        if result.status != "done":
            self.failed.append(result)

    def note(self, message: str) -> None:
        print(message, file=sys.stderr)


def drain_once(base: Path, label: str, args: argparse.Namespace, parallel: int, per_stamp: int) -> float:
    """A fresh fleet, seeded, drained with the given parallelism; returns the apply's wall time."""
    directory = base / label
    try:
        info = fleet_up(directory, stamps=3, servers=args.servers)
        ctx = Context.load(info.config_path)
        rng = random.Random(42)  # the same tenants in every run
        specs = [
            TenantSpec(i, rng.randint(int(args.rows * 0.9), int(args.rows * 1.1))) for i in range(1, args.tenants + 1)
        ]
        counts = seed_fleet_stamp(ctx.catalog.stamp("stamp-1").dsn, specs)
        for tenant in counts:
            ctx.catalog.set_route(str(tenant), "stamp-1")
        total = sum(counts.values())
        for name in ("stamp-2", "stamp-3"):
            ctx.catalog.update_stamp(name, capacity_rows=total)
        ctx.catalog.update_stamp("stamp-1", state="draining")
        plan_file = write_plan(plan_drain(ctx, "stamp-1"), directory / "drain-stamp-1.yaml")
        prepared = prepare(ctx, plan_file)
        reporter = Quiet()
        started = time.perf_counter()
        result = run(ctx, prepared, ApplyOptions(parallel=parallel, per_stamp=per_stamp), reporter)
        wall = time.perf_counter() - started
        if result.status != "done" or reporter.failed or ctx.catalog.routes("stamp-1"):
            raise SystemExit(f"{label}: the drain did not finish: {result.status}, {reporter.failed[:3]}")
        print(
            f"{label}: {len(counts)} tenants, {total:,} rows drained in {wall:.1f} s "
            f"({total / wall:,.0f} rows/s, --parallel {parallel} --per-stamp {per_stamp})"
        )
        return wall
    finally:
        if (directory / STATE_FILE).exists():  # also when fleet_up failed half-way
            fleet_down(directory)


def main() -> int:
    benchlib.stop_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tenants", type=int, default=50, help="tenants on the drained stamp")
    parser.add_argument("--rows", type=int, default=10_000, help="about this many rows per tenant")
    parser.add_argument("--servers", type=int, default=3, help="PostgreSQL servers for the 3 stamps")
    parser.add_argument("--parallel", type=int, default=4, help="parallelism of the second run")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="migrator-bench-drain-"))
    base.chmod(0o755)
    try:
        serial = drain_once(base, "parallel-1", args, parallel=1, per_stamp=1)
        per_stamp = -(-args.parallel // 2)  # two target stamps
        parallel = drain_once(base, f"parallel-{args.parallel}", args, parallel=args.parallel, per_stamp=per_stamp)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(
        f"drain of {args.tenants} tenants x ~{args.rows:,} rows onto 2 stamps: --parallel 1 {serial:.1f} s, "
        f"--parallel {args.parallel} {parallel:.1f} s, speed-up {serial / parallel:.2f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
