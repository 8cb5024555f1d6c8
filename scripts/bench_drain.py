"""Benchmark: drain a stamp of many small tenants (and a few large ones) onto 2 stamps, with cohorts
and with one move per tenant, against a raw `psql` binary COPY pipe of the same rows.

Each drain gets a fresh local fleet (`migrator.local.fleet`: the catalog and 3 stamps, each stamp
on its own PostgreSQL server) seeded the same way: stamp-1 holds TENANTS tenants of about ROWS
rows and LARGE tenants of LARGE_ROWS rows; stamp-2 and stamp-3 can hold them all. While the drain
runs, a writer (`migrator.testing.writer`, through the router) writes to a sample of the tenants;
afterwards every write it was acknowledged must be on the tenant's new stamp. The drain is planned
(with the default cohorts or `--cohort-tenants 1`) and applied as an operator does it: `migrator plan
drain stamp-1` then `migrator apply FILE --parallel N`, each a process of its own (`--via cli`,
the default: process start, imports and connections are part of every drain), or through the
engine in this process (`--via engine`: `plan_drain` + `apply.prepare` + `apply.run`). The plan
and the apply are timed apart and together ("whole"). The baseline pipes all of stamp-1's tenant
rows, table by table, into an empty database on a server of its own, just before the first drain
and again just after it (a shared machine's load drifts; the mean of the two is the baseline);
"speed" is the pipe's seconds over the whole drain's (1x: as fast as the pipe). "whole per
tenant" is the whole drain's wall time over its tenants (amortized, with --parallel moves at
once); "move s per small tenant" is a small tenant's share of its own move's time (the move's
seconds over its tenants).

    scripts/bench drain [--tenants 1000 --rows 1000 --large 3 --large-rows 50000 --parallel 4]
                        [--cohort-rows N --cohort-tenants K] [--skip-single] [--via cli|engine]

Every server is stopped at the end; nothing is written to the repository.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import benchlib  # scripts/, the directory of this script

from migrator.context import Context
from migrator.local import provision
from migrator.local.fleet import STATE_FILE, FleetInfo
from migrator.local.fleet import fleet_down as stop_fleet
from migrator.local.seed import TenantSpec
from migrator.plans.apply import ApplyOptions, prepare, run
from migrator.plans.planners import Cohorts, plan_drain, write_plan
from migrator.progress import Silent
from migrator.testing.writer import Workload


class Notes(Silent):
    """The apply's progress: only its notes (the benchmark prints its own lines)."""

    def note(self, message: str) -> None:
        print(message, file=sys.stderr)


@dataclass(frozen=True)
class Ran:
    """One entry of the apply, as `migrator apply --json` reports it."""

    tenants: tuple[str, ...]
    status: str
    seconds: float


@dataclass(frozen=True)
class Drain:
    label: str
    moves: int
    tenants: int
    rows: int
    plan_s: float
    apply_s: float
    small_s_per_tenant: float | None  # a small tenant's share of its move's time (its move's seconds / its tenants)
    longest_freeze_ms: float
    acknowledged: int

    @property
    def whole_s(self) -> float:
        return self.plan_s + self.apply_s


def tenant_specs(args: argparse.Namespace) -> list[TenantSpec]:
    """The same tenants in every run: LARGE large ones first, then the small ones."""
    rng = random.Random(42)
    large = [TenantSpec(i, args.large_rows) for i in range(1, args.large + 1)]
    small = [
        TenantSpec(i, rng.randint(int(args.rows * 0.8), int(args.rows * 1.2)))
        for i in range(args.large + 1, args.large + args.tenants + 1)
    ]
    return large + small


def seeded_fleet(directory: Path, args: argparse.Namespace) -> tuple[FleetInfo, Context, dict[int, int]]:
    started = time.monotonic()
    info, ctx, counts = benchlib.drain_fleet(directory, tenant_specs(args))
    print(f"seeded {len(counts)} tenants, {sum(counts.values()):,} rows in {time.monotonic() - started:.0f} s",
          file=sys.stderr)  # fmt: skip
    return info, ctx, counts


