"""Benchmark: `migrator worker` processes against a local run, for a schema rollout over many small
stamps and for a drain of many tiny tenants; each part proves its run did what it claims.

rollout: STAMPS stamp databases spread over SERVERS local PostgreSQL servers (`benchlib.local_servers`;
the catalog on the first), cloned (`CREATE DATABASE ... TEMPLATE`) from one template per server
that Alembic upgraded to the sample application's 0002_collaboration, registered in the catalog.
WORKERS `migrator worker --concurrency 1` processes are started and, once all are live, `migrator
schema upgrade --queue --connections-per-server BUDGET --yes --wait --json` is timed, from its
start until it returns. Meanwhile every 50 ms each server is asked how many client sessions are
open on stamp databases (`pg_stat_activity`, datname `stamp_%`, backend_type 'client backend', so
autovacuum and the catalog are left out), and the peak per server is kept: while the stamps
migrate (after the command said it queued the rollout) it must stay within BUDGET, and before that,
while the command reads every stamp's revision, too (shown apart). Then the proof that every stamp reached
head exactly once: each stamp's `alembic_version` is head, the run's `schema_runs` hold exactly one
row per stamp, each 'ok', the canary's row finished before any other started, the rows' own
spans never overlap more than BUDGET per server, the workers' logs show one step returned per
stamp, 'ok', and no job of the run is left in the queue unfinished or failed. The baseline, in
the same run, after the workers stopped: the first BASELINE_STAMPS stamps (default all) dropped
and cloned again from the template, registered in a second catalog, and a local `migrator schema
upgrade --parallel WORKERS --yes --json` of them timed the same way (with --baseline-stamps below
STAMPS, on that sample only: the output says so, and compares stamps/s).

drain: a fresh local fleet (`migrator.local.fleet`: the catalog and 3 stamps on 3 servers) whose
stamp-1 holds TENANTS tenants of ROWS rows each, drained onto stamp-2 and stamp-3 in cohorts of at
most COHORT_TENANTS tenants (`plan_drain` + `write_plan`), twice on identical fresh fleets: (a) a
local `migrator apply FILE --parallel WORKERS --per-stamp PER_STAMP --yes --json`; (b) WORKERS
`migrator worker --concurrency 1` processes, once live, then `migrator apply FILE --queue
--per-stamp PER_STAMP --yes` and `migrator plan wait FILE --json`, timed from the enqueue until
the wait returns. A writer (`migrator.testing.writer`) writes to WRITERS of the tenants in both;
afterwards every write it was acknowledged must be on the tenant's new stamp. Checked for both:
every tenant routed to the target the plan gave it, exactly one flipped move per tenant (catalog
`moves` / `move_tenants`), and each tenant's rows on the targets as many as were seeded (the
written tenants excepted: the writer checks them) and on no other target.

Every figure is a plain line on stdout (notes on stderr), then a summary; exit 1 when a check failed.

    scripts/bench workers [--part rollout|drain|all] [--workers 3]
                          [--stamps 1000 --servers 3 --budget 2 --baseline-stamps N]
                          [--tenants 1000 --rows 50 --cohort-tenants 100 --per-stamp 2 --writers 5]

Every server and worker process is stopped at the end; nothing is written to the repository.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

import benchlib  # scripts/, the directory of this script
import psycopg
from psycopg import sql

from migrator import config as configlib
from migrator.catalog import Phase
from migrator.context import Context
from migrator.db import alembic as migrations
from migrator.db import dsn as dsnlib
from migrator.local import pgserver, provision
from migrator.local.fleet import STATE_FILE
from migrator.local.fleet import fleet_down as stop_fleet
from migrator.local.seed import TenantSpec
from migrator.plans.planners import Cohorts, load_plan, plan_drain, write_plan
from migrator.queue.app import live_workers
from migrator.stamps import access
from migrator.stamps.discovery import discover
from migrator.testing.writer import Workload

START = "0002_collaboration"
HEAD = "0006_task_checklists"
TEMPLATE = "tpl_0002_collaboration"  # not `stamp_...`: never counted as a stamp's session
STAMP_DB_PATTERN = r"stamp\_%"
SAMPLE_S = 0.05
WORKER_STOP_S = 60.0
SESSIONS = sql.SQL(
    "SELECT count(*) FROM pg_stat_activity WHERE datname LIKE {} AND backend_type = 'client backend'"
).format(sql.Literal(STAMP_DB_PATTERN))


# -- processes --------------------------------------------------------------------------------------------


def migrator_args(config: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "migrator", "--config", str(config), *args]


@dataclass(frozen=True)
class CliRun:
    """One `migrator` command run to its end: how long it took, its exit code, stdout, timed stderr lines."""

    args: tuple[str, ...]
    seconds: float
    returncode: int
    stdout: str
    stderr: tuple[tuple[float, str], ...]  # (time.monotonic() when read, line)

    def first_line(self, prefix: str) -> float | None:
        """When the first stderr line starting with `prefix` came (time.monotonic()), if any did."""
        return next((at for at, line in self.stderr if line.startswith(prefix)), None)

    def failure(self) -> str:
        tail = "\n".join(line for _, line in self.stderr[-15:])
        return f"`migrator {' '.join(self.args)}` exited {self.returncode}:\n{tail}"

    def json(self) -> Any:
        return json.loads(self.stdout)


def run_cli(config: Path, args: Sequence[str], cwd: Path) -> CliRun:
    """Run `python -m migrator --config CONFIG ARGS` in `cwd`, timed from its start until it exits."""
    started = time.monotonic()
    proc = subprocess.Popen(
        migrator_args(config, *args), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    lines: list[tuple[float, str]] = []

    def read_stderr() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append((time.monotonic(), line.rstrip("\n")))

    reader = threading.Thread(target=read_stderr, name="cli-stderr", daemon=True)
    reader.start()
    try:
        assert proc.stdout is not None
        out = proc.stdout.read()
        code = proc.wait()
        seconds = time.monotonic() - started
    finally:
        if proc.poll() is None:  # interrupted (SIGTERM, Ctrl-C): the command goes too
            proc.terminate()
            try:
                proc.wait(timeout=WORKER_STOP_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    reader.join(timeout=10)
    return CliRun(tuple(args), seconds, code, out, tuple(lines))


@dataclass
class Workers:
    """`migrator worker --concurrency 1` processes, each logging to its own file in the directory."""

    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)
    _files: list[TextIO] = field(default_factory=list)
    exit_codes: list[int] = field(default_factory=list)

    def tail(self, lines: int = 10) -> str:
        return "\n".join(
            f"--- {log.name} ---\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
            for log in self.logs
            if log.exists()
        )


@contextmanager
def worker_pool(config: Path, directory: Path, count: int) -> Iterator[Workers]:
    """`count` worker processes (cwd `directory`); SIGTERM to each at the end, kill -9 if one does not stop."""
    pool = Workers()
    try:
        for i in range(1, count + 1):
            log = directory / f"worker-{i}.log"
            handle = log.open("w")
            pool.logs.append(log)
            pool._files.append(handle)
            args = migrator_args(config, "worker", "--concurrency", "1", "--name", f"bench-worker-{i}")
            pool.procs.append(subprocess.Popen(args, cwd=directory, stdout=handle, stderr=subprocess.STDOUT))
        yield pool
    finally:
        for proc in pool.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in pool.procs:
            try:
                pool.exit_codes.append(proc.wait(timeout=WORKER_STOP_S))
            except subprocess.TimeoutExpired:
                proc.kill()
                pool.exit_codes.append(proc.wait())
        for file in pool._files:
            file.close()


def wait_live(ctx: Context, pool: Workers, timeout_s: float = 120.0) -> float:
    """Seconds until every worker of the pool has a heartbeat in the catalog."""
    started = time.monotonic()
    while live_workers(ctx) < len(pool.procs):
        if any(proc.poll() is not None for proc in pool.procs):
            raise SystemExit(f"a worker exited at start:\n{pool.tail()}")
        if time.monotonic() - started > timeout_s:
            raise SystemExit(f"the workers were not live after {timeout_s:.0f} s:\n{pool.tail()}")
        time.sleep(0.1)
    return time.monotonic() - started


# -- sessions on the servers --------------------------------------------------------------------------------


class SessionSampler:
    """Every SAMPLE_S, each server's count of client sessions on stamp databases, kept with its time."""

    def __init__(self, servers: Sequence[pgserver.LocalServer]) -> None:
        self.servers = list(servers)
        self.samples: list[tuple[float, tuple[int, ...]]] = []
        self._stop = threading.Event()
        self._conns: list[psycopg.Connection[Any]] = []
        self._thread = threading.Thread(target=self._run, name="session-sampler", daemon=True)
        self.error: str | None = None

    def __enter__(self) -> SessionSampler:
        self._conns = [dsnlib.connect(s.dsn("postgres"), autocommit=True) for s in self.servers]
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        for conn in self._conns:
            conn.close()

    def _run(self) -> None:
        try:
            while True:
                counts = []
                for conn in self._conns:
                    row = conn.execute(SESSIONS).fetchone()
                    counts.append(int(row[0]) if row else 0)
                self.samples.append((time.monotonic(), tuple(counts)))
                if self._stop.wait(SAMPLE_S):
                    return
        except psycopg.Error as exc:  # reported, never a hang
            self.error = str(exc).strip().splitlines()[0]

    def peaks(self, since: float | None = None, until: float | None = None) -> list[int]:
        """Per server, the largest count sampled in [since, until]."""
        chosen = [c for t, c in self.samples if (since is None or t >= since) and (until is None or t <= until)]
        return [max((c[i] for c in chosen), default=0) for i in range(len(self.servers))]

    def interval_ms(self) -> float:
        times = [t for t, _ in self.samples]
        return 1000 * (times[-1] - times[0]) / max(1, len(times) - 1) if len(times) > 1 else 0.0


