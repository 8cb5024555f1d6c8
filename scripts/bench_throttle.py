"""Benchmark: an online move with a streaming standby, unthrottled and throttled, and the replica wait.

One local PostgreSQL server holds the catalog and stamps `a` and `b`; a streaming standby of it
(`pg_basebackup -R`, no apply delay) replays both. A tenant of ROWS rows is seeded on `a`, then:

1. baseline: moved `a -> b` unthrottled, with `--no-replica-wait`;
2. moved back `b -> a` with `--max-replica-lag LIMIT` (and `--no-replica-wait`);
3. moved `a -> b` unthrottled, with the replica wait (the default).

For each: the move's time, the standby's peak lag while the copy ran and over the whole move
(sampled every 0.1 s by `migrator.testing.standby.LagSampler`), the freeze, and the tenant's rows on
the standby at the moment the route flipped against the primary's (`FlipWatch`). Ratios are
against run 1. `scripts/bench throttle [--rows N] [--limit S]`. Every server is stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import benchlib  # scripts/, the directory of this script

from migrator import config as configlib
from migrator.config import Tenancy
from migrator.db import dsn as dsnlib
from migrator.local import pgserver, provision
from migrator.local.seed import TenantSpec, seed_fleet_stamp
from migrator.stamps.access import tenant_rows
from migrator.stamps.discovery import discover
from migrator.testing.standby import FlipWatch, LagSampler

TENANT = "1"


def _rows(dsn: str, tenancy: Tenancy) -> int:
    """The tenant's rows on a stamp (or its standby), every table of its layout."""
    with dsnlib.connect(dsn, autocommit=True) as conn:
        return sum(tenant_rows(conn, discover(conn, tenancy), TENANT).get(TENANT, {}).values())


def _move(config: Path, target: str, *flags: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "migrator", "--config", str(config), "move", TENANT, "--to", target, "--yes", "--json",
         *flags],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"move to {target} failed: {done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def _cleanup(config: Path, stamp: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "migrator", "--config", str(config), "cleanup", TENANT, "--stamp", stamp, "--yes"],
        capture_output=True, check=True,
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows of the moved tenant")
    parser.add_argument("--limit", type=float, default=1.0, help="--max-replica-lag of run 2, seconds")
    args = parser.parse_args()
    with benchlib.local_servers("migrator-bench-throttle-", ["primary"]) as (base, (server,)):
        standby = pgserver.start_standby(server, base / "standby", "r1")
        try:
            catalog, config = benchlib.catalog_with_config(server, base)
            dsns = {name: provision.stamp_database(server, f"stamp_{name}") for name in ("a", "b")}
            for name, dsn in dsns.items():
                catalog.add_stamp(name, dsn)
            print(f"seeding tenant {TENANT} with ~{args.rows:,} rows on a ...", flush=True)
            seed_fleet_stamp(dsns["a"], [TenantSpec(int(TENANT), args.rows)])
            catalog.set_route(TENANT, "a")
            tenancy = configlib.load(config).tenancy
            runs: list[Run] = []
            for number, (source, target, flags) in enumerate(
                (
                    ("a", "b", ("--no-replica-wait",)),
                    ("b", "a", ("--no-replica-wait", "--max-replica-lag", f"{args.limit:g}")),
                    ("a", "b", ()),
                ),
                start=1,
            ):
                database = f"stamp_{target}"

                def counts(target: str = target, database: str = database) -> dict[str, int]:
                    return {"standby": _rows(standby.dsn(database), tenancy), "primary": _rows(dsns[target], tenancy)}

                def copied(target: str = target) -> int:
                    with dsnlib.connect(dsns[target], autocommit=True) as conn:
                        row = conn.execute("SELECT count(*) FROM tasks WHERE tenant_id = %s", (int(TENANT),)).fetchone()
                    return int(row[0]) if row else 0

                started = time.monotonic()
                watch = FlipWatch(catalog.url, TENANT, target, counts)
                with LagSampler(server.dsn(), "r1", copied) as lag, watch as flip:
                    result = _move(config, target, *flags)
                seconds = time.monotonic() - started
                _cleanup(config, source)
                runs.append(Run.of(number, flags, seconds, result, lag, flip.seen))
                print(json.dumps(asdict(runs[-1])), flush=True)
        finally:
            standby.stop("immediate")
    print("\nrun  move s  x base  peak lag copying  peak lag  freeze ms  standby/primary rows at flip")
    for run in runs:
        print(
            f"{run.run:>3}  {run.seconds:>6.1f}  {run.seconds / runs[0].seconds:>6.2f}  {run.peak_lag_copying_s:>16}  "
            f"{run.peak_lag_s:>8}  {run.freeze_ms:>9.1f}  {run.standby_rows_at_flip}/{run.primary_rows_at_flip}"
            f"   {run.flags}"
        )


@dataclass(frozen=True)
class Run:
    """One move of the benchmark, as measured."""

    run: int
    flags: str
    seconds: float
    copy_s: float
    throttled_s: float
    standby_wait_s: float
    peak_lag_copying_s: float
    peak_lag_s: float
    freeze_ms: float
    standby_rows_at_flip: int | None
    primary_rows_at_flip: int | None

    @classmethod
    def of(
        cls, number: int, flags: tuple[str, ...], seconds: float, result: dict[str, Any], lag: LagSampler,
        seen: dict[str, int],
    ) -> Run:  # fmt: skip
        timings = result["seconds"]
        return cls(
            number,
            " ".join(flags) or "(defaults: replica wait)",
            round(seconds, 1),
            timings.get("copy", 0.0),
            timings.get("throttled", 0.0),
            timings.get("standby_wait", 0.0),
            round(max((x for _, x, _ in lag.copying()), default=0.0), 2),
            round(lag.peak, 2),
            float(result["move"]["freeze_ms"] or 0.0),
            seen.get("standby"),
            seen.get("primary"),
        )


if __name__ == "__main__":
    main()
