"""Benchmark: a whole online move and its copy step against a raw `psql` binary COPY pipe, for
--jobs 1, 2 and 4, with and without trigger-free target sessions; verify time and peak RSS.

One run, on separate local PostgreSQL servers (source and target): a tenant of ROWS rows is
seeded on the source; the baseline pipes each tenant table with
`psql -c "COPY (SELECT ...) TO STDOUT (FORMAT binary)" | psql -c "COPY ... FROM STDIN (FORMAT binary)"`
into a fresh target database, before and after the moves. Each cell of the matrix is its own
`migrator move` process (online, the default) with its own catalog, a clone of the seeded source
and a fresh target: `replica` as the superuser (no foreign-key checks or triggers for migrator's
writes, the references proven before the flip), `checked` as a plain role that may not set
`session_replication_role` (the target checks every foreign key as rows arrive). The copy step is
`seconds.copy` of `--json`, catch-up plus verify `seconds.sync`; `migrator verify --jobs N` runs
after each replica cell; peak RSS and CPU seconds are the move process's own (wait4), and the CPU
seconds each server spent during the move (a profile: source, target, client). Prints ratios,
because these machines are noisy.
`scripts/bench move [--rows N] [--jobs 1,2,4] [--modes replica,checked] [--schema sample|peer]`.
Every server is stopped at the end; nothing is written to the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import benchlib  # scripts/, the directory of this script
from benchschemas import SCHEMAS, BenchSchema
from psycopg import sql
from psycopg.conninfo import make_conninfo

from migrator.db import dsn as dsnlib
from migrator.local import pgserver, provision

TENANT = 1


CHECKED_ROLE = "bench_mover"


def _checked_role(server: pgserver.LocalServer) -> str:
    """A plain role on the target server (no session_replication_role); returns its password."""
    password = secrets.token_urlsafe(16)
    with dsnlib.connect(server.dsn("postgres"), autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(CHECKED_ROLE), sql.Literal(password))
        )
    return password


def _grant_checked(server: pgserver.LocalServer, db: str, password: str) -> str:
    """What a move needs on a target database, granted to the plain role; returns its DSN."""
    role = sql.Identifier(CHECKED_ROLE)
    with dsnlib.connect(server.dsn(db), autocommit=True) as conn:
        for statement in (
            sql.SQL("GRANT CONNECT, CREATE, TEMPORARY ON DATABASE {} TO {}").format(sql.Identifier(db), role),
            sql.SQL("GRANT USAGE ON SCHEMA public TO {}").format(role),
            sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {}").format(role),
            sql.SQL("GRANT USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA public TO {}").format(role),
        ):
            conn.execute(statement)
    return make_conninfo(server.dsn(db), user=CHECKED_ROLE, password=password)


def _timed_process(argv: list[str]) -> tuple[float, float, str, float]:
    """Run a process; returns its wall seconds, its own peak RSS in MB and CPU seconds (wait4), its stdout."""
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stderr is not None
    with ThreadPoolExecutor(max_workers=2) as pool:
        out, err = pool.submit(proc.stdout.read), pool.submit(proc.stderr.read)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.monotonic() - started
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(argv[3:])} failed: {err.result()[-2000:]}")
        return wall, usage.ru_maxrss / 1024, out.result(), usage.ru_utime + usage.ru_stime


@dataclass(frozen=True)
class Cell:
    mode: str
    jobs: int
    move_s: float
    copy_s: float
    sync_s: float
    freeze_ms: float
    rss_mb: float
    write_mode: str
    verify_s: float | None
    cpu_s: tuple[float, float, float]  # the move's CPU seconds: source server, target server, migrator
    steps_s: dict[str, float]  # the move's own timings (`--json` seconds)

    @property
    def fixed_s(self) -> float:
        """The move's time outside its timed steps: process start and imports, preflight, catalog round
        trips, the record of what moved, connections."""
        timed = ("guard", "copy", "sync", "cutover")
        return self.move_s - sum(self.steps_s.get(step, 0.0) for step in timed)


def _cell(
    servers: list[pgserver.LocalServer],
    base: Path,
    schema: BenchSchema,
    mode: str,
    jobs: int,
    batch_rows: int,
    password: str,
) -> Cell:
    """One online move of the seeded tenant, from a clone of the source into a fresh target."""
    name = f"{mode}_{jobs}"
    catalog, config = benchlib.catalog_with_config(servers[0], base, f"catalog_{name}", schema.tenancy)
    source = provision.create_database(servers[0], f"source_{name}", template="source")
    target = schema.create(servers[1], f"target_{name}")
    if mode == "checked":
        target = _grant_checked(servers[1], f"target_{name}", password)
    catalog.add_stamp("source", source)
    catalog.add_stamp("target", target)
    catalog.set_route(str(TENANT), "source")
    catalog.close()
    cli = [sys.executable, "-m", "migrator", "--config", str(config)]
    chosen = ["--jobs", str(jobs)] if jobs else []  # 0: the tool's default
    move = [*cli, "move", str(TENANT), "--to", "target", "--yes", "--json", *chosen]
    before = [benchlib.server_cpu_seconds(s) for s in servers]
    wall, rss, out, client_cpu = _timed_process([*move, "--batch-rows", str(batch_rows)])
    time.sleep(0.5)  # the move's backends exit and are reaped
    source_cpu, target_cpu = (benchlib.server_cpu_seconds(s) - b for s, b in zip(servers, before, strict=True))
    moved = json.loads(out)
    verify_s = None
    if mode == "replica":
        verify_s, _, out, _ = _timed_process([*cli, "verify", str(TENANT), "--source", "source", "--target", "target",
                                           "--json", *chosen])  # fmt: skip
        assert json.loads(out)["equal"] is True
    seconds = moved["seconds"]
    return Cell(
        mode, jobs, wall, seconds["copy"], seconds["sync"], moved["move"]["freeze_ms"], rss,
        moved["move"]["write_mode"], verify_s, (source_cpu, target_cpu, client_cpu), seconds,
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2_000_000, help="rows of the moved tenant")
    parser.add_argument("--batch-rows", type=int, default=50_000, help="rows per copy batch (the tool's default)")
    parser.add_argument("--jobs", default="1,2,4", help="values of --jobs to run, comma-separated; 0: the default")
    parser.add_argument("--modes", default="replica,checked", help="target session modes to run")
    parser.add_argument("--schema", choices=sorted(SCHEMAS), default="sample", help="whose schema the tenant lives in")
    args = parser.parse_args()
    schema = SCHEMAS[args.schema]
    jobs = [int(j) for j in args.jobs.split(",")]
    modes = args.modes.split(",")
    with benchlib.local_servers("migrator-bench-move-", ["source", "target"]) as (base, servers):
        source = schema.create(servers[0], "source")
        pipe_targets = [schema.create(servers[1], f"pipe_target_{i}") for i in (1, 2)]
        print(f"seeding tenant {TENANT} of the {schema.name} schema with ~{args.rows:,} rows ...", file=sys.stderr)
        rows = schema.seed(source, TENANT, args.rows)
        password = _checked_role(servers[1])

        psql = benchlib.psql()
        # The pipe runs before and after the moves, into two fresh databases: the baseline is their
        # mean, so a noisy neighbour during one of them shows in the spread rather than the ratio.
        raw_before = benchlib.raw_pipe_seconds(psql, source, pipe_targets[0], schema.tenancy, (str(TENANT),))
        cells = []
        for mode in modes:
            for n in jobs:
                print(f"move: {mode}, --jobs {n} ...", file=sys.stderr)
                cells.append(_cell(servers, base, schema, mode, n, args.batch_rows, password))
        raw_after = benchlib.raw_pipe_seconds(psql, source, pipe_targets[1], schema.tenancy, (str(TENANT),))
        raw = (raw_before + raw_after) / 2

        print(f"tenant rows                 {rows:,} ({schema.name} schema)")
        spread = f"(before the moves {raw_before:.2f}, after {raw_after:.2f})"
        print(f"raw psql binary COPY pipe   {raw:8.2f} s  {rows / raw:12,.0f} rows/s  {spread}")
        print()
        print(
            "mode     jobs  copy s  copy/pipe  move s  move/pipe  sync s  sync/copy  cutover s  fixed s"
            "  verify s  verify/copy  freeze ms  RSS MB  CPU s: source target migrator"
        )
        for c in cells:
            verify = f"{c.verify_s:8.2f}  {c.verify_s / c.copy_s:11.2f}" if c.verify_s is not None else " " * 21
            print(
                f"{c.write_mode:8} {c.jobs or 'def':>4}  {c.copy_s:6.2f}  {raw / c.copy_s:8.2f}x  {c.move_s:6.2f}"
                f"  {raw / c.move_s:8.2f}x  {c.sync_s:6.2f}  {c.sync_s / c.copy_s:9.2f}"
                f"  {c.steps_s.get('cutover', 0.0):9.2f}  {c.fixed_s:7.2f}  {verify}"
                f"  {c.freeze_ms:9.1f}  {c.rss_mb:6.1f}"
                f"  {c.cpu_s[0]:13.1f} {c.cpu_s[1]:6.1f} {c.cpu_s[2]:8.1f}"
            )
        print()
        print("copy/pipe and move/pipe: throughput against the raw pipe (targets: whole online move >= 1.8x")
        print("replica, copy >= 1.1x checked); sync/copy: the catch-up and verify of the idle tenant against the")
        print("copy step (target <= 0.25); fixed s: the move process's time outside guard, copy, sync and cutover")
        print("(start, imports, preflight, catalog, the record of what moved); verify/copy: `migrator verify`, which")
        print("compares every row; CPU s: CPU seconds the whole move cost each server and the migrator process")


if __name__ == "__main__":
    main()