# -- rollout ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StampDb:
    name: str  # in the catalog
    database: str
    server: int  # index into the servers


def fleet_layout(stamps: int, servers: int) -> list[StampDb]:
    width = max(4, len(str(stamps)))
    return [StampDb(f"stamp-{n:0{width}d}", f"stamp_{n:0{width}d}", (n - 1) % servers) for n in range(1, stamps + 1)]


def make_template(server: pgserver.LocalServer) -> None:
    """The stamps' template on this server: the sample application's history up to START."""
    migrations.upgrade(provision.create_database(server, TEMPLATE), provision.sample_app_env(), START)


def clone(server: pgserver.LocalServer, databases: Sequence[str], replace: bool) -> None:
    """The databases as copies of the template (`replace`: dropping them first), on one session."""
    with dsnlib.connect(server.dsn("postgres"), autocommit=True) as conn:
        for name in databases:
            if replace:
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
            conn.execute(
                sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name), sql.Identifier(TEMPLATE))
            )


def per_server(
    servers: Sequence[pgserver.LocalServer], stamps: Sequence[StampDb]
) -> list[tuple[pgserver.LocalServer, list[StampDb]]]:
    return [(server, [s for s in stamps if s.server == i]) for i, server in enumerate(servers)]


def clone_all(servers: Sequence[pgserver.LocalServer], stamps: Sequence[StampDb], replace: bool) -> float:
    """Clone every stamp's database, the servers in parallel; returns the seconds it took."""
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=len(servers)) as pool:
        done = [
            pool.submit(clone, srv, [s.database for s in mine], replace) for srv, mine in per_server(servers, stamps)
        ]
        for future in done:
            future.result()
    return time.monotonic() - started


