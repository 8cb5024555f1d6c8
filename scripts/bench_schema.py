"""Benchmark: a fleet-wide schema upgrade of 20 stamps at --parallel 8 against the serial sum.

Starts its own PostgreSQL server (migrator.pgserver), creates 20 stamp databases at the head of a
temporary copy of the stamp history, adds one revision that sleeps 1 s (so the serial sum is 20 s
and the rest is the rollout's overhead), registers the stamps in a temporary catalog and runs
`upgrade_fleet` through the engine. The floor with a canary first is 1 s + ceil(19 / 8) waves x
1 s = 4 s. Run with `scripts/bench schema`. Nothing is written to the repository.
"""

from __future__ import annotations

import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import benchlib  # scripts/, the directory of this script

from migrator.catalog import Catalog
from migrator.context import Context
from migrator.db import alembic as migrations
from migrator.local import pgserver, provision
from migrator.local.provision import sample_app_env
from migrator.rollout.history import History
from migrator.rollout.runner import OK, RolloutOptions, upgrade_fleet

STAMPS = 20
PARALLEL = 8
SLEEP_S = 1.0
REVISION = "0006_bench_sleep"
TARGET_WALL_S = 4.0


def history_with_sleep(directory: Path) -> Path:
    """A copy of the sample application's environment with one more revision on top of its head that sleeps SLEEP_S."""
    env = directory / "stamp-env"
    shutil.copytree(sample_app_env(), env, ignore=shutil.ignore_patterns("__pycache__"))
    head = History.load(env).head
    (env / "versions" / f"{REVISION}.py").write_text(
        f'"""Benchmark only: one second of work."""\n\nfrom alembic import op\n\n'
        f"revision = {REVISION!r}\ndown_revision = {head!r}\nbranch_labels = None\ndepends_on = None\n\n\n"
        f"def upgrade() -> None:\n    op.execute('SELECT pg_sleep({SLEEP_S})')\n\n\n"
        "def downgrade() -> None:\n    pass\n"
    )
    return env


def create_fleet(server: pgserver.LocalServer, env: Path, directory: Path) -> Context:
    """Catalog plus STAMPS stamp databases cloned from one template at the history's previous head."""
    catalog = Catalog(provision.catalog_database(server))
    migrations.upgrade(provision.create_database(server, "stamp_template"), env, f"{REVISION}-1")
    for n in range(1, STAMPS + 1):
        dsn = provision.create_database(server, f"stamp_{n:02d}", template="stamp_template")
        catalog.add_stamp(f"bench-{n:02d}", dsn)
    return Context.load(provision.write_config(directory / "migrator.toml", catalog.url, script_location=env))


def main() -> int:
    benchlib.stop_on_sigterm()
    directory = Path(tempfile.mkdtemp(prefix="migrator-bench-schema-"))
    directory.chmod(0o755)
    server = pgserver.start_server(directory / "server", settings={"max_connections": "300"})
    try:
        env = history_with_sleep(directory)
        ctx = create_fleet(server, env, directory)
        started = time.perf_counter()
        rollout = upgrade_fleet(ctx, RolloutOptions(REVISION, parallel=PARALLEL))
        wall = time.perf_counter() - started
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)
    bad = [o for o in rollout.outcomes if o.result != OK or o.at_revision != REVISION]
    if bad:
        print(f"FAILED: {len(bad)} stamp(s) not upgraded: {bad[0].stamp}: {bad[0].error}", file=sys.stderr)
        return 1
    serial = STAMPS * SLEEP_S
    floor = SLEEP_S * (1 + math.ceil((STAMPS - 1) / PARALLEL))
    waves = len({o.wave for o in rollout.outcomes})
    print(f"schema upgrade of {STAMPS} stamps, one {SLEEP_S:.0f} s revision each, --parallel {PARALLEL}")
    print(f"  waves: {waves} (canary {rollout.canary}, then up to {PARALLEL} stamps at once)")
    print(f"  serial sum: {serial:.1f} s   wall: {wall:.2f} s   speed-up: {serial / wall:.1f}x")
    print(f"  floor with a canary first: {floor:.1f} s; overhead over it: {wall - floor:.2f} s")
    print(f"  target wall < {TARGET_WALL_S:.0f} s: {'met' if wall < TARGET_WALL_S else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
