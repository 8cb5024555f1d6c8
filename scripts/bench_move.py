"""Benchmark: the move's copy phase against a raw `psql` binary COPY pipe, plus verify time and peak RSS.

One run, on separate local PostgreSQL servers (source and target): a tenant of ROWS rows is
seeded on the source; the baseline pipes each tenant table with
`psql -c "COPY (SELECT ...) TO STDOUT (FORMAT binary)" | psql -c "COPY ... FROM STDIN (FORMAT binary)"`
into a fresh target database, before and after `migrator move --offline` runs as its own process
into another fresh target database. The move's copy phase is the time it reports for its copy step
(`seconds.copy` of `--json`: every table, every batch's cursor committed), verify with
`migrator verify`, peak RSS from the child's rusage. Prints ratios, because these machines are noisy.
`scripts/bench move [--rows N]`.
Every server is stopped at the end; nothing is written to the repository.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import benchlib  # scripts/, the directory of this script
from psycopg import sql

from migrator import config as configlib
from migrator.db import dsn as dsnlib
from migrator.local import pgserver, provision
from migrator.local.seed import TenantSpec, seed_fleet_stamp
from migrator.stamps.discovery import discover

TENANT = 1


def _pipe(psql: Path, source: str, target: str, select: str, insert: str) -> None:
    out = subprocess.Popen([str(psql), "-X", "-q", "-d", source, "-c", select], stdout=subprocess.PIPE)
    inp = subprocess.run([str(psql), "-X", "-q", "-d", target, "-c", insert], stdin=out.stdout, check=True)
    assert out.stdout is not None
    out.stdout.close()
    if out.wait() != 0 or inp.returncode != 0:
        raise SystemExit("raw psql pipe failed")


def raw_pipe_seconds(psql: Path, source: str, target: str) -> float:
    with dsnlib.connect(source, autocommit=True) as conn:
        layout = discover(conn, configlib.Tenancy())
        statements = []
        for table in layout.tables:
            where = sql.SQL("{} = {}").format(sql.Identifier(table.key), sql.Literal(str(TENANT)))
            select = (
                sql.SQL("COPY (SELECT {} FROM {} WHERE {} ORDER BY {}) TO STDOUT (FORMAT binary)")
                .format(table.cols(), table.ident, where, table.pk_cols())
                .as_string(conn)
            )
            insert = (
                sql.SQL("COPY {} ({}) FROM STDIN (FORMAT binary)").format(table.ident, table.cols()).as_string(conn)
            )
            statements.append((select, str(insert)))
    started = time.monotonic()
    for select, insert in statements:
        _pipe(psql, source, target, select, insert)
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2_000_000, help="rows of the moved tenant")
    parser.add_argument("--batch-rows", type=int, default=50_000, help="rows per copy batch (the tool's default)")
    args = parser.parse_args()
    with benchlib.local_servers("migrator-bench-move-", ["source", "target"]) as (base, servers):
        source = provision.stamp_database(servers[0], "source")
        pipe_targets = [provision.stamp_database(servers[1], f"pipe_target_{i}") for i in (1, 2)]
        move_target = provision.stamp_database(servers[1], "move_target")
        catalog, config = benchlib.catalog_with_config(servers[0], base)
        print(f"seeding tenant {TENANT} with ~{args.rows:,} rows ...", file=sys.stderr)
        rows = seed_fleet_stamp(source, [TenantSpec(TENANT, args.rows)])[TENANT]
        catalog.add_stamp("source", source)
        catalog.add_stamp("target", move_target)
        catalog.set_route(str(TENANT), "source")

        psql = pgserver.pg_bindir() / "psql"
        if not psql.exists():
            psql = Path(shutil.which("psql") or "psql")
        # The pipe runs before and after the move, into two fresh databases: the baseline is their
        # mean, so a noisy neighbour during one of them shows in the spread rather than the ratio.
        raw_before = raw_pipe_seconds(psql, source, pipe_targets[0])

        cli = [sys.executable, "-m", "migrator", "--config", str(config)]
        started = time.monotonic()
        moved = subprocess.run(
            [
                *cli,
                "move",
                str(TENANT),
                "--to",
                "target",
                "--offline",
                "--yes",
                "--json",
                "--batch-rows",
                str(args.batch_rows),
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        move_total = time.monotonic() - started
        peak_rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        seconds = json.loads(moved.stdout)["seconds"]
        raw_after = raw_pipe_seconds(psql, source, pipe_targets[1])
        raw = (raw_before + raw_after) / 2
        started = time.monotonic()
        verify = subprocess.run(
            [*cli, "verify", str(TENANT), "--source", "source", "--target", "target", "--json"],
            check=True,
            capture_output=True,
            text=True,
        )
        verify_s = time.monotonic() - started
        assert json.loads(verify.stdout)["equal"] is True
        copy_s = seconds["copy"]
        print(f"tenant rows                 {rows:,}")
        spread = f"(before the move {raw_before:.2f}, after {raw_after:.2f})"
        print(f"raw psql binary COPY pipe   {raw:8.2f} s  {rows / raw:12,.0f} rows/s  {spread}")
        print(f"migrator move (offline)     {move_total:8.2f} s  (process: preflight, fence, copy, verify, flip)")
        print(f"  copy phase                {copy_s:8.2f} s  {rows / copy_s:12,.0f} rows/s  (cursors committed)")
        print(f"  copy throughput ratio     {raw / copy_s:8.2f} x the raw pipe (target >= 0.9)")
        print(f"  verify inside the move    {seconds.get('verify', 0.0):8.2f} s")
        print(f"verify command (both sides) {verify_s:8.2f} s")
        print(f"peak RSS of migrator        {peak_rss_mb:8.1f} MB (target < 200 MB)")


if __name__ == "__main__":
    main()