def read_revisions(servers: Sequence[pgserver.LocalServer], stamps: Sequence[StampDb]) -> dict[str, list[str]]:
    """Each stamp's `alembic_version` rows, read on the stamp itself (one session at a time per server)."""

    def read(server: pgserver.LocalServer, mine: list[StampDb]) -> dict[str, list[str]]:
        found = {}
        for stamp in mine:
            with dsnlib.connect(server.dsn(stamp.database), autocommit=True) as conn:
                found[stamp.name] = [str(r[0]) for r in conn.execute("SELECT version_num FROM alembic_version")]
        return found

    with ThreadPoolExecutor(max_workers=len(servers)) as pool:
        parts = [pool.submit(read, srv, mine) for srv, mine in per_server(servers, stamps)]
        return {name: rows for part in parts for name, rows in part.result().items()}


def max_overlap(spans: Sequence[tuple[datetime, datetime]]) -> int:
    """The most spans open at one instant (a span ending exactly when another starts does not overlap it)."""
    events = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    depth = peak = 0
    for _, step in events:
        depth += step
        peak = max(peak, depth)
    return peak


def fmt_peaks(peaks: Sequence[int]) -> str:
    return ", ".join(f"server-{i + 1} {p}" for i, p in enumerate(peaks))


@dataclass
class RolloutResult:
    stamps: int
    servers: int
    budget: int
    queued_s: float = 0.0
    step_peaks: list[int] = field(default_factory=list)
    local_stamps: int = 0
    local_s: float = 0.0
    local_peaks: list[int] = field(default_factory=list)
    exactly_once: bool = False
    problems: list[str] = field(default_factory=list)


