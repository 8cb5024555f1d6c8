"""Chaos run: many online moves under a live writer, each hit by one fault, recovered the operator's way.

A local fleet (the catalog and each stamp on its own real PostgreSQL server) is seeded with small
and medium tenants. A writer thread keeps writing to the tenants through the routing catalog and
records every write the database acknowledged. Then N moves run one after another as separate
`migrator move` processes; for each, the seed decides the tenant, the target, and whether and when
(by the move's phase in the catalog) one fault strikes: kill -9 of the migrator, termination of its
source, target or catalog connections, a restart of the target server, or the catalog server
stopped for a few seconds around the flip. Recovery uses only documented commands: the same
`migrator move` again (resume) or `migrator move abort ID`, then `migrator cleanup` after a flip.
Some flipped moves are taken back first (`migrator move revert ID`, within the revert window, while
the writer writes on the target), a kill -9 striking some reverts in catch-up or in their freeze,
recovered by running the revert again or aborting it; then the leftovers of whichever side lost go.

At the end an oracle independent of migrator's own verification (md5 of every row's text, taken
before any move) and the writer's acknowledged writes are compared with the tenants' homes, route
versions are checked (each flip adds exactly 1), and `migrator doctor` must find no leftovers.
Every invariant counter must be 0; otherwise the exit code is 1 and the seed to reproduce is shown.

    scripts/chaos [--moves N] [--seed S] [--keep]      (python -m migrator.testing.chaos)

The fault schedule depends only on the seed; whether a fault lands in its phase depends on timing
(a fault whose move finished first is counted as missed). Every server is stopped at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psycopg
from psycopg import conninfo, sql

from migrator import config as configlib
from migrator.catalog import FLIPPED, Catalog, Move, Phase, routes, watch
from migrator.db import dsn as dsnlib
from migrator.local import pgserver, provision
from migrator.local.seed import TenantSpec, seed_fleet_stamp
from migrator.move import fence
from migrator.router import Router, TenantFenced, UnknownTenant
from migrator.stamps.access import SCHEMA
from migrator.stamps.discovery import Layout, discover, tenant_filter

R = TypeVar("R")

REPO = Path(__file__).resolve().parents[2]  # the checkout (migrator/testing/ is in no wheel)
KINDS = ("kill9", "terminate_source", "terminate_target", "terminate_catalog", "restart_target", "stop_catalog")
# The phases (moves.phase) at which each kind of fault may strike; FLIPPED = right after the flip.
PHASES: dict[str, tuple[Phase, ...]] = {
    "kill9": (Phase.COPYING, Phase.COPIED, Phase.SYNCED, Phase.CUTOVER, Phase.FLIPPED),
    "terminate_source": (Phase.COPYING, Phase.COPIED, Phase.SYNCED, Phase.CUTOVER),
    "terminate_target": (Phase.COPYING, Phase.COPIED, Phase.SYNCED, Phase.CUTOVER),
    "terminate_catalog": (Phase.COPYING, Phase.SYNCED, Phase.CUTOVER),
    "restart_target": (Phase.COPYING, Phase.COPIED, Phase.SYNCED, Phase.CUTOVER),
    "stop_catalog": (Phase.CUTOVER, Phase.FLIPPED),
}
# An online move's phases in order (offline's `verified` and `aborted` are never waited for).
ORDER = (Phase.CREATED, Phase.COPYING, Phase.COPIED, Phase.SYNCED, Phase.CUTOVER, Phase.FLIPPED, Phase.CLEANED)
MIGRATOR_APP = "migrator"  # application_name set by migrator.dsn.connect
HARNESS_APP = "chaos"  # the harness's own connections, never a fault's victims
WRITER_MARK = "chaos"  # key in tasks.meta of the writer's rows
FAULT_PROBABILITY = 0.75
ABORT_PROBABILITY = 0.3
COHORT_PROBABILITY = 0.5  # a move takes 2 to 4 tenants of one stamp as one cohort
COHORT_MAX = 4
REVERT_PROBABILITY = 0.35  # a flipped move is taken back (`move revert`) before its cleanup
REVERT_FAULT_PHASES = (Phase.SYNCED, Phase.CUTOVER)  # where a kill -9 may strike a revert
WINDOW_S = 1.0  # how long the writer writes on the target before a revert
RECOVERY_ATTEMPTS = 4
MOVE_TIMEOUT_S = 300.0
MOVE_FLAGS = ("--batch-rows", "200", "--rate-limit", "4000")  # many short batches: a kill lands mid-copy


def log(message: str) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _holds(conn: psycopg.Connection[Any], query: sql.Composed, tenant: str) -> bool:
    """Whether the query finds a row for the tenant (False when the session failed: polled again)."""
    with contextlib.suppress(psycopg.Error):
        return conn.execute(query, (tenant,)).fetchone() is not None
    return False


def _connect(dsn: str, app: str = HARNESS_APP) -> psycopg.Connection[Any]:
    """Harness connections are named apart from migrator's, so faults aimed at migrator spare them."""
    return dsnlib.connect(dsn, autocommit=True, application_name=app, connect_timeout=3)


# --- the fleet ---------------------------------------------------------------------------------------------


