"""A local fleet on real PostgreSQL servers: the catalog plus N stamps, for demos, tests and benchmarks."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from migrator import config as configlib
from migrator.catalog import Catalog
from migrator.context import Context
from migrator.db import dsn as dsnlib
from migrator.errors import BadInput
from migrator.local import pgserver, provision
from migrator.local.seed import demo_tenants, seed_fleet_stamp
from migrator.provision.create import FleetShape, NewStamp, create_stamp
from migrator.stamps import keyspace

STATE_FILE = "fleet.json"
log = logging.getLogger("migrator.fleet")


@dataclass(frozen=True)
class FleetInfo:
    config_path: Path
    catalog_url: str
    stamps: dict[str, str]
    standbys: dict[str, str] = field(default_factory=dict)  # "server-1 standby r1" -> its DSN (postgres db)

    @property
    def masked_catalog(self) -> str:
        return dsnlib.mask(self.catalog_url)

    @property
    def masked_stamps(self) -> list[list[str]]:
        return [[name, dsnlib.mask(dsn)] for name, dsn in (self.stamps | self.standbys).items()]


def fleet_up(directory: Path, stamps: int = 3, servers: int = 1, replicas: int = 0) -> FleetInfo:
    """Start servers, create and migrate the catalog and stamps, register them, write migrator.toml;
    with `replicas`, that many streaming standbys of each server (`pgserver.start_standby`).

    All or nothing: if any step fails (or is interrupted), every server started so far is stopped and
    what this call created is removed before the error propagates, so no PostgreSQL is left running
    and the same command can simply be run again.
    """
    directory = directory.resolve()
    if (directory / STATE_FILE).exists():
        raise BadInput(f"a fleet already runs in {directory}; run `migrator fleet down --dir {directory}` first")
    directory.mkdir(parents=True, exist_ok=True)
    started: list[pgserver.LocalServer] = []
    created: list[Path] = []
    try:
        for i in range(servers):
            base = directory / f"server-{i + 1}"
            if not base.exists():
                created.append(base)
            started.append(pgserver.start_server(base))
            (directory / STATE_FILE).write_text(json.dumps({"servers": [str(s.datadir) for s in started]}))
        catalog_url = provision.catalog_database(started[0])
        stamp_dsns = _create_stamps(catalog_url, started, stamps)
        config_path = provision.write_config(directory / configlib.DEFAULT_FILE, catalog_url)
        _stride(config_path)
        standbys = {}
        for i, server in enumerate(list(started)):
            for k in range(replicas):
                base = directory / f"server-{i + 1}-standby-{k + 1}"
                created.append(base)
                standby = pgserver.start_standby(server, base, f"r{k + 1}")
                started.insert(0, standby)  # stopped first
                standbys[f"server-{i + 1} standby r{k + 1}"] = standby.dsn()
                (directory / STATE_FILE).write_text(json.dumps({"servers": [str(s.datadir) for s in started]}))
    except BaseException:
        _undo(started, created, directory / STATE_FILE)
        raise
    return FleetInfo(config_path, catalog_url, stamp_dsns, standbys)


def _create_stamps(catalog_url: str, servers: list[pgserver.LocalServer], count: int) -> dict[str, str]:
    """Empty databases spread over the servers, each provisioned by `stamp create` (as users' stamps
    are: the sample application's environment run to the fleet's revision, checked, then registered);
    each after the first matches the first, without surveying the stamps made so far again."""
    config = configlib.Config(catalog_url, script_location=provision.sample_app_env())
    ctx = Context(config, Catalog(catalog_url))
    created: dict[str, str] = {}
    shape: FleetShape | None = None  # the first stamp's revision and structure, which the others must match
    try:
        for i in range(count):
            dsn = provision.create_database(servers[i % len(servers)], f"stamp_{i + 1}")
            stamp = create_stamp(ctx, NewStamp(f"stamp-{i + 1}", dsn, region="local"), shape)
            shape = shape or stamp.shape()
            created[stamp.stamp.name] = stamp.stamp.dsn
    finally:
        ctx.catalog.close()
    return created


def _stride(config_path: Path) -> None:
    """The local fleet starts strided (`migrator keys stride`): ids written on any stamp never collide."""
    ctx = Context.load(config_path)
    try:
        keyspace.stride(ctx)
    finally:
        ctx.catalog.close()


def _undo(started: list[pgserver.LocalServer], created: list[Path], state: Path) -> None:
    """Stop the servers a failed `fleet_up` started and remove what it created; never masks its error."""
    for server in started:
        try:
            server.stop("immediate")
        except Exception as exc:  # keep stopping the others; the original error is the one to report
            log.warning("could not stop the server in %s: %s", server.datadir, exc)
    state.unlink(missing_ok=True)
    for path in created:
        shutil.rmtree(path, ignore_errors=True)


def fleet_down(directory: Path) -> int:
    """Stop every server of the fleet in `directory`; returns how many were stopped."""
    state = directory / STATE_FILE
    if not state.exists():
        raise BadInput(f"no fleet in {directory}")
    datadirs = json.loads(state.read_text())["servers"]
    for datadir in datadirs:
        pgserver.attach_server(Path(datadir)).stop()
    state.unlink()
    return len(datadirs)


def seed_stamp(ctx: Context, stamp_name: str, heavy_rows: int, small: int, first_id: int) -> dict[int, int]:
    """Seed a stamp with demo tenants and route each of them to it."""
    stamp = ctx.catalog.stamp(stamp_name)
    specs = demo_tenants(heavy_rows=heavy_rows, small=small, first_id=first_id)
    counts = seed_fleet_stamp(stamp.dsn, specs)
    for tenant in counts:
        ctx.catalog.set_route(str(tenant), stamp.name)
    return counts