def check_queued_rollout(
    ctx: Context,
    servers: Sequence[pgserver.LocalServer],
    stamps: Sequence[StampDb],
    out: dict[str, Any],
    budget: int,
    pool: Workers,
    result: RolloutResult,
) -> None:
    """Prove every stamp reached head exactly once, the canary first, within the budget; print each fact."""
    run_id, canary = str(out["run_id"]), out["canary"]
    names = {s.name for s in stamps}
    revisions = read_revisions(servers, stamps)
    at_head = sorted(n for n, rows in revisions.items() if rows == [HEAD])
    print(f"  stamps whose alembic_version is {HEAD}: {len(at_head)}/{len(stamps)}")
    if len(at_head) != len(stamps):
        wrong = sorted(set(names) - set(at_head))[:5]
        result.problems.append(f"rollout: {len(stamps) - len(at_head)} stamp(s) not at head, e.g. {wrong}")
    with ctx.catalog.transaction() as conn:
        rows = conn.execute(
            "SELECT stamp, result, started_at, finished_at FROM schema_runs WHERE run_id = %s ORDER BY id", (run_id,)
        ).fetchall()
        jobs = conn.execute(  # succeeded jobs may be deleted (the worker's delete_jobs): only the rest counts
            "SELECT args->>'stamp', status::text FROM procrastinate_jobs"
            " WHERE task_name = 'migrator.schema_step' AND args->>'run_id' = %s",
            (run_id,),
        ).fetchall()
    per_stamp: dict[str, list[tuple[str, datetime, datetime | None]]] = {}
    for stamp, outcome, started, finished in rows:
        per_stamp.setdefault(stamp, []).append((outcome, started, finished))
    once_ok = set(per_stamp) == names and all(len(v) == 1 and v[0][0] == "ok" for v in per_stamp.values())
    print(
        f"  schema_runs of run {run_id}: {len(rows)} rows for {len(per_stamp)} stamps; exactly one 'ok' row each: "
        f"{'yes' if once_ok else 'NO'}"
    )
    if not once_ok:
        bad = sorted(n for n in names if [o for o, _, _ in per_stamp.get(n, [])] != ["ok"])[:5]
        result.problems.append(f"rollout: schema_runs not one 'ok' row per stamp, e.g. {bad}")
    others = [started for stamp, v in per_stamp.items() if stamp != canary for _, started, _ in v]
    canary_end = per_stamp.get(canary, [("", None, None)])[0][2]
    first = canary_end is not None and all(canary_end <= s for s in others)
    lead = f"{(min(others) - canary_end).total_seconds() * 1000:.0f} ms" if first and others and canary_end else "-"
    print(
        f"  canary {canary} finished before any other stamp's row started: {'yes' if first else 'NO'} "
        f"(the next started {lead} after it)"
    )
    if not first:
        result.problems.append(f"rollout: the canary {canary} did not finish before the others started")
    server_of = {s.name: s.server for s in stamps}
    overlaps = [
        max_overlap(
            [(st, fin) for stamp, v in per_stamp.items() if server_of.get(stamp) == i for _, st, fin in v if fin]
        )
        for i in range(len(servers))
    ]
    print(f"  most steps at once per server from schema_runs' own spans: {fmt_peaks(overlaps)} (budget {budget})")
    if max(overlaps, default=0) > budget:
        result.problems.append(f"rollout: schema_runs spans overlap beyond the budget: {overlaps}")
    steps: dict[str, list[str]] = {}  # what each worker said as a step returned: "schema  NAME: RESULT"
    for log in pool.logs:
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("schema  ") and ": " in line:
                stamp, said = line[len("schema  ") :].split(": ", 1)
                steps.setdefault(stamp, []).append(said)
    one_step = set(steps) == names and all(v == ["ok"] for v in steps.values())
    left = sorted({status for _, status in jobs if status != "succeeded"})
    print(
        f"  workers' logs: {sum(map(len, steps.values()))} steps returned for {len(names)} stamps, one 'ok' each: "
        f"{'yes' if one_step else 'NO'}; schema_step jobs left in the queue not succeeded: {len(left) or 'none'}"
        f"{' ' + str(left) if left else ''}"
    )
    if not one_step:
        bad = sorted(n for n in names if steps.get(n) != ["ok"])[:5]
        result.problems.append(
            f"rollout: the workers did not run one 'ok' step per stamp, e.g. {bad}: {[steps.get(n) for n in bad]}"
        )
    if left:
        result.problems.append(f"rollout: schema_step jobs of the run left {left}")
    result.exactly_once = len(at_head) == len(stamps) and once_ok and first and one_step and not left


