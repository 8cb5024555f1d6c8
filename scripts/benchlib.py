"""What the benchmark scripts share: local servers that are stopped whatever happens, and migrated databases."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from benchschemas import SCHEMAS, BenchSchema
from psycopg import sql

from migrator import config as configlib
from migrator.catalog import Catalog
from migrator.context import Context
from migrator.db import dsn as dsnlib
from migrator.local import pgserver, provision
from migrator.local.fleet import FleetInfo, fleet_up
from migrator.local.seed import TenantSpec, seed_fleet_stamp
from migrator.stamps.discovery import discover, tenant_filter


def _terminated(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def stop_on_sigterm() -> None:
    """Make `kill` raise SystemExit, so the benchmark's finally blocks stop its servers."""
    signal.signal(signal.SIGTERM, _terminated)


@contextmanager
def local_servers(prefix: str, names: Sequence[str]) -> Iterator[tuple[Path, list[pgserver.LocalServer]]]:
    """One local PostgreSQL server per name in a temporary directory; all stopped and removed at the end."""
    stop_on_sigterm()
    base = Path(tempfile.mkdtemp(prefix=prefix))
    base.chmod(0o755)
    servers: list[pgserver.LocalServer] = []
    try:
        for name in names:
            servers.append(pgserver.start_server(base / name))
        yield base, servers
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(base, ignore_errors=True)


def catalog_with_config(
    server: pgserver.LocalServer, base: Path, name: str = "catalog", tenancy: configlib.Tenancy | None = None
) -> tuple[Catalog, Path]:
    """A migrated catalog database and a config file naming it (`migrator.toml` for the default
    catalog, else `<name>.toml`), for the `migrator` processes."""
    catalog = Catalog(provision.catalog_database(server, name))
    config = "migrator.toml" if name == "catalog" else f"{name}.toml"
    return catalog, provision.write_config(base / config, catalog.url, tenancy)


@dataclass(frozen=True)
class Pair:
    """Two stamps on two servers, `a` holding the moving tenant, and how to run migrator against them."""

    stamps: dict[str, str]  # name -> DSN
    catalog: Catalog
    cli: list[str]  # `python -m migrator --config ...`
    rows: int  # the moving tenant's rows, as seeded


@contextmanager
def moving_pair(prefix: str, tenant: int, rows: int, schema: BenchSchema = SCHEMAS["sample"]) -> Iterator[Pair]:
    """Stamps `a` and `b` of `schema` on servers of their own, registered in a catalog whose config
    carries the schema's tenancy; `tenant` seeded on `a` with about `rows` rows beside a small
    tenant 2, both routed to `a`."""
    with local_servers(prefix, ["a", "b"]) as (base, servers):
        stamps = {"a": schema.create(servers[0], "stamp_a"), "b": schema.create(servers[1], "stamp_b")}
        catalog, config = catalog_with_config(servers[0], base, tenancy=schema.tenancy)
        for name, dsn in stamps.items():
            catalog.add_stamp(name, dsn)
        print(f"seeding tenant {tenant} of the {schema.name} schema with ~{rows:,} rows ...", file=sys.stderr)
        seeded = schema.seed(stamps["a"], tenant, rows)
        schema.seed(stamps["a"], 2, 1_000)
        for routed in (tenant, 2):
            catalog.set_route(str(routed), "a")
        yield Pair(stamps, catalog, [sys.executable, "-m", "migrator", "--config", str(config)], seeded)


def drain_fleet(directory: Path, specs: Sequence[TenantSpec]) -> tuple[FleetInfo, Context, dict[int, int]]:
    """The start of every drain benchmark: a local fleet (`fleet_up`: the catalog and 3 stamps on 3
    servers) whose stamp-1 holds the tenants of `specs`, routed there and draining, with room for
    all of them on stamp-2 and on stamp-3. Returns the fleet, its context and each tenant's rows."""
    info = fleet_up(directory, stamps=3, servers=3)
    ctx = Context.load(info.config_path)
    counts = seed_fleet_stamp(ctx.catalog.stamp("stamp-1").dsn, specs)
    ctx.catalog.import_routes([(str(t), "stamp-1") for t in counts])
    for name in ("stamp-2", "stamp-3"):
        ctx.catalog.update_stamp(name, capacity_rows=sum(counts.values()))
    ctx.catalog.update_stamp("stamp-1", state="draining")
    return info, ctx, counts


def _ticks(pid: int, children: bool) -> int:
    """utime + stime of a process (and, with `children`, of its reaped children), in clock ticks."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    own = int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return own + (int(fields[13]) + int(fields[14]) if children else 0)  # cutime, cstime


def server_cpu_seconds(server: pgserver.LocalServer) -> float:
    """CPU seconds the server has used so far: the postmaster, its live processes and the backends it
    reaped (a profile of a step is the difference of two readings, once its connections closed)."""
    postmaster = int((server.datadir / "postmaster.pid").read_text().split()[0])
    total = _ticks(postmaster, children=True)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == postmaster:
                total += _ticks(int(stat.parent.name), children=False)
        except (OSError, ValueError):  # the process ended meanwhile
            continue
    return total / os.sysconf("SC_CLK_TCK")


def psql() -> Path:
    """The `psql` of the PostgreSQL binaries the servers run from (else the one on PATH)."""
    found = pgserver.pg_bindir() / "psql"
    return found if found.exists() else Path(shutil.which("psql") or "psql")


def _pipe(psql: Path, source: str, target: str, select: str, insert: str) -> None:
    out = subprocess.Popen([str(psql), "-X", "-q", "-d", source, "-c", select], stdout=subprocess.PIPE)
    inp = subprocess.run([str(psql), "-X", "-q", "-d", target, "-c", insert], stdin=out.stdout, check=True)
    assert out.stdout is not None
    out.stdout.close()
    if out.wait() != 0 or inp.returncode != 0:
        raise SystemExit("raw psql pipe failed")


def raw_pipe_seconds(
    psql: Path, source: str, target: str, tenancy: configlib.Tenancy, tenants: tuple[str, ...] | None
) -> float:
    """The baseline of every benchmark: `psql` binary COPY out of the source piped into `psql` COPY in,
    table by table in copy order, for these tenants' rows (None: every row of the tenant tables)."""
    with dsnlib.connect(source, autocommit=True) as conn:
        layout = discover(conn, tenancy)
        statements = []
        for table in layout.tables:
            where = tenant_filter(table, tenants) if tenants else sql.SQL("true")
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


def fenced_at(log: str) -> float:
    """Wall-clock time the last cutover attempt fenced the tenant, from the move's --verbose log."""
    found = re.findall(
        r"^(\S+ \S+) INFO migrator\.cutover: move \d+: fenced, in-flight writes done at (\d+) ms", log, re.M
    )
    if not found:
        raise SystemExit("the move's log has no cutover line")
    stamp, after_ms = found[-1]
    logged = datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").replace(tzinfo=UTC).timestamp()
    return logged - int(after_ms) / 1000


def p99(values: list[float]) -> float:
    """The 99th percentile (nearest rank): with a handful of moves, their maximum."""
    ordered = sorted(values)
    return ordered[max(0, -(-99 * len(ordered) // 100) - 1)]
