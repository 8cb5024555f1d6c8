"""Shared fixtures: one real PostgreSQL server per test session, fresh databases per test.

The server comes from `migrator.local.pgserver` (local binaries, run as the `postgres` OS user when the
tests run as root; testcontainers where a Docker engine exists). If no server can be started the
session fails loudly: these tests never skip and never mock the database.
"""

from __future__ import annotations

import itertools
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from click.testing import CliRunner, Result
from psycopg import conninfo, sql

from migrator import config as configlib
from migrator.catalog import Catalog
from migrator.context import Context
from migrator.db import dsn as dsnlib
from migrator.local import pgserver, provision
from migrator.local.provision import sample_app_env
from migrator.local.seed import TenantSpec, seed_fleet_stamp, seed_tenant
from migrator.stamps.discovery import Layout, discover, tenant_filter

REPO = Path(__file__).resolve().parent.parent
STAMP_NAMES = ("eu-1", "eu-2", "us-1")
_counter = itertools.count(1)


@pytest.fixture(scope="session")
def pg() -> Iterator[pgserver.LocalServer]:
    base = Path(tempfile.mkdtemp(prefix="migrator-tests-"))
    base.chmod(0o755)
    server = pgserver.start_server(base / "server")
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def templates(pg: pgserver.LocalServer) -> dict[str, str]:
    """Template databases migrated to head once; each test clones them (fast) instead of migrating."""
    provision.catalog_database(pg, "tpl_catalog")
    provision.stamp_database(pg, "tpl_stamp")
    return {"catalog": "tpl_catalog", "stamp": "tpl_stamp"}


BUSY_HEAVY_ROWS = 200_000


@pytest.fixture(scope="session")
def busy_template(pg: pgserver.LocalServer, templates: dict[str, str]) -> str:
    """A stamp at head holding heavy tenant 7 (BUSY_HEAVY_ROWS) and small tenant 8, seeded once per session."""
    dsn = provision.create_database(pg, "tpl_busy", template=templates["stamp"])
    seed_fleet_stamp(dsn, [TenantSpec(7, BUSY_HEAVY_ROWS), TenantSpec(8, 2_000)])
    return "tpl_busy"


@pytest.fixture
def busy(pg: pgserver.LocalServer, templates: dict[str, str], busy_template: str, tmp_path: Path) -> Iterator[Fleet]:
    """A fleet whose eu-1 holds heavy tenant 7 and small tenant 8 (cloned, not seeded, per test)."""
    with new_fleet(pg, templates, tmp_path, clones={"eu-1": busy_template}) as fleet:
        for tenant in ("7", "8"):
            fleet.catalog.set_route(tenant, "eu-1")
        yield fleet