def rollout_part(args: argparse.Namespace) -> RolloutResult:
    result = RolloutResult(args.stamps, args.servers, args.budget)
    names = [f"server-{i + 1}" for i in range(args.servers)]
    stamps = fleet_layout(args.stamps, args.servers)
    local_n = args.baseline_stamps or args.stamps
    print(
        f"rollout: {args.stamps} stamps {START} -> {HEAD} on {args.servers} servers, "
        f"{args.workers} workers --concurrency 1, --connections-per-server {args.budget}"
    )
    with benchlib.local_servers("migrator-bench-workers-", names) as (base, servers):
        catalog, config = benchlib.catalog_with_config(servers[0], base)
        started = time.monotonic()
        for server in servers:  # one after the other: Alembic's context is global to the process
            make_template(server)
        template_s = time.monotonic() - started
        clone_s = clone_all(servers, stamps, replace=False)
        for stamp in stamps:
            catalog.add_stamp(stamp.name, servers[stamp.server].dsn(stamp.database), region=names[stamp.server])
        catalog.close()
        print(
            f"  {len(servers)} templates at {START} in {template_s:.1f} s, {len(stamps)} stamp databases cloned "
            f"in {clone_s:.1f} s, registered"
        )
        ctx = Context.load(config)
        try:
            with worker_pool(config, base, args.workers) as pool:
                print(f"  {args.workers} workers live after {wait_live(ctx, pool):.1f} s")
                upgrade = ["schema", "upgrade", "--queue", "--connections-per-server", str(args.budget)]
                with SessionSampler(servers) as sampler:
                    began = time.monotonic()
                    run = run_cli(config, [*upgrade, "--yes", "--wait", "--json"], base)
            print(f"  workers stopped (exit codes {pool.exit_codes})")
            if any(code != 0 for code in pool.exit_codes):
                result.problems.append(f"rollout: a worker exited non-zero: {pool.exit_codes}")
            if run.returncode != 0:
                result.problems.append(run.failure())
                print(f"FAILED: {run.failure()}\n{pool.tail()}", file=sys.stderr)
                return result
            queued_at = run.first_line("rollout ") or began
            result.queued_s = run.seconds
            result.step_peaks = sampler.peaks(since=queued_at)
            survey = sampler.peaks(until=queued_at)
            print(
                f"  queued rollout (schema upgrade --queue --wait): {run.seconds:.2f} s wall, "
                f"{args.stamps / run.seconds:.1f} stamps/s (planned and queued after {queued_at - began:.2f} s)"
            )
            within = max(result.step_peaks, default=0) <= args.budget
            survey_within = max(survey, default=0) <= args.budget
            print(
                f"  peak stamp sessions per server while the steps ran: {fmt_peaks(result.step_peaks)} "
                f"(budget {args.budget}: {'within' if within else 'EXCEEDED'}; "
                f"{len(sampler.samples)} samples, every {sampler.interval_ms():.0f} ms)"
            )
            print(
                f"  peak stamp sessions per server before, while it read every stamp's revision: {fmt_peaks(survey)} "
                f"(budget {args.budget}: {'within' if survey_within else 'EXCEEDED'})"
            )
            if sampler.error:
                result.problems.append(f"rollout: the session sampler stopped: {sampler.error}")
            if not within:
                result.problems.append(f"rollout: stamp sessions {result.step_peaks} beyond the budget {args.budget}")
            if not survey_within:
                result.problems.append(f"rollout: survey sessions {survey} beyond the budget {args.budget}")
            check_queued_rollout(ctx, servers, stamps, run.json(), args.budget, pool, result)
        finally:
            ctx.catalog.close()

        local = stamps[:local_n]
        reset_s = clone_all(servers, local, replace=True)
        base_catalog, base_config = benchlib.catalog_with_config(servers[0], base, name="baseline")
        for stamp in local:
            base_catalog.add_stamp(stamp.name, servers[stamp.server].dsn(stamp.database), region=names[stamp.server])
        base_catalog.close()
        what = "all" if local_n == args.stamps else f"a sample of {local_n} of the {args.stamps}"
        print(
            f"  baseline: {what} stamps dropped and cloned again from the template in {reset_s:.1f} s, "
            "in a catalog of their own"
        )
        with SessionSampler(servers) as sampler:
            run = run_cli(base_config, ["schema", "upgrade", "--parallel", str(args.workers), "--yes", "--json"], base)
        if run.returncode != 0:
            result.problems.append(run.failure())
            print(f"FAILED: {run.failure()}", file=sys.stderr)
            return result
        outcomes = run.json()["stamps"]
        ok = [o for o in outcomes if o["result"] == "ok" and o["at_revision"] == HEAD]
        heads = sum(rows == [HEAD] for rows in read_revisions(servers, local).values())
        result.local_stamps, result.local_s, result.local_peaks = local_n, run.seconds, sampler.peaks()
        print(
            f"  local rollout of {what} stamps (schema upgrade --parallel {args.workers}): {run.seconds:.2f} s wall, "
            f"{local_n / run.seconds:.1f} stamps/s; {len(ok)}/{local_n} ok, {heads}/{local_n} at head; "
            f"peak stamp sessions per server {fmt_peaks(result.local_peaks)} (its revision survey included)"
        )
        if len(ok) != local_n or heads != local_n:
            result.problems.append(f"baseline: {local_n - len(ok)} stamp(s) not upgraded by the local rollout")
    return result