@dataclass
class Fleet:
    """The catalog and every stamp on separate servers, so one can be restarted or stopped alone."""

    base: Path
    catalog_server: pgserver.LocalServer
    servers: dict[str, pgserver.LocalServer]
    catalog_url: str
    stamps: dict[str, str]
    config: Path
    tenants: dict[str, int] = field(default_factory=dict)  # tenant -> seeded rows

    def all_servers(self) -> list[pgserver.LocalServer]:
        return [self.catalog_server, *self.servers.values()]

    def cli(self, *args: str, timeout: float = MOVE_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
        """One documented `migrator` command, as an operator would type it."""
        return subprocess.run(
            [sys.executable, "-m", "migrator", "--config", str(self.config), *args],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=timeout,
            check=False,
        )

    def popen(self, *args: str, out: Path) -> subprocess.Popen[bytes]:
        with out.open("ab") as sink:
            return subprocess.Popen(
                [sys.executable, "-m", "migrator", "--config", str(self.config), *args],
                stdout=sink,
                stderr=subprocess.STDOUT,
                cwd=REPO,
            )


# Shapes of real application schemas the moves must carry exactly under the same faults (beside the
# sample application): a folder tree whose children have smaller keys than their parents as well as
# larger (a self-referencing foreign key), an application trigger that writes an audit row for
# every folder inserted (copies, replays and cleanups must not fire it: an extra audit row on any
# stamp counts as a duplicated row), and files with their versions that reach the tenant only through
# foreign keys (path tables, one and two hops: no tenant_id column).
REAL_SHAPES = """
CREATE TABLE folders (
    tenant_id bigint NOT NULL REFERENCES tenants (id),
    id bigint NOT NULL,
    parent_id bigint,
    name text NOT NULL,
    PRIMARY KEY (tenant_id, id),
    FOREIGN KEY (tenant_id, parent_id) REFERENCES folders (tenant_id, id)
);
CREATE TABLE folder_audit (
    tenant_id bigint NOT NULL REFERENCES tenants (id),
    id bigint GENERATED ALWAYS AS IDENTITY,
    folder_id bigint NOT NULL,
    PRIMARY KEY (tenant_id, id)
);
CREATE FUNCTION audit_folder() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO folder_audit (tenant_id, folder_id) VALUES (NEW.tenant_id, NEW.id);
    RETURN NEW;
END $$;
CREATE TRIGGER audit_folder AFTER INSERT ON folders FOR EACH ROW EXECUTE FUNCTION audit_folder();
CREATE TABLE folder_files (
    id bigint PRIMARY KEY,
    owner bigint NOT NULL,
    folder bigint NOT NULL,
    name text NOT NULL,
    FOREIGN KEY (owner, folder) REFERENCES folders (tenant_id, id) ON DELETE CASCADE
);
CREATE TABLE file_versions (
    file_id bigint NOT NULL REFERENCES folder_files ON DELETE CASCADE,
    version integer NOT NULL,
    size bigint NOT NULL,
    PRIMARY KEY (file_id, version)
);
"""
# Folders 1..n (n >= 10), rooted at 10: folders 1-9 hang under it (children with smaller keys than
# their parent), every folder above 10 under the one ten below (children with larger keys).
SEED_SHAPES = """
INSERT INTO folders (tenant_id, id, parent_id, name)
SELECT %(tenant)s, g, CASE WHEN g = 10 THEN NULL WHEN g < 10 THEN 10 ELSE g - 10 END, 'f' || g
FROM generate_series(1, %(n)s::bigint) AS g;
INSERT INTO folder_files SELECT %(tenant)s * 1000 + g, %(tenant)s, g, 'file ' || g
FROM generate_series(1, %(n)s::bigint) g;
INSERT INTO file_versions SELECT %(tenant)s * 1000 + g, v, g * v
FROM generate_series(1, %(n)s::bigint) g, generate_series(1, 2) v
"""


def build_fleet(base: Path, rng: random.Random, stamps: int, small: int, medium: int, started: list[Any]) -> Fleet:
    """Start 1 + `stamps` servers, migrate, seed `small` tenants per stamp and `medium` in all."""
    catalog_server = pgserver.start_server(base / "catalog", backend="local")
    started.append(catalog_server)
    servers = {}
    for i in range(stamps):
        name = f"s{i + 1}"
        servers[name] = pgserver.start_server(base / name, backend="local")
        started.append(servers[name])
    catalog_url = provision.catalog_database(catalog_server)
    catalog = Catalog(catalog_url)
    dsns = {}
    for name, server in servers.items():
        dsns[name] = provision.stamp_database(server, "stamp")
        with _connect(dsns[name], "chaos-setup") as conn:
            conn.execute(REAL_SHAPES)
        catalog.add_stamp(name, dsns[name], region="local")
    config = provision.write_config(base / "migrator.toml", catalog_url)
    fleet = Fleet(base, catalog_server, servers, catalog_url, dsns, config)
    next_id = 1
    for i, name in enumerate(servers):
        specs = [TenantSpec(next_id + j, rng.randint(200, 900)) for j in range(small)]
        next_id += small
        specs += [TenantSpec(next_id + j, rng.randint(12_000, 25_000)) for j in range(medium) if j % stamps == i]
        next_id += medium
        for tenant, rows in seed_fleet_stamp(dsns[name], specs).items():
            with _connect(dsns[name], "chaos-setup") as conn:
                n = rng.randint(10, 40)
                for statement in SEED_SHAPES.split(";\n"):
                    conn.execute(statement, {"tenant": tenant, "n": n})
            catalog.set_route(str(tenant), name)
            fleet.tenants[str(tenant)] = rows
    return fleet


def _fast_shutdown(server: pgserver.LocalServer) -> None:
    """SIGINT to the postmaster (a fast shutdown, at once: pg_ctl would take a while to start), then wait."""
    pid_file = server.datadir / "postmaster.pid"
    with contextlib.suppress(OSError, ValueError):
        os.kill(int(pid_file.read_text().splitlines()[0]), signal.SIGINT)
    server.stop("fast")


# --- the oracle --------------------------------------------------------------------------------------------


def _not_writer(table_name: str) -> sql.Composable:
    """Seeded rows only: the writer's tasks are checked against its acknowledgements instead."""
    if table_name != "tasks":
        return sql.SQL("true")
    return sql.SQL("NOT coalesce(t.meta ? {}, false)").format(sql.Literal(WRITER_MARK))


def seeded_rows(conn: psycopg.Connection[Any], layout: Layout, tenant: str) -> dict[str, dict[str, str]]:
    """Per table, primary key -> md5 of the row's text: the row oracle, independent of migrator.verify."""
    out = {}
    for table in layout.tables:
        rows = conn.execute(
            sql.SQL("SELECT ARRAY[{}]::text, md5(t::text) FROM {} t WHERE {} AND {}").format(
                table.pk_text(),
                table.ident,
                tenant_filter(table, (tenant,), sql.Identifier("t")),
                _not_writer(table.name),
            )
        ).fetchall()
        out[table.label] = dict(rows)
    return out


def tenant_row_count(conn: psycopg.Connection[Any], layout: Layout, tenant: str) -> int:
    total = 0
    for table in layout.tables:
        row = conn.execute(
            sql.SQL("SELECT count(*) FROM {} WHERE {}").format(table.ident, tenant_filter(table, (tenant,)))
        ).fetchone()
        total += int(row[0]) if row else 0
    return total


def writer_rows(conn: psycopg.Connection[Any], tenant: str) -> dict[int, str]:
    return dict(
        conn.execute(
            "SELECT id, title FROM tasks WHERE tenant_id = %s AND coalesce(meta ? %s, false)",
            (int(tenant), WRITER_MARK),
        ).fetchall()
    )


def compare_rows(before: dict[str, dict[str, str]], after: dict[str, dict[str, str]]) -> tuple[int, int]:
    """(rows lost or changed, rows extra) of the seeded rows."""
    lost = extra = 0
    for table, rows in before.items():
        now = after.get(table, {})
        lost += sum(1 for key, digest in rows.items() if now.get(key) != digest)
        extra += sum(1 for key in now if key not in rows)
    return lost, extra


# --- the writer --------------------------------------------------------------------------------------------


@dataclass
class Acked:
    """One tenant's writes as the writer knows them: acknowledged, or in doubt (connection lost mid-write)."""

    project: int
    alive: dict[int, str] = field(default_factory=dict)  # task id -> title of its last acknowledged write
    deleted: set[int] = field(default_factory=set)
    doubt_keys: set[int] = field(default_factory=set)  # keys whose last write may or may not have committed
    doubt_titles: set[str] = field(default_factory=set)  # titles of inserts / key changes in doubt


def _lost_connection(exc: psycopg.Error) -> bool:
    state = exc.sqlstate
    if state is None:
        return isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError)
    return state.startswith("08") or state in ("57P01", "57P02", "57P03")