class RunsCli:
    """The CLI against this fleet's `config_path`: in-process (`run`) or as a real process (`popen`).

    Where the fleet has a `password` (of a role the tests made), it must never appear in the output.
    """

    config_path: Path

    def run(self, *args: str) -> Result:
        """Invoke the CLI in-process with this fleet's config."""
        from migrator.cli import cli

        result = CliRunner().invoke(cli, ["--config", str(self.config_path), *args], catch_exceptions=False)
        secret = getattr(self, "password", None)
        if secret:
            assert secret not in result.output + result.stderr
        return result

    def popen(self, *args: str, **kwargs: Any) -> subprocess.Popen[str]:
        """Start the CLI as a real process (for kill -9 and concurrency tests)."""
        return subprocess.Popen(
            [sys.executable, "-m", "migrator", "--config", str(self.config_path), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env={**os.environ},
            **kwargs,
        )


@dataclass
class Fleet(RunsCli):
    """A catalog and three stamps of fresh databases on the session's server, with a config file."""

    server: pgserver.LocalServer
    config_path: Path
    ctx: Context = field(repr=False)
    stamps: dict[str, str] = field(repr=False)  # DSNs carry the password: never in test output
    databases: list[str] = field(default_factory=list)

    @property
    def catalog(self) -> Catalog:
        return self.ctx.catalog

    def dsn(self, stamp: str) -> str:
        return self.stamps[stamp]

    def seed(self, stamp: str, tenant: int, rows: int) -> int:
        """Seed a tenant on a stamp and route it there; returns its exact row count."""
        with dsnlib.connect(self.stamps[stamp]) as conn:
            count = seed_tenant(conn, TenantSpec(tenant, rows))
        self.catalog.set_route(str(tenant), stamp)
        return count

    def seed_many(self, stamp: str, tenants: Sequence[int], rows: int) -> dict[int, int]:
        """Seed several tenants on a stamp and route them there in one import; returns their row counts."""
        counts = seed_fleet_stamp(self.stamps[stamp], [TenantSpec(t, rows) for t in tenants])
        self.catalog.import_routes([(str(t), stamp) for t in tenants])
        return counts

    def layout(self, stamp: str = "eu-1") -> Layout:
        with dsnlib.connect(self.stamps[stamp], autocommit=True) as conn:
            return discover(conn, self.ctx.config.tenancy)


def wait_until(
    predicate: Callable[[], bool], what: str, timeout: float = 120, proc: subprocess.Popen[str] | None = None
) -> None:
    """Poll `predicate` until true; fail naming `what` on timeout, or at once if `proc` ended first."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the process ended (exit {proc.returncode}) before {what}: {proc.communicate()[1][-2000:]}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@contextmanager
def copy_held(fleet: Fleet, stamp: str) -> Iterator[None]:
    """Moves into `stamp` stay in phase copying, waiting at the last tenant table, until the block ends.

    Holds that table in SHARE mode on the target (reads pass, the copy's writes wait), so a test
    can act during a copy however fast or slow the machine is.
    """
    last = fleet.layout().tables[-1]
    with dsnlib.connect(fleet.dsn(stamp), pinned=False) as hold:
        hold.execute(sql.SQL("LOCK TABLE {} IN SHARE MODE").format(last.ident))
        yield


def copy_waits_at_held_table(fleet: Fleet, stamp: str) -> bool:
    """Inside `copy_held`: every other table's copy is complete on `stamp` and the copy waits for the held one.

    Parallel streams copy tables at once, so waiting for the held table alone does not say the
    others are done. Their committed cursors do not say it either: each table is analyzed after its
    last batch commits (a lock on it then still stops the copy). The catalog's per-table progress,
    recorded after that, does.
    """
    others = len(fleet.layout().tables) - 1
    with dsnlib.connect(fleet.dsn(stamp), autocommit=True, pinned=False) as conn:
        waiting = conn.execute("SELECT count(*) FROM pg_locks WHERE NOT granted AND locktype = 'relation'")
        if not waiting.fetchone()[0]:
            return False
        if conn.execute("SELECT to_regclass('_migrator.copy_progress')").fetchone() == (None,):
            return False  # the waiter is not a copy (autovacuum, say): no move has started copying yet
        moves = [row[0] for row in conn.execute("SELECT DISTINCT move_id FROM _migrator.copy_progress")]
    return any(sum(t.done for t in fleet.catalog.tables(move_id)) >= others for move_id in moves)


@contextmanager
def new_fleet(
    pg: pgserver.LocalServer,
    templates: dict[str, str],
    config_dir: Path,
    stamp_template: str | None = "stamp",
    script_location: Path | None = None,
    clones: dict[str, str] | None = None,
) -> Iterator[Fleet]:
    """A fresh catalog and the stamps of STAMP_NAMES, registered, with a config file; all dropped after.

    The stamps are clones of the sample application at head (`stamp_template="stamp"`) or empty
    databases (`None`: no tables, no alembic_version) for an Alembic environment of the test's own;
    `clones` names another template database for some stamps (stamp name -> database).
    """
    n = next(_counter)
    catalog_db = f"t{n}_catalog"
    databases = [catalog_db]
    catalog = Catalog(provision.create_database(pg, catalog_db, template=templates["catalog"]))
    stamps = {}
    for name in STAMP_NAMES:
        db = f"t{n}_{name.replace('-', '_')}"
        databases.append(db)
        template = (clones or {}).get(name) or (stamp_template and templates[stamp_template])
        stamps[name] = provision.create_database(pg, db, template=template)
        catalog.add_stamp(name, stamps[name], region=name.split("-")[0])
    catalog.close()
    config_path = provision.write_config(config_dir / "migrator.toml", catalog.url, script_location=script_location)
    fleet = Fleet(pg, config_path, Context.load(config_path), stamps, databases)
    try:
        yield fleet
    finally:
        fleet.catalog.close()
        for db in databases:
            provision.drop_database(pg, db)


@pytest.fixture
def fleet(pg: pgserver.LocalServer, templates: dict[str, str], tmp_path: Path) -> Iterator[Fleet]:
    with new_fleet(pg, templates, tmp_path) as fleet:
        yield fleet


def terminate_migrator_sessions(fleet: Fleet, dsn: str) -> int:
    """pg_terminate_backend of every migrator session on the DSN's database (as the server's superuser)."""
    dbname = conninfo.conninfo_to_dict(dsn)["dbname"]
    with dsnlib.connect(fleet.server.dsn(), autocommit=True, application_name="test") as admin:
        row = admin.execute(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE application_name = 'migrator' AND datname = %s",
            (dbname,),
        ).fetchone()
    assert row is not None
    return int(row[0])


def tenant_digest(dsn: str, layout: Layout, tenant: str, by_name: bool = False) -> dict[str, tuple[int, str]]:
    """An oracle independent of migrator.verify: per table, row count and md5 of all rows in text order.

    `by_name` builds each row from its columns in name order, for stamps whose tables hold the same
    columns in another physical order (the whole-row `t::text` follows that order).
    """
    out = {}
    with dsnlib.connect(dsn, autocommit=True) as conn:
        for table in layout.tables:
            names = sorted(c.name for c in table.columns)
            row_text = (
                sql.SQL("ROW({})::text").format(sql.SQL(", ").join(sql.Identifier("t", n) for n in names))
                if by_name
                else sql.SQL("t::text")
            )
            row = conn.execute(
                sql.SQL(
                    "SELECT count(*), coalesce(md5(string_agg(r, '|' ORDER BY r)), '') FROM "
                    "(SELECT {} AS r FROM {} t WHERE {}) s"
                ).format(row_text, table.ident, tenant_filter(table, (tenant,), sql.Identifier("t")))
            ).fetchone()
            assert row is not None
            out[table.label] = (int(row[0]), str(row[1]))
    return out


def loaded_by(code: str, *modules: str) -> list[str]:
    """Which of `modules` (a package's name counts for all of it) a fresh interpreter holds once it ran `code`."""
    probe = (
        f"import json, sys\n{code}\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m in {modules!r} or m.split('.')[0] in {modules!r})))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=REPO)
    return list(json.loads(out.stdout.splitlines()[-1]))


def copied_on(fleet: Fleet, stamp: str = "eu-2") -> dict[str, int]:
    """Rows per table that the copy cursors on `stamp` say are committed (none before a copy starts)."""
    with dsnlib.connect(fleet.dsn(stamp), autocommit=True) as conn:
        if not conn.execute("SELECT to_regclass('_migrator.copy_progress') IS NOT NULL").fetchone()[0]:
            return {}
        rows = conn.execute("SELECT table_name, sum(rows_copied) FROM _migrator.copy_progress GROUP BY 1").fetchall()
        return {table: int(n) for table, n in rows if n}


def tenant_row_count(dsn: str, layout: Layout, tenant: str) -> int:
    return sum(rows for rows, _ in tenant_digest(dsn, layout, tenant).values())


def catalog_snapshot(fleet: Fleet) -> dict[str, list[tuple[Any, ...]]]:
    """Everything in the catalog, to prove a refused command changed nothing."""
    with dsnlib.connect(fleet.catalog.url, autocommit=True) as conn:
        return {
            table: conn.execute(sql.SQL("SELECT * FROM {} ORDER BY 1").format(sql.Identifier(table))).fetchall()
            for table in ("stamps", "routes", "moves", "move_tenants", "move_tables")
        }


def stamp_snapshot(dsn: str) -> dict[str, Any]:
    """Every table's content digest plus migrator's objects on a stamp."""
    with dsnlib.connect(dsn, autocommit=True) as conn:
        tables = conn.execute(
            "SELECT schemaname, tablename FROM pg_tables"
            " WHERE schemaname NOT IN ('pg_catalog', 'information_schema') ORDER BY 1, 2"
        ).fetchall()
        digest = {
            f"{schema}.{name}": conn.execute(
                sql.SQL(
                    "SELECT count(*), md5(coalesce(string_agg(x::text, '|' ORDER BY x::text), '')) FROM {} x"
                ).format(sql.Identifier(schema, name))
            ).fetchone()
            for schema, name in tables
        }
        triggers = conn.execute(
            "SELECT tgname, tgrelid::regclass::text FROM pg_trigger WHERE NOT tgisinternal ORDER BY 1, 2"
        ).fetchall()
    return {"tables": digest, "triggers": triggers}


CATALOG_TABLES = (
    "stamps", "routes", "moves", "move_tenants", "move_tables", "plans", "plan_moves", "schema_runs", "throttle",
    "tenants",
)  # fmt: skip
APPEND_ONLY_TABLES = ("audit",)  # SELECT, INSERT only: the audit trail
QUEUE_TABLES = ("procrastinate_jobs", "procrastinate_events", "procrastinate_periodic_defers", "procrastinate_workers")
QUEUE_SEQUENCES = ("procrastinate_jobs_id_seq", "procrastinate_events_id_seq", "procrastinate_periodic_defers_id_seq")


def as_superuser(server: pgserver.LocalServer, db: str, *statements: str | sql.Composable) -> None:
    """Run statements in database `db` of the server as its superuser, each committed on its own."""
    with dsnlib.connect(server.dsn(db), autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)


def create_roles(server: pgserver.LocalServer, owner: str, *logins: str) -> str:
    """An application's owner role (NOLOGIN, it owns the tables) and LOGIN roles (migrator's, the
    application's) sharing a new random password, which is returned."""
    password = secrets.token_urlsafe(18)
    login = sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}")
    as_superuser(
        server,
        "postgres",
        sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(owner)),
        *(login.format(sql.Identifier(role), sql.Literal(password)) for role in logins),
    )
    return password


def drop_roles(server: pgserver.LocalServer, databases: Sequence[str], *roles: str) -> None:
    """Drop what the roles own or were granted in each database, then the roles."""
    everyone = sql.SQL(", ").join(map(sql.Identifier, roles))
    for db in databases:
        as_superuser(server, db, sql.SQL("DROP OWNED BY {}").format(everyone))
    for role in roles:
        as_superuser(server, "postgres", sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


def operator_grants(
    operator: str, app_owner: str, stamp_dbs: list[str], catalog_db: str
) -> list[tuple[str, sql.Composed]]:
    """docs/privileges.md ("Privileges a move needs"), statement by statement, each with the database it runs in."""
    role, public = sql.Identifier(operator), sql.Identifier("public")
    grants = [("postgres", sql.SQL("GRANT {} TO {}").format(sql.Identifier(app_owner), role))]
    for db in stamp_dbs:
        grants += [
            (db, sql.SQL("GRANT CONNECT, CREATE, TEMPORARY ON DATABASE {} TO {}").format(sql.Identifier(db), role)),
            (db, sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(public, role)),
        ]
    tables = sql.SQL(", ").join(sql.Identifier(t) for t in CATALOG_TABLES)
    append_only = sql.SQL(", ").join(sql.Identifier(t) for t in APPEND_ONLY_TABLES)
    queue = sql.SQL(", ").join(sql.Identifier(t) for t in QUEUE_TABLES)
    sequences = sql.SQL(", ").join(sql.Identifier(s) for s in QUEUE_SEQUENCES)
    return [
        *grants,
        (catalog_db, sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(sql.Identifier(catalog_db), role)),
        (catalog_db, sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(public, role)),
        (catalog_db, sql.SQL("GRANT SELECT, INSERT, UPDATE ON {} TO {}").format(tables, role)),
        (catalog_db, sql.SQL("GRANT SELECT, INSERT ON {} TO {}").format(append_only, role)),
        (catalog_db, sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE ON {} TO {}").format(queue, role)),
        (catalog_db, sql.SQL("GRANT USAGE ON SEQUENCE {} TO {}").format(sequences, role)),
    ]


def grant_operator(
    server: pgserver.LocalServer, operator: str, app_owner: str, stamp_dbs: list[str], catalog_db: str
) -> None:
    """Give `operator` exactly docs/privileges.md's grants (`operator_grants`), as the superuser."""
    for db, statement in operator_grants(operator, app_owner, stamp_dbs, catalog_db):
        as_superuser(server, db, statement)


def login_url(server: pgserver.LocalServer, user: str, password: str, db: str) -> str:
    """The URL of a login role a test made (`create_roles`), password quoted, as a configuration names it."""
    return f"postgresql://{quote(user, safe='')}:{quote(password, safe='')}@{server.host}:{server.port}/{db}"


@dataclass
class Bespoke(RunsCli):
    """A catalog and stamps holding a schema a test writes by hand (no Alembic), reached as README's roles:
    `owner` owns the application's tables, migrator logs in as `operator` with exactly `operator_grants`.
    The catalog lists the stamps by the operator's URLs; `config_path` reaches it as the operator."""

    server: pgserver.LocalServer
    databases: dict[str, str]  # "catalog" and each stamp -> its database
    owner: str
    operator: str
    password: str = field(repr=False)  # of every login role made with the operator
    catalog: Catalog = field(repr=False)  # the superuser's: routes for the test, snapshots
    config_path: Path

    def url(self, user: str, db: str) -> str:
        return login_url(self.server, user, self.password, db)

    def admin(self, stamp: str) -> str:
        """The superuser's DSN of a stamp: the tests' oracle, independent of migrator's role."""
        return self.server.dsn(self.databases[stamp])

    def operator_dsn(self, stamp: str) -> str:
        return self.url(self.operator, self.databases[stamp])


BespokeFactory = Callable[..., Bespoke]


@pytest.fixture
def bespoke(pg: pgserver.LocalServer, templates: dict[str, str], tmp_path: Path) -> Iterator[BespokeFactory]:
    """Builds a Bespoke named by `prefix` with empty `stamps`, `schema(made, stamp)` writing each stamp's
    tables (as the superuser, for `owner`) before the operator's grants; `logins` are more login roles (the
    application's). Drops every database and role it made after the test."""
    databases: list[str] = []
    roles: list[str] = []
    catalogs: list[Catalog] = []

    def build(prefix: str, stamps: Sequence[str], schema: Callable[[Bespoke, str], None], *logins: str) -> Bespoke:
        names = {"catalog": f"{prefix}_catalog", **{s: f"{prefix}_{s.replace('-', '_')}" for s in stamps}}
        for stamp, db in names.items():
            provision.create_database(pg, db, template=templates["catalog"] if stamp == "catalog" else None)
            databases.append(db)
        owner, operator = f"{prefix}_app_owner", f"{prefix}_migrator"
        password = create_roles(pg, owner, operator, *logins)
        roles.extend([owner, operator, *logins])
        catalog = Catalog(pg.dsn(names["catalog"]))
        catalogs.append(catalog)
        made = Bespoke(pg, names, owner, operator, password, catalog, tmp_path / f"{prefix}.toml")
        for stamp in stamps:
            schema(made, stamp)
        grant_operator(pg, operator, owner, [names[s] for s in stamps], names["catalog"])
        for stamp in stamps:
            catalog.add_stamp(stamp, made.operator_dsn(stamp), region="eu")
        catalog_url = made.url(operator, names["catalog"])
        made.config_path.write_text(configlib.render(catalog_url, configlib.Tenancy(), sample_app_env()))
        return made

    yield build
    for catalog in catalogs:
        catalog.close()
    for db in databases:
        provision.drop_database(pg, db)
    drop_roles(pg, ["postgres"], *reversed(roles))


@pytest.fixture
def fleet4(fleet: Fleet, templates: dict[str, str]) -> Fleet:
    """`fleet` plus a fourth stamp, ap-1, at head on the same server: enough stamps for canary + waves.

    Its database joins `fleet.databases`, so the `fleet` fixture drops it with the others.
    """
    db = fleet.databases[0].removesuffix("_catalog") + "_ap_1"
    fleet.databases.append(db)
    fleet.stamps["ap-1"] = provision.create_database(fleet.server, db, template=templates["stamp"])
    fleet.catalog.add_stamp("ap-1", fleet.stamps["ap-1"], region="ap")
    return fleet