# -- drain --------------------------------------------------------------------------------------------------


@dataclass
class DrainRun:
    label: str
    moves: int = 0
    wall_s: float = 0.0
    enqueue_s: float = 0.0
    acked: int = 0
    invariants: bool = False
    problems: list[str] = field(default_factory=list)


def tenant_rows(dsn: str, tenancy: configlib.Tenancy) -> dict[str, int]:
    """Tenant -> its rows across every tenant table of the stamp."""
    with dsnlib.connect(dsn, autocommit=True) as conn:
        per_table = access.tenant_rows(conn, discover(conn, tenancy))
    return {tenant: sum(tables.values()) for tenant, tables in per_table.items()}


def check_drain(ctx: Context, plan_file: Path, counts: dict[int, int], written: set[str], run: DrainRun) -> None:
    """Routes as planned, one flipped move per tenant, row counts on the targets as seeded; print each."""
    planned = {t: m.target for m in load_plan(plan_file)[0].moves for t in m.tenants}
    tenants = {str(t) for t in counts}
    routes = {r.tenant: r.stamp for r in ctx.catalog.routes()}
    misrouted = sorted(t for t in tenants if routes.get(t) != planned.get(t))
    with ctx.catalog.transaction() as conn:
        moves = conn.execute(
            "SELECT t.tenant, count(*) FILTER (WHERE m.phase = ANY(%s)), count(*) FROM moves m"
            " JOIN move_tenants t ON t.move_id = m.id GROUP BY t.tenant",
            ([Phase.FLIPPED.value, Phase.CLEANED.value],),  # a cleaned move was flipped first
        ).fetchall()
    flipped = {str(t): int(f) for t, f, _ in moves}
    other = sum(int(n) - int(f) for _, f, n in moves)
    not_once = sorted(t for t in tenants if flipped.get(t) != 1)
    targets = sorted(set(planned.values()))
    on = {name: tenant_rows(ctx.catalog.stamp(name).dsn, ctx.config.tenancy) for name in targets}
    checked = sorted(tenants - written)
    wrong_rows = [
        t
        for t in checked
        if on.get(planned.get(t, ""), {}).get(t) != counts[int(t)]
        or any(on[name].get(t, 0) for name in targets if name != planned.get(t))
    ]
    print(
        f"  {run.label}: every tenant routed to its planned target: {'yes' if not misrouted else 'NO'} "
        f"({len(tenants) - len(misrouted)}/{len(tenants)})"
    )
    print(
        f"  {run.label}: exactly one flipped move per tenant: {'yes' if not not_once else 'NO'} "
        f"({len(tenants) - len(not_once)}/{len(tenants)}; {other} tenant(s) in moves not flipped)"
    )
    print(
        f"  {run.label}: rows on the targets as seeded: {'yes' if not wrong_rows else 'NO'} "
        f"({len(checked) - len(wrong_rows)}/{len(checked)} tenants; the {len(written)} written ones are "
        "checked by the writer)"
    )
    for what, bad in (("not routed as planned", misrouted), ("not flipped once", not_once), ("rows", wrong_rows)):
        if bad:
            run.problems.append(f"drain {run.label}: {len(bad)} tenant(s) {what}, e.g. {bad[:5]}")
    run.invariants = not (misrouted or not_once or wrong_rows)