def raw_pipe(ctx: Context) -> float:
    """The baseline: all of stamp-1's tenant rows through `psql | psql`, into a server of its own."""
    with benchlib.local_servers("migrator-bench-pipe-", ["pipe"]) as (_, servers):
        target = provision.stamp_database(servers[0], "pipe_target")
        return benchlib.raw_pipe_seconds(
            benchlib.psql(), ctx.catalog.stamp("stamp-1").dsn, target, ctx.config.tenancy, None
        )


def _options(args: argparse.Namespace) -> ApplyOptions:
    return ApplyOptions(parallel=args.parallel, per_stamp=-(-args.parallel // 2))  # two targets


def via_engine(
    ctx: Context, plan_file: Path, args: argparse.Namespace, cohorts: Cohorts
) -> tuple[float, float, list[Ran]]:
    """Plan and apply through the engine in this process; the plan's and the apply's seconds and the entries run."""
    started = time.perf_counter()
    write_plan(plan_drain(ctx, "stamp-1", None, cohorts), plan_file)
    planned = time.perf_counter()
    result = run(ctx, prepare(ctx, plan_file), _options(args), Notes())
    applied = time.perf_counter()
    if result.status != "done":
        raise SystemExit(f"the drain did not finish: {result.status}")
    return planned - started, applied - planned, [Ran(r.tenants, r.status, r.seconds) for r in result.results]


def via_cli(
    info: FleetInfo, plan_file: Path, args: argparse.Namespace, cohorts: Cohorts
) -> tuple[float, float, list[Ran]]:
    """`migrator plan drain` then `migrator apply`, each a process; the plan's and the apply's seconds and the
    entries run."""
    cli = [sys.executable, "-m", "migrator", "--config", str(info.config_path)]
    cohort_flags = ["--cohort-rows", str(cohorts.rows), "--cohort-tenants", str(cohorts.tenants)]
    options = _options(args)
    started = time.perf_counter()
    subprocess.run(
        [*cli, "plan", "drain", "stamp-1", "-o", str(plan_file), *cohort_flags], check=True, stdout=subprocess.DEVNULL
    )
    planned = time.perf_counter()
    applied = subprocess.run(
        [
            *cli,
            "apply",
            str(plan_file),
            "--parallel",
            str(options.parallel),
            "--per-stamp",
            str(options.per_stamp),
            "--yes",
            "--json",
        ],
        check=True,
        stdout=subprocess.PIPE,
    )
    done = time.perf_counter()
    results = json.loads(applied.stdout)["results"]
    return planned - started, done - planned, [Ran(tuple(r["tenants"]), r["status"], r["seconds"]) for r in results]


def drain(
    base: Path, label: str, args: argparse.Namespace, cohorts: Cohorts, pipe: bool
) -> tuple[Drain, tuple[float, ...]]:
    """A fresh fleet, seeded, (with `pipe`, piped before and after) then drained under a writer; returns what
    the drain took and the pipes' seconds."""
    directory = base / label
    try:
        info, ctx, counts = seeded_fleet(directory, args)
        pipes = [raw_pipe(ctx)] if pipe else []
        stamps = {s.name: s.dsn for s in ctx.catalog.stamps()}
        sample = random.Random(7).sample(sorted(counts)[args.large :], min(args.writers, args.tenants))
        writers = [Workload(ctx.catalog.url, stamps, t, seed=t, rate=args.writer_rate).start() for t in sample]
        first_move = max((m.id for m in ctx.catalog.moves(limit=1)), default=0)
        plan_file = directory / "drain-stamp-1.yaml"
        if args.via == "cli":
            plan_s, apply_s, results = via_cli(info, plan_file, args, cohorts)
        else:
            plan_s, apply_s, results = via_engine(ctx, plan_file, args, cohorts)
        ran = [r for r in results if r.status != "skipped"]
        for writer in writers:
            writer.stop()
        failed = [r for r in ran if r.status != "done"]
        if failed or ctx.catalog.routes("stamp-1"):
            raise SystemExit(f"{label}: the drain did not finish: {failed[:3]}")
        for writer in writers:  # no acknowledged write lost
            if writer.errors:
                raise SystemExit(f"{label}: the writer of tenant {writer.tenant} saw errors: {writer.errors[:3]}")
            lost = writer.lost_writes(stamps[ctx.catalog.route(str(writer.tenant)).stamp])
            if lost:
                raise AssertionError("; ".join(lost))
        small = [r for r in ran if int(r.tenants[0]) > args.large]
        moves = [m for m in ctx.catalog.moves(limit=len(ran) + 10) if m.id > first_move]
        drained = Drain(
            label,
            len(ran),
            len(counts),
            sum(counts.values()),
            plan_s,
            apply_s,
            sum(r.seconds for r in small) / sum(len(r.tenants) for r in small) if small else None,
            max((m.freeze_ms or 0.0) for m in moves),
            sum(w.acked for w in writers),
        )
        print(f"{label}: planned in {plan_s:.1f} s, {drained.moves} moves in {apply_s:.1f} s", file=sys.stderr)
        if pipe:  # the source still holds every row (no cleanup), and the writers' few more
            pipes.append(raw_pipe(ctx))
        ctx.catalog.close()
        return drained, tuple(pipes)
    finally:
        if (directory / STATE_FILE).exists():  # also when fleet_up failed half-way
            stop_fleet(directory)


def _ms(seconds: float | None) -> str:
    """Milliseconds, or `-` where no move held only small tenants (a large one leads every cohort)."""
    return "-" if seconds is None else f"{seconds * 1000:.1f}"


def main() -> int:
    benchlib.stop_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tenants", type=int, default=1_000, help="small tenants on the drained stamp")
    parser.add_argument("--rows", type=int, default=1_000, help="about this many rows per small tenant")
    parser.add_argument("--large", type=int, default=3, help="large tenants on the drained stamp")
    parser.add_argument("--large-rows", type=int, default=50_000, help="rows per large tenant")
    parser.add_argument("--parallel", type=int, default=4, help="moves at once (--per-stamp half of it)")
    parser.add_argument("--writers", type=int, default=10, help="tenants the writer writes to")
    parser.add_argument("--writer-rate", type=float, default=20.0, help="writes/s per written tenant")
    parser.add_argument("--cohort-rows", type=int, default=Cohorts().rows, help="plan drain --cohort-rows")
    parser.add_argument("--cohort-tenants", type=int, default=Cohorts().tenants, help="plan drain --cohort-tenants")
    parser.add_argument("--skip-single", action="store_true", help="only the drain with cohorts")
    parser.add_argument(
        "--via", choices=["cli", "engine"], default="cli", help="`migrator` processes, or the engine in this process"
    )
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="migrator-bench-drain-"))
    base.chmod(0o755)
    try:
        cohorts, pipes = drain(base, "cohorts", args, Cohorts(args.cohort_rows, args.cohort_tenants), pipe=True)
        runs = [cohorts]
        if not args.skip_single:
            runs.append(drain(base, "one-per-tenant", args, Cohorts(tenants=1), pipe=False)[0])
    finally:
        shutil.rmtree(base, ignore_errors=True)
    rows = cohorts.rows
    print(f"stamp-1: {args.tenants} tenants x ~{args.rows:,} rows + {args.large} x {args.large_rows:,} = {rows:,} rows")
    pipe_s = sum(pipes) / len(pipes)
    print(
        f"raw psql binary COPY pipe of the stamp's rows  {pipe_s:8.2f} s  {rows / pipe_s:12,.0f} rows/s"
        f"  (before the drain {pipes[0]:.2f} s, after it {pipes[1]:.2f} s)"
    )
    print(f"drains via {args.via}, --parallel {args.parallel} --per-stamp {_options(args).per_stamp}")
    print()
    print(
        "drain            moves  plan s  apply s  whole s  speed  whole per tenant ms  move s per small tenant ms"
        "  longest freeze ms  acked writes"
    )
    for d in runs:
        print(
            f"{d.label:15} {d.moves:6}  {d.plan_s:6.2f}  {d.apply_s:7.2f}  {d.whole_s:7.2f}  {pipe_s / d.whole_s:4.2f}x"
            f"  {d.whole_s / d.tenants * 1000:19.1f}  {_ms(d.small_s_per_tenant):>26}  {d.longest_freeze_ms:17.1f}"
            f"  {d.acknowledged:12,}"
        )
    if len(runs) == 2:
        print(f"\ncohorts drain {runs[1].whole_s / runs[0].whole_s:.1f}x faster than one move per tenant")
    return 0


if __name__ == "__main__":
    sys.exit(main())