class Writer(threading.Thread):
    """The tenants' application: writes through `migrator.router` (cached routes, pushed flips, retries on the fence).

    Each write is one `Router.run` transaction with a short deadline. What still reaches the
    application is counted: a commit whose outcome is unknown (the connection dropped at the
    commit) is "in doubt"; a tenant fenced past the deadline or an unreachable stamp is an error.
    """

    def __init__(self, fleet: Fleet, projects: dict[str, int], seed: int, rate: float) -> None:
        super().__init__(name="chaos-writer", daemon=True)
        self.fleet = fleet
        self.state = {tenant: Acked(project) for tenant, project in projects.items()}
        self.rng = random.Random(seed)
        self.rate = rate
        self.focus: str | None = None
        self.acked = self.in_doubt = 0
        self.errors: list[str] = []
        self.error_states: Counter[str] = Counter()
        self._halt = threading.Event()
        # The faults stop the catalog and restart stamps: the router and its pools say so on every
        # reconnect attempt, which is the application's log, not the harness's report.
        for noisy in ("migrator.router", "psycopg.pool"):
            logging.getLogger(noisy).setLevel(logging.CRITICAL)
        self.router = Router(fleet.catalog_url, fleet.stamps, pool_size=2)

    @property
    def fenced(self) -> int:
        """Writes the router retried because the tenant was fenced."""
        return self.router.stats.fenced_retries

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=30)
        self.router.close()

    def run(self) -> None:
        n = 0
        tenants = sorted(self.state)
        while not self._halt.is_set():
            n += 1
            started = time.monotonic()
            tenant = self.focus if self.focus and self.rng.random() < 0.7 else self.rng.choice(tenants)
            self._write(tenant, n)
            self._halt.wait(max(0.0, 1 / self.rate - (time.monotonic() - started)))

    def _write(self, tenant: str, n: int) -> None:
        acked = self.state[tenant]
        op = self.rng.random()
        kinds = ((0.45, "insert"), (0.75, "update"), (0.85, "rekey"), (1.0, "delete"))
        kind = "insert" if len(acked.alive) < 5 else next(name for limit, name in kinds if op < limit)
        task = self.rng.choice(sorted(acked.alive)) if kind != "insert" else 0
        title = f"{kind[0]}{tenant}-{n}" if kind in ("insert", "update") else acked.alive.get(task, "")

        def write(conn: psycopg.Connection[Any]) -> Any:
            if kind == "insert":
                return conn.execute(
                    "INSERT INTO tasks (tenant_id, project_id, title, meta) VALUES (%s, %s, %s, %s) RETURNING id",
                    (int(tenant), acked.project, title, json.dumps({WRITER_MARK: True})),
                ).fetchone()
            if kind == "update":
                sql_update = "UPDATE tasks SET title = %s WHERE tenant_id = %s AND id = %s"
                return conn.execute(sql_update, (title, int(tenant), task)).rowcount
            if kind == "rekey":  # a primary-key change: the old key must vanish, the new one appear
                return conn.execute(
                    "UPDATE tasks SET id = DEFAULT WHERE tenant_id = %s AND id = %s RETURNING id", (int(tenant), task)
                ).fetchone()
            return conn.execute("DELETE FROM tasks WHERE tenant_id = %s AND id = %s", (int(tenant), task)).rowcount

        try:
            done = self.router.run(tenant, write, deadline_s=2.0)
        except psycopg.Error as exc:
            if _lost_connection(exc):  # at the commit: it may or may not have happened
                self.in_doubt += 1
                if kind in ("insert", "rekey"):
                    acked.doubt_titles.add(title)
                if task:
                    acked.alive.pop(task, None)
                    acked.doubt_keys.add(task)
            else:  # a write refused for another reason: shown in the report (a deadlock would land here)
                self.error_states[exc.sqlstate or "none"] += 1
                self.errors.append(f"tenant {tenant}: {type(exc).__name__}: {str(exc).splitlines()[0]}")
            return
        except (TenantFenced, UnknownTenant) as exc:  # fenced or unreachable past the deadline: nothing committed
            self.error_states[type(exc).__name__] += 1
            self.errors.append(f"tenant {tenant}: {exc}")
            return
        if kind == "insert" and done is not None:
            self._ack(acked, done[0], title)
        elif kind == "update" and done == 1:
            self._ack(acked, task, title)
        elif kind == "rekey" and done is not None:
            del acked.alive[task]
            acked.deleted.add(task)
            self._ack(acked, done[0], title)
        elif kind == "delete" and done:
            del acked.alive[task]
            acked.deleted.add(task)
            self.acked += 1

    def _ack(self, acked: Acked, task: int, title: str) -> None:
        acked.alive[task] = title
        acked.deleted.discard(task)
        self.acked += 1