def drain_run(directory: Path, label: str, queued: bool, args: argparse.Namespace) -> DrainRun:
    """A fresh fleet seeded the same way, drained locally or through workers, then checked."""
    run = DrainRun(label)
    try:
        started = time.monotonic()
        specs = [TenantSpec(i, args.rows) for i in range(1, args.tenants + 1)]
        info, ctx, counts = benchlib.drain_fleet(directory, specs)
        try:
            seeded = tenant_rows(ctx.catalog.stamp("stamp-1").dsn, ctx.config.tenancy)
            if seeded != {str(t): n for t, n in counts.items()}:
                run.problems.append(f"drain {label}: the seeded row counts do not match a count on stamp-1")
            plan = plan_drain(ctx, "stamp-1", None, Cohorts(tenants=args.cohort_tenants))
            plan_file = write_plan(plan, directory / "drain-stamp-1.yaml")
            run.moves = len(plan.moves)
            print(
                f"  {label}: fleet up, {len(counts)} tenants with {sum(counts.values()):,} rows seeded, "
                f"planned in {time.monotonic() - started:.1f} s: {run.moves} moves",
                file=sys.stderr,
            )
            stamps = {s.name: s.dsn for s in ctx.catalog.stamps()}
            sample = random.Random(7).sample(sorted(counts), min(args.writers, len(counts)))
            writers = [Workload(ctx.catalog.url, stamps, t, seed=t, rate=args.writer_rate).start() for t in sample]
            try:
                if queued:
                    with worker_pool(info.config_path, directory, args.workers) as pool:
                        live = wait_live(ctx, pool)
                        queue = run_cli(
                            info.config_path,
                            ["apply", str(plan_file), "--queue", "--per-stamp", str(args.per_stamp), "--yes"],
                            directory,
                        )
                        wait = None
                        if queue.returncode == 0:
                            wait = run_cli(info.config_path, ["plan", "wait", str(plan_file), "--json"], directory)
                    run.enqueue_s = queue.seconds
                    run.wall_s = queue.seconds + (wait.seconds if wait else 0.0)
                    print(
                        f"  {label}: {args.workers} workers live after {live:.1f} s; stopped with exit codes "
                        f"{pool.exit_codes}",
                        file=sys.stderr,
                    )
                    if any(code != 0 for code in pool.exit_codes):
                        run.problems.append(f"drain {label}: a worker exited non-zero: {pool.exit_codes}")
                    failed = queue if wait is None else wait if wait.returncode != 0 else None
                    status = None if wait is None or wait.returncode != 0 else wait.json()["status"]
                else:
                    local = run_cli(
                        info.config_path,
                        [
                            "apply",
                            str(plan_file),
                            "--parallel",
                            str(args.workers),
                            "--per-stamp",
                            str(args.per_stamp),
                            "--yes",
                            "--json",
                        ],
                        directory,
                    )
                    run.wall_s = local.seconds
                    failed = local if local.returncode != 0 else None
                    status = None if failed else local.json()["status"]
            finally:
                for writer in writers:
                    writer.stop()
            if failed is not None:
                run.problems.append(f"drain {label}: {failed.failure()}")
                return run
            if queued:
                print(
                    f"  workers (apply --queue, {args.workers} workers, then plan wait): {run.moves} moves, "
                    f"{run.wall_s:.2f} s wall from the enqueue (which took {run.enqueue_s:.2f} s)"
                )
            else:
                print(f"  local (apply --parallel {args.workers}): {run.moves} moves, {run.wall_s:.2f} s wall")
            if status != "done":
                run.problems.append(f"drain {label}: the plan ended {status}")
            for writer in writers:  # no acknowledged write lost
                run.acked += writer.acked
                try:
                    if writer.errors:
                        raise AssertionError(f"errors: {writer.errors[:3]}")
                    lost = writer.lost_writes(stamps[ctx.catalog.route(str(writer.tenant)).stamp])
                    if lost:
                        raise AssertionError("; ".join(lost))
                except AssertionError as exc:
                    run.problems.append(f"drain {label}: the writer of tenant {writer.tenant}: {exc}")
            print(
                f"  {label}: writer on {len(writers)} tenants: {run.acked:,} acknowledged writes, all on the "
                f"tenants' new stamps: {'yes' if not any('writer' in p for p in run.problems) else 'NO'}"
            )
            check_drain(ctx, plan_file, counts, {str(w.tenant) for w in writers}, run)
        finally:
            ctx.catalog.close()
    finally:
        if (directory / STATE_FILE).exists():  # also when fleet_up failed half-way
            stop_fleet(directory)
    return run


def drain_part(args: argparse.Namespace) -> tuple[DrainRun, DrainRun]:
    print(
        f"drain: {args.tenants} tenants x {args.rows} rows on stamp-1 onto stamp-2 and stamp-3, cohorts of <= "
        f"{args.cohort_tenants} tenants, --per-stamp {args.per_stamp}; writer on {args.writers} tenants"
    )
    base = Path(tempfile.mkdtemp(prefix="migrator-bench-workers-drain-"))
    base.chmod(0o755)
    try:
        local = drain_run(base / "local", "local", False, args)
        queued = drain_run(base / "workers", "workers", True, args)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    if local.wall_s and queued.wall_s:
        print(f"  workers/local wall: {queued.wall_s / local.wall_s:.2f}x")
    return local, queued


# -- main ---------------------------------------------------------------------------------------------------


def summary(rollout: RolloutResult | None, drain: tuple[DrainRun, DrainRun] | None) -> list[str]:
    lines = ["", "summary"]
    problems: list[str] = []
    if rollout is not None:
        problems += rollout.problems
        if rollout.queued_s:
            lines.append(
                f"  rollout of {rollout.stamps} stamps on {rollout.servers} servers through workers: "
                f"{rollout.queued_s:.1f} s ({rollout.stamps / rollout.queued_s:.1f} stamps/s); peak stamp sessions "
                f"per server {max(rollout.step_peaks, default=0)} against a budget of {rollout.budget}; every stamp "
                f"reached head exactly once: {'yes' if rollout.exactly_once else 'NO'}"
            )
        if rollout.local_s:
            rate = rollout.local_stamps / rollout.local_s
            sample = "" if rollout.local_stamps == rollout.stamps else f" (a sample of {rollout.local_stamps})"
            lines.append(f"  local rollout{sample}: {rollout.local_s:.1f} s ({rate:.1f} stamps/s)")
            if rollout.queued_s:
                queued_rate = rollout.stamps / rollout.queued_s
                lines.append(f"  workers/local time per stamp: {rate / queued_rate:.2f}x")
    if drain is not None:
        local, queued = drain
        problems += local.problems + queued.problems
        if local.wall_s and queued.wall_s:
            lines.append(
                f"  drain of {queued.moves} cohort moves: local {local.wall_s:.1f} s, workers {queued.wall_s:.1f} s, "
                f"workers/local {queued.wall_s / local.wall_s:.2f}x; invariants held: local "
                f"{'yes' if local.invariants else 'NO'}, workers {'yes' if queued.invariants else 'NO'}"
            )
    lines += [f"  PROBLEM: {p}" for p in problems] or ["  every check passed"]
    return lines


def main() -> int:
    benchlib.stop_on_sigterm()
    if isinstance(sys.stdout, io.TextIOWrapper):  # each figure as soon as it is known, also through a pipe
        sys.stdout.reconfigure(line_buffering=True)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("rollout", "drain", "all"), default="all", help="which part to run")
    parser.add_argument("--workers", type=int, default=3, help="worker processes (and the local --parallel)")
    parser.add_argument("--stamps", type=int, default=1_000, help="rollout: stamps")
    parser.add_argument("--servers", type=int, default=3, help="rollout: servers the stamps are spread over")
    parser.add_argument("--budget", type=int, default=2, help="rollout: --connections-per-server")
    parser.add_argument("--baseline-stamps", type=int, default=None, help="rollout: stamps of the local baseline")
    parser.add_argument("--tenants", type=int, default=1_000, help="drain: tenants on the drained stamp")
    parser.add_argument("--rows", type=int, default=50, help="drain: rows per tenant")
    parser.add_argument("--cohort-tenants", type=int, default=100, help="drain: plan drain --cohort-tenants")
    parser.add_argument("--per-stamp", type=int, default=2, help="drain: apply --per-stamp")
    parser.add_argument("--writers", type=int, default=5, help="drain: tenants the writer writes to (0: none)")
    parser.add_argument("--writer-rate", type=float, default=20.0, help="drain: writes/s per written tenant")
    args = parser.parse_args()
    if args.stamps < 2 or args.servers < 1 or args.workers < 1 or args.budget < 1 or args.tenants < 1:
        parser.error("need at least 2 stamps, 1 server, 1 worker, a budget of 1 and 1 tenant")
    if args.baseline_stamps is not None and not 1 <= args.baseline_stamps <= args.stamps:
        parser.error("--baseline-stamps must be between 1 and --stamps")
    os.environ.pop("MIGRATOR_CONFIG", None)  # every command gets --config
    rollout = rollout_part(args) if args.part in ("rollout", "all") else None
    if rollout is not None and args.part == "all":
        print()
    drain = drain_part(args) if args.part in ("drain", "all") else None
    lines = summary(rollout, drain)
    print("\n".join(lines))
    return 1 if any("PROBLEM" in line for line in lines) else 0


if __name__ == "__main__":
    sys.exit(main())