def check_writes(acked: Acked, rows: dict[int, str]) -> tuple[int, int]:
    """(acknowledged writes missing or undone, writer rows nobody acknowledged) on the tenant's home."""
    missing = sum(1 for task, title in acked.alive.items() if rows.get(task) != title)
    missing += sum(1 for task in acked.deleted if task in rows and task not in acked.doubt_keys)
    unexpected = sum(
        1
        for task, title in rows.items()
        if task not in acked.alive
        and task not in acked.doubt_keys
        and task not in acked.deleted
        and title not in acked.doubt_titles
    )
    return missing, unexpected


# --- the run -----------------------------------------------------------------------------------------------


@dataclass
class Report:
    """What happened, and the invariant counters that must all be 0."""

    seed: int
    moves: int = 0
    cohorts: int = 0  # moves of more than one tenant
    flipped: int = 0
    aborted: int = 0
    resumed: int = 0
    reverted: int = 0  # reverts that flipped the routes back
    revert_aborted: int = 0  # reverts the operator aborted after a fault (the tenants stay on the target)
    revert_faults: int = 0  # kill -9 of a running revert
    cleanups: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    fault_phases: Counter[str] = field(default_factory=Counter)
    missed: Counter[str] = field(default_factory=Counter)
    tolerated: int = 0  # faults after which the move still finished by itself
    writer_acked: int = 0
    writer_fenced: int = 0
    writer_in_doubt: int = 0
    writer_errors: Counter[str] = field(default_factory=Counter)  # by SQLSTATE
    seconds: float = 0.0
    invariants: Counter[str] = field(default_factory=lambda: Counter({k: 0 for k in INVARIANTS}))
    problems: list[str] = field(default_factory=list)

    def violate(self, what: str, count: int, detail: str) -> None:
        if count:
            self.invariants[what] += count
            self.problems.append(f"{what} +{count}: {detail}")
            log(f"VIOLATION {what} +{count}: {detail}")

    @property
    def ok(self) -> bool:
        return not any(self.invariants.values())

    def table(self) -> str:
        lines = [
            f"chaos run, seed {self.seed}: {self.moves} moves in {self.seconds:.0f} s",
            f"  {'moves run':<34}{self.moves} ({self.cohorts} of cohorts of 2 to {COHORT_MAX} tenants)",
            f"  {'flipped':<34}{self.flipped}",
            f"  {'aborted (operator abort)':<34}{self.aborted}",
            f"  {'resumed (operator re-run)':<34}{self.resumed}",
            f"  {'reverted (move revert)':<34}{self.reverted}"
            f" (killed -9 while reverting {self.revert_faults}, aborted after it {self.revert_aborted})",
            f"  {'cleanups':<34}{self.cleanups}",
            f"  {'faults injected':<34}{sum(self.faults.values())}"
            f" (finished anyway: {self.tolerated}; missed, move done first: {sum(self.missed.values())})",
            *(f"    {kind:<32}{self.faults[kind]}" for kind in KINDS),
            "  faults by phase                  "
            + ", ".join(f"{p} {self.fault_phases[p]}" for p in ORDER if self.fault_phases[p]),
            f"  {'writer: acknowledged writes':<34}{self.writer_acked}"
            f" (fenced retries {self.writer_fenced}, in doubt {self.writer_in_doubt})",
            f"  {'writer: other refused writes':<34}{sum(self.writer_errors.values())}"
            + (f" {dict(self.writer_errors)}" if self.writer_errors else ""),
            "  invariants (all must be 0)",
            *(f"    {name:<32}{self.invariants[name]}" for name in INVARIANTS),
        ]
        return "\n".join(lines)


INVARIANTS: tuple[str, ...] = (
    "rows lost",
    "rows duplicated",
    "acked writes missing",
    "double flips",
    "route version skips",
    "stuck fences",
    "capture leftovers",
    "unrecovered moves",
    "cohort routes split",
)


@dataclass(frozen=True)
class Plan:
    """Everything the seed decides for one move, drawn before it starts (timing cannot change it):
    its tenants (one, or a cohort of one stamp's tenants moved as one unit), target and fault."""

    tenants: tuple[str, ...]
    target: str
    fault: str | None
    phase: Phase | None
    abort: bool
    outage_s: float
    revert: bool = False  # once flipped, take the move back before cleaning up
    revert_fault: Phase | None = None  # a kill -9 of the revert at this phase


class Engine:
    def __init__(self, fleet: Fleet, report: Report, seed: int) -> None:
        self.fleet = fleet
        self.report = report
        self.seed = seed
        self.catalog = Catalog(fleet.catalog_url)
        self._poll: psycopg.Connection[Any] | None = None
        with _connect(next(iter(fleet.stamps.values()))) as conn:
            self.layout = discover(conn, configlib.Tenancy())
        self.before: dict[str, dict[str, dict[str, str]]] = {}
        self.versions: dict[str, list[int]] = {}
        self.reported: set[tuple[str, str]] = set()
        self.proc: subprocess.Popen[bytes] | None = None  # the running `migrator move`, ended on interrupt
        self.logs = fleet.base / "logs"
        self.logs.mkdir(exist_ok=True)

    # -- reading the catalog, robust to the catalog's own outages --

    def _query(self, read: Callable[..., R], *args: Any) -> R | None:
        """`read` (of `migrator.catalog.watch` or `routes`) on the oracle's own session; None while the
        catalog is away."""
        for _ in range(2):
            try:
                if self._poll is None or self._poll.closed or self._poll.broken:
                    self._poll = _connect(self.fleet.catalog_url)
                return read(self._poll, *args)
            except psycopg.Error:
                if self._poll is not None:
                    with contextlib.suppress(Exception):
                        self._poll.close()
                self._poll = None
        return None

    def route(self, tenant: str) -> tuple[str, int]:
        found = self._query(routes.route_of, tenant)
        assert found, f"no route for tenant {tenant}"
        return found

    def latest_move(self, tenant: str, after_id: int) -> Move | None:
        found = [m for m in self.catalog.moves(tenant, limit=5) if m.id > after_id]
        return found[0] if found else None

    def last_move_id(self) -> int:
        return self._query(watch.last_move_id) or 0

    # -- the oracle's before picture --

    def snapshot(self) -> dict[str, int]:
        """Before any move or write: every tenant's seeded rows, and a project for the writer."""
        projects = {}
        for tenant in self.fleet.tenants:
            stamp, version = self.route(tenant)
            self.versions[tenant] = [version]
            with _connect(self.fleet.stamps[stamp]) as conn:
                self.before[tenant] = seeded_rows(conn, self.layout, tenant)
                row = conn.execute("SELECT min(id) FROM projects WHERE tenant_id = %s", (int(tenant),)).fetchone()
                projects[tenant] = int(row[0]) if row and row[0] is not None else 0
        return projects

    # -- one move --

    def plan(self, index: int, forced: str | None) -> Plan:
        rng = random.Random(self.seed * 1_000_003 + index)
        tenants = sorted(self.fleet.tenants, key=int)
        tenant = rng.choice(tenants)
        source, _ = self.route(tenant)
        neighbours = [t for t in tenants if t != tenant and self.route(t)[0] == source]
        cohort: tuple[str, ...] = (tenant,)
        if neighbours and rng.random() < COHORT_PROBABILITY:
            cohort += tuple(rng.sample(neighbours, min(len(neighbours), rng.randint(1, COHORT_MAX - 1))))
        target = rng.choice(sorted(s for s in self.fleet.stamps if s != source))
        fault = forced or (rng.choice(KINDS) if rng.random() < FAULT_PROBABILITY else None)
        phase = rng.choice(PHASES[fault]) if fault else None
        abort, outage = rng.random() < ABORT_PROBABILITY, rng.uniform(2.0, 4.0)
        revert = rng.random() < REVERT_PROBABILITY
        revert_fault = rng.choice(REVERT_FAULT_PHASES) if revert and rng.random() < 0.5 else None
        return Plan(cohort, target, fault, phase, abort, outage, revert, revert_fault)

    def run_move(self, index: int, plan: Plan, writer: Writer) -> None:
        report = self.report
        source, _ = self.route(plan.tenants[0])
        versions = {t: self.route(t)[1] for t in plan.tenants}
        before_id = self.last_move_id()
        writer.focus = plan.tenants[0]
        who = f"tenant {plan.tenants[0]}" if len(plan.tenants) == 1 else f"cohort {','.join(plan.tenants)}"
        what = f"move #{index} {who} {source} -> {plan.target}"
        log(f"{what}: fault {plan.fault or '-'} at {plan.phase or '-'}, recovery {'abort' if plan.abort else 'resume'}")
        args = ("move", *plan.tenants, "--to", plan.target, "--yes", "--json", *MOVE_FLAGS)
        out = self.logs / f"move-{index:03d}.log"
        proc = self.proc = self.fleet.popen(*args, out=out)
        injected = None
        if plan.fault and plan.phase:
            injected = self.inject(proc, plan, source, before_id)
            if injected:
                report.faults[plan.fault] += 1
                report.fault_phases[injected] += 1
                log(f"{what}: injected {plan.fault} at phase {injected}")
            else:
                report.missed[plan.fault] += 1
        code = self._wait(proc, what)
        if injected and code == 0:
            report.tolerated += 1
        self.recover(plan, before_id, code, what, args)
        report.moves += 1
        report.cohorts += len(plan.tenants) > 1
        self.check_move(plan, source, versions, before_id, what)

    def _wait(self, proc: subprocess.Popen[bytes], what: str) -> int:
        try:
            return proc.wait(timeout=MOVE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.report.violate("unrecovered moves", 1, f"{what}: migrator still running after {MOVE_TIMEOUT_S:.0f} s")
            proc.kill()
            return proc.wait()

    def _await_phase(
        self, proc: subprocess.Popen[bytes], tenant: str, wanted: Phase, after_id: int, source: str
    ) -> str | None:
        """Poll the catalog until the move reaches `wanted` (or a later phase) while migrator still runs.

        The freeze lasts only tens of milliseconds, so for CUTOVER the source's fence flag is polled
        too: it is raised right after the catalog records the phase.
        """
        deadline = time.monotonic() + MOVE_TIMEOUT_S
        fenced = sql.SQL("SELECT 1 FROM {}.guarded_tenants WHERE tenant = %s AND fenced").format(sql.Identifier(SCHEMA))
        with _connect(self.fleet.stamps[source]) as src:
            while proc.poll() is None and time.monotonic() < deadline:
                phase = self._query(watch.latest_phase, tenant, after_id)
                if phase in ORDER and ORDER.index(phase) >= ORDER.index(wanted):
                    return str(phase) if proc.poll() is None else None
                if wanted == Phase.CUTOVER and phase == Phase.SYNCED and _holds(src, fenced, tenant):
                    return str(Phase.CUTOVER)
                time.sleep(0.002)
        return None

    def inject(self, proc: subprocess.Popen[bytes], plan: Plan, source: str, after_id: int) -> str | None:
        """Strike once the move is at the planned phase; returns the phase hit, or None if it finished first."""
        assert plan.fault and plan.phase
        phase = self._await_phase(proc, plan.tenants[0], plan.phase, after_id, source)
        if phase is None:
            return None
        fleet = self.fleet
        if plan.fault == "kill9":
            os.kill(proc.pid, signal.SIGKILL)
        elif plan.fault.startswith("terminate_"):
            which = plan.fault.removeprefix("terminate_")
            if which == "catalog":
                server, dsn = fleet.catalog_server, fleet.catalog_url
            else:
                name = source if which == "source" else plan.target
                server, dsn = fleet.servers[name], fleet.stamps[name]
            if not self._terminate(proc, server, dsn):
                return None
        elif plan.fault == "restart_target":
            server = fleet.servers[plan.target]
            _fast_shutdown(server)
            server.start()
        elif plan.fault == "stop_catalog":
            _fast_shutdown(fleet.catalog_server)
            time.sleep(plan.outage_s)
            fleet.catalog_server.start()
        return phase

    def _terminate(self, proc: subprocess.Popen[bytes], server: pgserver.LocalServer, dsn: str) -> bool:
        """pg_terminate_backend of migrator's sessions on that server's database (waits up to 2 s for one)."""
        dbname = conninfo.conninfo_to_dict(dsn).get("dbname")
        deadline = time.monotonic() + 2.0
        with _connect(server.dsn("postgres")) as admin:
            while proc.poll() is None and time.monotonic() < deadline:
                killed = admin.execute(
                    "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity"
                    " WHERE application_name = %s AND datname = %s AND pid <> pg_backend_pid()",
                    (MIGRATOR_APP, dbname),
                ).fetchone()
                if killed and killed[0]:
                    return True
                time.sleep(0.005)
        return False

    def recover(self, plan: Plan, before_id: int, code: int, what: str, args: tuple[str, ...]) -> None:
        """As an operator: read `move status`; resume or abort an unfinished move; clean up after a flip."""
        report = self.report
        move = self.settle(plan.tenants[0], before_id, args, plan.abort, what)
        if move is None:
            latest = self.latest_move(plan.tenants[0], before_id)
            report.violate("unrecovered moves", 1, f"{what}: still {latest.phase if latest else 'not created'}")
        elif move.phase == Phase.ABORTED:
            report.aborted += 1
        else:
            report.flipped += 1
            self.cleanup((plan.revert and self.revert(move, plan, what)) or move, what)

    def settle(self, tenant: str, before_id: int, args: tuple[str, ...], abort: bool, what: str) -> Move | None:
        """Until the latest move of the tenant after `before_id` flipped or was aborted, as an operator
        would: re-run its command (`args`: a move, or a revert), or abort it (`abort`). That move, or
        None if it never settled within RECOVERY_ATTEMPTS."""
        for attempt in range(RECOVERY_ATTEMPTS + 1):
            move = self.latest_move(tenant, before_id)
            if move is not None and (move.phase in FLIPPED or move.phase == Phase.ABORTED):
                return move
            if attempt == RECOVERY_ATTEMPTS:
                break
            if move is not None and abort:
                log(f"{what}: move {move.id} stopped at {move.phase}; operator aborts it")
                result = self.fleet.cli("move", "abort", str(move.id), "--yes")
            else:
                log(f"{what}: stopped ({'no move recorded' if move is None else move.phase}); operator re-runs it")
                self.report.resumed += 1
                result = self.fleet.cli(*args)
            if result.returncode != 0:
                log(f"{what}: recovery attempt {attempt + 1} failed: {result.stderr.strip()[-400:]}")
        return None

    def revert(self, move: Move, plan: Plan, what: str) -> Move | None:
        """As an operator taking a flipped move back within its window, while the writer writes on the
        target; a kill -9 may strike the revert, recovered by running it again or aborting it. Returns
        the revert that flipped (its leftovers are the target's copy), or None if it was aborted."""
        report = self.report
        time.sleep(WINDOW_S)  # the application writes on the target: the window captures it
        before_id = self.last_move_id()
        args = ("move", "revert", str(move.id), "--yes", "--json")
        proc = self.proc = self.fleet.popen(*args, out=self.logs / f"revert-{move.id:03d}.log")
        fault = f", kill -9 at {plan.revert_fault}" if plan.revert_fault else ""
        log(f"{what}: operator reverts move {move.id}{fault}")
        if plan.revert_fault:
            hit = self._await_phase(proc, plan.tenants[0], plan.revert_fault, before_id, move.target)
            if hit:
                os.kill(proc.pid, signal.SIGKILL)
                report.revert_faults += 1
                log(f"{what}: revert killed -9 at phase {hit}")
        self._wait(proc, what)
        revert = self.settle(plan.tenants[0], before_id, args, plan.abort, f"{what} (revert of move {move.id})")
        if revert is None:
            report.violate("unrecovered moves", 1, f"{what}: the revert of move {move.id} never ended")
        elif revert.phase == Phase.ABORTED:
            report.revert_aborted += 1
        else:
            report.reverted += 1
            return revert
        return None

    def cleanup(self, move: Move, what: str) -> None:
        """A single tenant's leftovers by tenant and stamp, a cohort's by its move id (both documented ways)."""
        by = ("--move", str(move.id)) if len(move.tenants) > 1 else (move.tenants[0], "--stamp", move.source)
        old_stamp = move.source
        for _ in range(3):
            result = self.fleet.cli("cleanup", *by, "--yes")
            if result.returncode == 0:
                self.report.cleanups += 1
                return
            log(f"{what}: cleanup failed: {result.stderr.strip()[-400:]}")
            time.sleep(1)
        self.report.violate("capture leftovers", 1, f"{what}: cleanup of {old_stamp} never succeeded")

    # -- invariants --

    def check_move(self, plan: Plan, source: str, versions: dict[str, int], before_id: int, what: str) -> None:
        """Right after a move: each route's step (a cohort's all or none), the rows where the routes say,
        nothing left behind."""
        moves = [m for m in self.catalog.moves(plan.tenants[0], limit=10) if m.id > before_id]
        forward = min(moves, key=lambda m: m.id, default=None)
        flipped = forward is not None and (forward.phase in FLIPPED or forward.phase == Phase.REVERTED)
        reverted = forward is not None and any(m.reverts == forward.id and m.phase in FLIPPED for m in moves)
        homes = set()
        for tenant in plan.tenants:
            version = versions[tenant]
            stamp, now = self.route(tenant)
            homes.add(stamp)
            if reverted:  # the forward flip's version, then the revert's
                self.versions[tenant].append(version + 1)
            self.versions[tenant].append(now)
            expected = (
                (source, version + 2) if reverted else (plan.target, version + 1) if flipped else (source, version)
            )
            if (stamp, now) != expected:
                if stamp == source and now == version and flipped:
                    self.report.violate("double flips", 1, f"{what}: move says flipped, {tenant} still {stamp} v{now}")
                elif now - version > 1 + reverted:
                    skipped = now - version - 1 - reverted
                    self.report.violate("route version skips", skipped, f"{what}: {tenant} v{version} -> v{now}")
                else:
                    self.report.violate(
                        "double flips", 1, f"{what}: {tenant} {stamp} v{now}, expected {expected[0]} v{expected[1]}"
                    )
            self.check_tenant(tenant, what)
        if len(homes) > 1:
            self.report.violate("cohort routes split", 1, f"{what}: the cohort's routes point at {sorted(homes)}")
        self.check_leftovers(what)

    def check_tenant(self, tenant: str, what: str, writer: Writer | None = None) -> None:
        home, _ = self.route(tenant)
        for name, dsn in self.fleet.stamps.items():
            with _connect(dsn) as conn:
                if name == home:
                    after = seeded_rows(conn, self.layout, tenant)
                    lost, extra = compare_rows(self.before[tenant], after)
                    self.report.violate("rows lost", lost, f"{what}: tenant {tenant} on its home {home}")
                    self.report.violate("rows duplicated", extra, f"{what}: tenant {tenant}: unknown rows on {home}")
                    if writer is not None:
                        missing, unexpected = check_writes(writer.state[tenant], writer_rows(conn, tenant))
                        self.report.violate("acked writes missing", missing, f"{what}: tenant {tenant} on {home}")
                        self.report.violate(
                            "rows duplicated", unexpected, f"{what}: tenant {tenant}: unacknowledged writer rows"
                        )
                    if not after.get("tenants"):
                        self.report.violate("double flips", 1, f"{what}: tenant {tenant} routed to {home}, not there")
                else:
                    stray = tenant_row_count(conn, self.layout, tenant)
                    self.report.violate("rows duplicated", stray, f"{what}: tenant {tenant} has rows on {name}")
                    self.report.violate("double flips", int(stray > 0), f"{what}: tenant {tenant} on two stamps")

    def check_leftovers(self, what: str) -> None:
        """Between moves nothing of migrator may remain: no guard, trigger, change log or copy cursor."""
        open_moves = self._query(watch.unfinished_move_ids) or []
        for name, dsn in self.fleet.stamps.items():
            with _connect(dsn) as conn:
                items = [item for item in fence.leftovers(conn) if (name, item) not in self.reported]
            self.reported.update((name, item) for item in items)  # each leftover counts once, when first seen
            for item in items:
                if item.startswith("fence") and not open_moves:
                    self.report.violate("stuck fences", 1, f"{what}: {name}: {item} with no resumable move")
                else:
                    self.report.violate("capture leftovers", 1, f"{what}: {name}: {item}")

    def final_checks(self, writer: Writer) -> None:
        for tenant in sorted(self.fleet.tenants, key=int):
            self.check_tenant(tenant, "final", writer)
            seen = self.versions[tenant]
            skips = sum(max(0, b - a - 1) for a, b in zip(seen, seen[1:], strict=False))
            backwards = sum(1 for a, b in zip(seen, seen[1:], strict=False) if b < a)
            self.report.violate("route version skips", skips + backwards, f"tenant {tenant}: versions {seen}")
        doctor = self.fleet.cli("doctor", "--json")
        if doctor.returncode != 0:
            found = json.loads(doctor.stdout or "{}") or {"?": [doctor.stderr.strip()]}
            items = [(name, item) for name, listed in found.items() for item in listed]
            fences = sum(1 for _, item in items if item.startswith("fence"))
            self.report.violate("stuck fences", fences, f"`migrator doctor` at the end: {found}")
            self.report.violate("capture leftovers", len(items) - fences, f"`migrator doctor` at the end: {found}")


def run(
    moves: int = 50,
    seed: int = 1,
    *,
    workdir: Path | None = None,
    stamps: int = 3,
    small: int = 5,
    medium: int = 3,
    cover_all: bool = False,
    writer_rate: float = 60.0,
) -> Report:
    """Build a fleet, run `moves` faulted moves under the writer, check the invariants, stop every server.

    `cover_all` forces the first moves' faults to be each kind once (in an order the seed shuffles),
    so a short run exercises every fault.
    """
    report = Report(seed)
    started_at = time.monotonic()
    base = Path(tempfile.mkdtemp(prefix="migrator-chaos-", dir=workdir))
    base.chmod(0o755)
    servers: list[pgserver.LocalServer] = []
    writer: Writer | None = None
    engine: Engine | None = None
    try:
        rng = random.Random(seed)
        log(f"starting {stamps + 1} servers in {base}, seed {seed}")
        fleet = build_fleet(base, rng, stamps, small, medium, servers)
        engine = Engine(fleet, report, seed)
        log(f"seeded {len(fleet.tenants)} tenants, {sum(fleet.tenants.values()):,} rows")
        writer = Writer(fleet, engine.snapshot(), seed, writer_rate)
        writer.start()
        uncovered = list(KINDS)
        rng.shuffle(uncovered)
        index = 0
        # With cover_all, a forced fault that missed its phase is forced again on the next move, and
        # the run goes on past `moves` (by at most 2 x the kinds) until every kind has struck once.
        while index < moves or (cover_all and uncovered and index < moves + 2 * len(KINDS)):
            index += 1
            kind = uncovered[-1] if cover_all and uncovered else None
            engine.run_move(index, engine.plan(index, kind), writer)
            if kind and report.faults[kind]:
                uncovered.pop()
        time.sleep(0.5)  # let the writer touch the last moved tenant on its new home
        writer.stop()
        report.writer_acked, report.writer_fenced, report.writer_in_doubt = writer.acked, writer.fenced, writer.in_doubt
        report.writer_errors = writer.error_states
        for error in writer.errors[:5]:
            log(f"writer error: {error}")
        engine.final_checks(writer)
        return report
    finally:
        if engine is not None and engine.proc is not None and engine.proc.poll() is None:
            engine.proc.kill()
            engine.proc.wait()
        if writer is not None and writer.is_alive():
            writer.stop()
        for server in servers:
            with contextlib.suppress(Exception):
                server.stop("fast")
        report.seconds = time.monotonic() - started_at
        if os.environ.get("CHAOS_KEEP"):
            log(f"kept {base} (CHAOS_KEEP)")
        else:
            shutil.rmtree(base, ignore_errors=True)


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM takes the same path as Ctrl-C, so the finally block stops every server."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--moves", type=int, default=50, help="how many moves to run (default 50)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the schedule (default: random, printed)")
    parser.add_argument("--small", type=int, default=5, help="small tenants per stamp")
    parser.add_argument("--medium", type=int, default=3, help="medium tenants in all")
    parser.add_argument("--cover-all", action="store_true", help="force each fault kind once in the first moves")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1, 1_000_000)
    reproduce = f"reproduce: scripts/chaos --moves {args.moves} --seed {seed}"
    try:
        with _sigterm_as_interrupt():
            report = run(args.moves, seed, small=args.small, medium=args.medium, cover_all=args.cover_all)
    except KeyboardInterrupt:
        print(f"interrupted; every server was stopped. {reproduce}", file=sys.stderr)
        sys.exit(130)
    print(report.table())
    if report.ok:
        print(f"all invariants hold ({reproduce})")
        return
    print("VIOLATIONS:")
    for problem in report.problems:
        print(f"  {problem}")
    print(reproduce)
    sys.exit(1)


if __name__ == "__main__":
    main()
