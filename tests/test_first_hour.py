"""A new user's first hour: two stamps of their own small application (no Alembic), registered with
`stamp add`, their tenants with `route import`; wrong DSNs, wrong catalog credentials, unknown
tenants and stamps that are no longer wanted each get one clear line and nothing half-done."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg
import pytest
from click.testing import CliRunner, Result
from psycopg import sql

from migrator import config as configlib
from migrator.catalog import Catalog
from migrator.cli import cli
from migrator.context import Context
from migrator.db import dsn as dsnlib
from migrator.db.retry import is_transient
from migrator.local import pgserver, provision

# The user's own application: its tenant key is `account_id`, its root table `accounts`.
TENANCY = configlib.Tenancy(column="account_id", root_table="accounts", root_column="id")
SCHEMA = (
    "CREATE TABLE accounts (id bigint PRIMARY KEY, name text NOT NULL)",
    "CREATE TABLE invoices (id bigint GENERATED ALWAYS AS IDENTITY, account_id bigint NOT NULL REFERENCES accounts,"
    " amount numeric(12, 2) NOT NULL, PRIMARY KEY (account_id, id))",
    "CREATE TABLE currencies (code text PRIMARY KEY)",  # global: no tenant column
)
ACCOUNTS = {"shop-a": (1, 2, 3), "shop-b": (4, 5)}
SECRET = "s3cret-Pw"
_ids = itertools.count(1)


@dataclass
class FirstHour:
    """A catalog (migrated, empty) and two databases of the user's application, not yet registered."""

    server: pgserver.LocalServer
    config_path: Path
    ctx: Context = field(repr=False)
    dsns: dict[str, str] = field(repr=False)  # hold the server's password: never in test output
    databases: list[str]

    @property
    def catalog(self) -> Catalog:
        return self.ctx.catalog

    def run(self, *args: str, config: Path | None = None) -> Result:
        return CliRunner().invoke(cli, ["--config", str(config or self.config_path), *args], catch_exceptions=False)

    def add_stamps(self) -> None:
        for name, dsn in self.dsns.items():
            added = self.run("stamp", "add", name, "--dsn", dsn)
            assert added.exit_code == 0, added.output

    def url(self, db: str, user: str | None = None, password: str | None = None) -> str:
        s = self.server
        return (
            f"postgresql://{quote(user or s.user, safe='')}:{quote(password or s.password, safe='')}"
            f"@{s.host}:{s.port}/{db}"
        )

    def routes(self) -> dict[str, str]:
        return {r.tenant: r.stamp for r in self.catalog.routes()}

    def snapshot(self) -> dict[str, list[tuple[Any, ...]]]:
        """Every catalog table, to prove that a refused command wrote nothing."""
        tables = ("stamps", "routes", "moves", "move_tenants", "move_tables", "plans", "plan_moves")
        with dsnlib.connect(self.catalog.url, autocommit=True) as conn:
            return {
                t: conn.execute(sql.SQL("SELECT * FROM {} ORDER BY 1, 2").format(sql.Identifier(t))).fetchall()
                for t in tables
            }


def _write_config(path: Path, catalog_url: str) -> Path:
    """A migrator.toml for the user's application: its tenancy, and no [schema] (it has no Alembic)."""
    path.write_text(configlib.render(catalog_url, TENANCY, None))
    path.chmod(0o600)
    return path


@pytest.fixture
def first_hour(pg: pgserver.LocalServer, templates: dict[str, str], tmp_path: Path) -> Iterator[FirstHour]:
    n = next(_ids)
    catalog_db = f"fh{n}_catalog"
    databases = [catalog_db]
    catalog_url = provision.create_database(pg, catalog_db, template=templates["catalog"])
    dsns = {}
    for name, accounts in ACCOUNTS.items():
        db = f"fh{n}_{name.replace('-', '_')}"
        databases.append(db)
        dsns[name] = provision.create_database(pg, db)
        with dsnlib.connect(dsns[name], autocommit=True) as conn:
            for statement in SCHEMA:
                conn.execute(statement)
            for account in accounts:
                conn.execute("INSERT INTO accounts VALUES (%s, %s)", (account, f"account {account}"))
                conn.execute(
                    "INSERT INTO invoices (account_id, amount) SELECT %s, i * 1.5 FROM generate_series(1, 20) i",
                    (account,),
                )
            conn.execute("INSERT INTO currencies VALUES ('EUR'), ('USD')")
    config_path = _write_config(tmp_path / "migrator.toml", catalog_url)
    fh = FirstHour(pg, config_path, Context.load(config_path), dsns, databases)
    yield fh
    fh.catalog.close()
    for db in databases:
        provision.drop_database(pg, db)


def _one_line(result: Result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


# -- 1. registering tenants -----------------------------------------------------------------------------------


def test_route_import_from_a_stamp_routes_every_tenant_of_its_root_table_and_a_rerun_changes_nothing(
    first_hour: FirstHour,
) -> None:
    first_hour.add_stamps()
    imported = first_hour.run("route", "import", "--stamp", "shop-a")
    assert imported.exit_code == 0, imported.output
    assert imported.stdout.strip() == "routes from stamp shop-a: 3 new, 0 already there"
    assert first_hour.routes() == {"1": "shop-a", "2": "shop-a", "3": "shop-a"}

    before = first_hour.snapshot()
    again = first_hour.run("route", "import", "--stamp", "shop-a", "--json")
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout) == {"source": "stamp shop-a", "new": [], "existing": ["1", "2", "3"]}
    assert first_hour.snapshot() == before  # not even a version or timestamp moved

    with dsnlib.connect(first_hour.dsns["shop-a"], autocommit=True) as conn:  # a tenant signs up later
        conn.execute("INSERT INTO accounts VALUES (10, 'late')")
    later = first_hour.run("route", "import", "--stamp", "shop-a")
    assert later.stdout.strip() == "routes from stamp shop-a: 1 new, 3 already there"
    assert first_hour.routes()["10"] == "shop-a"


def test_route_import_from_a_stamp_refuses_a_tenant_routed_elsewhere_and_writes_nothing(
    first_hour: FirstHour,
) -> None:
    first_hour.add_stamps()
    assert first_hour.run("route", "set", "4", "shop-a").exit_code == 0  # a wrong route, registered by hand
    before = first_hour.snapshot()
    refused = first_hour.run("route", "import", "--stamp", "shop-b")
    assert refused.exit_code == 2, refused.output
    line = _one_line(refused)
    assert "1 tenant(s) already routed to another stamp: 4 (on shop-a, not shop-b)" in line, line
    assert "nothing imported" in line
    assert first_hour.snapshot() == before  # tenant 5, which was free, was not routed either


def test_route_import_from_a_stamp_without_the_configured_root_table_is_refused(first_hour: FirstHour) -> None:
    first_hour.add_stamps()
    with dsnlib.connect(first_hour.dsns["shop-b"], autocommit=True) as conn:
        conn.execute("ALTER TABLE accounts RENAME TO customers")
    refused = first_hour.run("route", "import", "--stamp", "shop-b")
    assert refused.exit_code == 2, refused.output
    assert "stamp shop-b has no table public.accounts with a column id" in _one_line(refused)
    assert first_hour.routes() == {}


def test_route_import_from_a_csv_file_with_or_without_header_is_idempotent(
    first_hour: FirstHour, tmp_path: Path
) -> None:
    first_hour.add_stamps()
    with_header = tmp_path / "routes.csv"
    with_header.write_text("tenant,stamp\n1,shop-a\n 4 , shop-b\n\n")
    imported = first_hour.run("route", "import", str(with_header))
    assert imported.exit_code == 0, imported.output
    assert imported.stdout.strip() == f"routes from {with_header}: 2 new, 0 already there"
    assert first_hour.routes() == {"1": "shop-a", "4": "shop-b"}

    bare = tmp_path / "more.csv"
    bare.write_text("1,shop-a\n2,shop-a\n2,shop-a\n")  # no header; a repeated line counts once
    more = first_hour.run("route", "import", str(bare), "--json")
    assert json.loads(more.stdout) == {"source": str(bare), "new": ["2"], "existing": ["1"]}

    before = first_hour.snapshot()
    again = first_hour.run("route", "import", str(bare))
    assert again.stdout.strip() == f"routes from {bare}: 0 new, 2 already there"
    assert first_hour.snapshot() == before


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("3,shop-a\n9,nowhere\n", "unknown stamp(s) nowhere; nothing imported"),
        ("3,shop-a\n1,shop-b\n", "already routed to another stamp: 1 (on shop-a, not shop-b)"),
        (
            "tenant,stamp\n3,shop-a\n5,shop-b,eu,extra\n",
            "line 3: expected `tenant,stamp[,residency]`, found '5,shop-b,eu,extra'",
        ),
        ("3,shop-a\n,shop-b\n", "line 2: expected `tenant,stamp[,residency]`"),
        ("3,shop-a\n5,shop-b\n3,shop-b\n", "line 3: tenant 3 is given stamp shop-b, but shop-a on line 1"),
        ("tenant,stamp\n\n", "holds no routes"),
    ],
    ids=["unknown stamp", "routed elsewhere", "extra column", "empty tenant", "two stamps", "empty"],
)
def test_route_import_from_a_csv_file_refuses_bad_input_whole(
    first_hour: FirstHour, tmp_path: Path, text: str, message: str
) -> None:
    first_hour.add_stamps()
    assert first_hour.run("route", "set", "1", "shop-a").exit_code == 0
    before = first_hour.snapshot()
    path = tmp_path / "routes.csv"
    path.write_text(text)
    refused = first_hour.run("route", "import", str(path))
    assert refused.exit_code == 2, refused.output
    assert message in _one_line(refused), refused.stderr
    assert first_hour.snapshot() == before  # the valid line 3,shop-a was not imported either


@pytest.mark.parametrize("args", [[], ["FILE", "--stamp", "shop-a"]], ids=["neither", "both"])
def test_route_import_needs_a_file_or_a_stamp_but_not_both(
    first_hour: FirstHour, tmp_path: Path, args: list[str]
) -> None:
    path = tmp_path / "routes.csv"
    path.write_text("1,shop-a\n")
    refused = first_hour.run("route", "import", *[str(path) if a == "FILE" else a for a in args])
    assert refused.exit_code == 2, refused.output
    assert "give a CSV FILE of `tenant,stamp` lines or --stamp NAME" in _one_line(refused)


def test_an_unknown_tenant_error_says_how_to_register_it(first_hour: FirstHour) -> None:
    first_hour.add_stamps()
    for args in (["route", "get", "1"], ["move", "1", "--to", "shop-b", "--yes"]):
        result = first_hour.run(*args)
        assert result.exit_code == 2, (args, result.output)
        assert _one_line(result) == (
            "error: unknown tenant '1' (no route in the catalog; register it with `migrator route set` "
            "or `migrator route import`)"
        )


# -- 2. stamps: checked on add, corrected with update, removed when nothing refers to them -------------------------


def _bad_dsns(fh: FirstHour) -> dict[str, str]:
    s = fh.server
    return {
        "wrong password": fh.url(fh.databases[1], password=SECRET),
        "unknown database": fh.url("fh_no_such_db", password=s.password),
        "unknown option": f"hostx=foo dbname=x password={SECRET}",
        "nothing listening": f"host={s.host} port=1 dbname=x user=u password={SECRET}",
    }


def test_stamp_add_refuses_a_dsn_that_cannot_connect_naming_the_stamp_with_the_password_masked(
    first_hour: FirstHour,
) -> None:
    before = first_hour.snapshot()
    for case, dsn in _bad_dsns(first_hour).items():
        refused = first_hour.run("stamp", "add", "shop-x", "--dsn", dsn)
        assert refused.exit_code == 2, (case, refused.output)
        line = _one_line(refused)
        assert line.startswith("error: cannot connect to stamp shop-x (") and "; not added" in line, (case, line)
        assert "--no-check" in line, line
        assert SECRET not in refused.output and first_hour.server.password not in refused.output, case
        assert "***" in line or case == "unknown database", (case, line)
    assert first_hour.snapshot() == before

    recorded = first_hour.run("stamp", "add", "shop-x", "--dsn", _bad_dsns(first_hour)["wrong password"], "--no-check")
    assert recorded.exit_code == 0, recorded.output
    assert SECRET not in recorded.output
    assert first_hour.catalog.stamp("shop-x").dsn == _bad_dsns(first_hour)["wrong password"]

    duplicate = first_hour.run("stamp", "add", "shop-x", "--dsn", first_hour.dsns["shop-a"])
    assert duplicate.exit_code == 2
    assert "stamp 'shop-x' already exists; change it with `migrator stamp update shop-x`" in _one_line(duplicate)


def test_stamp_update_dsn_is_checked_and_corrects_a_stamp_added_with_a_wrong_one(first_hour: FirstHour) -> None:
    wrong = _bad_dsns(first_hour)["wrong password"]
    assert first_hour.run("stamp", "add", "shop-a", "--dsn", wrong, "--no-check").exit_code == 0
    unreachable = first_hour.run("route", "import", "--stamp", "shop-a")
    assert unreachable.exit_code == 1 and "cannot connect to stamp shop-a" in _one_line(unreachable)

    before = first_hour.snapshot()
    for case, dsn in _bad_dsns(first_hour).items():
        refused = first_hour.run("stamp", "update", "shop-a", "--dsn", dsn)
        assert refused.exit_code == 2, (case, refused.output)
        line = _one_line(refused)
        assert line.startswith("error: cannot connect to stamp shop-a (") and "; not changed" in line, (case, line)
        assert SECRET not in refused.output
    assert first_hour.snapshot() == before
    unknown = first_hour.run("stamp", "update", "shop-z", "--dsn", first_hour.dsns["shop-a"])
    assert unknown.exit_code == 2 and "unknown stamp 'shop-z'" in _one_line(unknown)

    fixed = first_hour.run("stamp", "update", "shop-a", "--dsn", first_hour.dsns["shop-a"])
    assert fixed.exit_code == 0, fixed.output
    assert first_hour.server.password not in fixed.output and "dsn postgresql://" in fixed.stdout
    assert first_hour.catalog.stamp("shop-a").dsn == first_hour.dsns["shop-a"]
    assert first_hour.run("route", "import", "--stamp", "shop-a").exit_code == 0
    assert first_hour.routes() == {"1": "shop-a", "2": "shop-a", "3": "shop-a"}

    unchecked = first_hour.run("stamp", "update", "shop-a", "--dsn", wrong, "--no-check")
    assert unchecked.exit_code == 0 and first_hour.catalog.stamp("shop-a").dsn == wrong


def test_stamp_remove_is_refused_while_a_route_move_or_plan_entry_refers_to_the_stamp(first_hour: FirstHour) -> None:
    first_hour.add_stamps()
    for name in ("shop-c", "shop-d"):
        assert first_hour.run("stamp", "add", name, "--dsn", first_hour.dsns["shop-b"], "--no-check").exit_code == 0
    assert first_hour.run("route", "import", "--stamp", "shop-a").exit_code == 0
    moved = first_hour.run("move", "1", "--to", "shop-b", "--offline", "--yes")
    assert moved.exit_code == 0, moved.output
    verified = first_hour.run("verify", "1", "--source", "shop-a", "--target", "shop-b")
    assert verified.exit_code == 0 and "tenant 1: 2 tables equal" in verified.stdout, verified.output
    with dsnlib.connect(first_hour.catalog.url, autocommit=True) as conn:  # a plan that once named shop-c
        plan = conn.execute("INSERT INTO plans (digest, path, kind) VALUES ('d', 'p.yaml', 'isolate') RETURNING id")
        plan_id = plan.fetchone()[0]  # type: ignore[index]
        conn.execute(
            "INSERT INTO plan_moves (plan_id, position, tenant, source, target, status)"
            " VALUES (%s, 0, '2', 'shop-a', 'shop-c', 'skipped')",
            (plan_id,),
        )
    move_id = first_hour.catalog.moves("1")[0].id
    assert first_hour.run("route", "import", "--stamp", "shop-b").exit_code == 0  # 4, 5 (1 is there already)

    expected = {
        "shop-a": f"2 tenant(s) routed to it (2, 3); 1 move(s) from or to it (ids {move_id}); "
        "1 plan entry from or to it; move its tenants away first (`migrator plan drain shop-a`",
        "shop-b": f"3 tenant(s) routed to it (1, 4, 5); 1 move(s) from or to it (ids {move_id}); move its tenants",
        "shop-c": "1 plan entry from or to it; the catalog keeps that history; retire the stamp instead "
        "(`migrator stamp set-state shop-c retired`)",
    }
    before = first_hour.snapshot()
    for name, message in expected.items():
        refused = first_hour.run("stamp", "remove", name)
        assert refused.exit_code == 2, (name, refused.output)
        assert _one_line(refused).startswith(f"error: stamp {name} is not removed: {message}"), refused.stderr
    assert first_hour.snapshot() == before

    removed = first_hour.run("stamp", "remove", "shop-d")  # registered by mistake, never used
    assert removed.exit_code == 0 and removed.stdout.strip() == "removed stamp shop-d"
    assert sorted(s.name for s in first_hour.catalog.stamps()) == ["shop-a", "shop-b", "shop-c"]
    again = first_hour.run("stamp", "remove", "shop-d")
    assert again.exit_code == 2 and "unknown stamp 'shop-d'" in _one_line(again)


def test_stamp_remove_as_the_least_privilege_role_names_the_delete_grant_it_needs(
    first_hour: FirstHour, tmp_path: Path
) -> None:
    """docs/privileges.md: moves need SELECT, INSERT, UPDATE on the catalog; `stamp remove` also needs DELETE on
    stamps."""
    first_hour.add_stamps()
    role = first_hour.databases[0].removesuffix("_catalog") + "_migrator"
    admin = first_hour.server.dsn(first_hour.databases[0])
    with dsnlib.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(role), sql.Literal(SECRET)))
    try:
        with dsnlib.connect(admin, autocommit=True) as conn:
            who = sql.Identifier(role)
            conn.execute(
                sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(sql.Identifier(first_hour.databases[0]), who)
            )
            conn.execute(sql.SQL("GRANT USAGE ON SCHEMA public TO {}").format(who))
            conn.execute(
                sql.SQL(
                    "GRANT SELECT, INSERT, UPDATE ON stamps, routes, moves, move_tenants, move_tables, plans,"
                    " plan_moves, schema_runs TO {}"
                ).format(who)
            )
        config = _write_config(tmp_path / "operator.toml", first_hour.url(first_hour.databases[0], role, SECRET))
        refused = first_hour.run("stamp", "remove", "shop-b", config=config)
        assert refused.exit_code == 1, refused.output
        assert _one_line(refused) == (
            f"error: `migrator stamp remove` needs DELETE on stamps, which role {role} lacks; run it as the "
            f"catalog's owner, or GRANT DELETE ON stamps TO {role}"
        )
        assert "shop-b" in {s.name for s in first_hour.catalog.stamps()}
        with dsnlib.connect(admin, autocommit=True) as conn:
            conn.execute(sql.SQL("GRANT DELETE ON stamps TO {}").format(sql.Identifier(role)))
        assert first_hour.run("stamp", "remove", "shop-b", config=config).exit_code == 0
        assert "shop-b" not in {s.name for s in first_hour.catalog.stamps()}
    finally:
        with dsnlib.connect(admin, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


# -- 3. catalog errors --------------------------------------------------------------------------------------


def _catalog_urls(fh: FirstHour) -> dict[str, str]:
    s = fh.server
    return {
        "wrong password": fh.url(fh.databases[0], password=SECRET),
        "unknown role": fh.url(fh.databases[0], user="nobody_here", password=SECRET),
        "unknown database": fh.url("fh_no_such_catalog"),
        "unknown option": f"hostx=foo dbname={fh.databases[0]} password={SECRET}",
        "unknown host": f"postgresql://u:{SECRET}@no-such-host.invalid:{s.port}/catalog",
    }


REASONS = {
    "wrong password": "password authentication failed for user",
    "unknown role": "password authentication failed for user",  # the server does not tell which
    "unknown database": 'database "fh_no_such_catalog" does not exist',
    "unknown option": 'invalid connection option "hostx"',
    "unknown host": "failed to resolve host 'no-such-host.invalid'",
}


@pytest.mark.parametrize("case", sorted(REASONS))
def test_a_misconfigured_catalog_fails_at_once_in_one_line_naming_it(
    first_hour: FirstHour, tmp_path: Path, case: str
) -> None:
    url = _catalog_urls(first_hour)[case]
    config = _write_config(tmp_path / "bad.toml", url)
    for args in (
        ["stamp", "list"],
        ["route", "get", "1"],
        ["route", "import", "--stamp", "shop-a"],
        ["move", "1", "--to", "shop-b", "--yes"],
        ["-v", "stamp", "add", "s", "--dsn", "x", "--no-check"],
    ):
        started = time.monotonic()
        result = first_hour.run(*args, config=config)
        elapsed = time.monotonic() - started
        assert result.exit_code == 1, (case, args, result.output)
        line = _one_line(result)  # no retry warnings before it
        assert line.startswith(f"error: cannot connect to the catalog ({dsnlib.mask(url)}"), (case, line)
        assert REASONS[case] in line, (case, line)
        assert SECRET not in result.output and first_hour.server.password not in result.output
        assert elapsed < 2.0, (case, args, elapsed)  # not retried (it was: five warnings over three seconds)


@pytest.mark.parametrize(("verbose", "retry_lines"), [((), 1), (("-v",), 5)], ids=["quiet", "verbose"])
def test_a_catalog_that_refuses_connections_is_retried_with_one_line_then_named(
    first_hour: FirstHour, tmp_path: Path, verbose: tuple[str, ...], retry_lines: int
) -> None:
    """One line while a restart is waited for (`-v`: one per attempt), then the one error line."""
    url = f"postgresql://u:{SECRET}@{first_hour.server.host}:1/catalog"
    result = first_hour.run(*verbose, "stamp", "list", config=_write_config(tmp_path / "down.toml", url))
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len([line for line in lines if "transient error" in line]) == retry_lines, result.stderr
    if not verbose:
        assert len(lines) == 2, result.stderr
    assert lines[-1].startswith(f"error: cannot connect to the catalog ({dsnlib.mask(url)}): connection failed: ")
    assert "Connection refused" in lines[-1] and SECRET not in result.output


def test_connection_errors_a_retry_cannot_cure_are_not_transient(first_hour: FirstHour) -> None:
    """Classified on real failures: connection errors carry no SQLSTATE, only libpq's message."""
    found: dict[str, bool] = {}
    for case, url in {**_catalog_urls(first_hour), "refused": f"host={first_hour.server.host} port=1"}.items():
        with pytest.raises(psycopg.Error) as caught:
            dsnlib.connect(url).close()
        found[case] = is_transient(caught.value)
    with dsnlib.connect(first_hour.catalog.url, autocommit=True) as victim:  # a session the server ends
        with dsnlib.connect(first_hour.catalog.url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (victim.info.backend_pid,))
        with pytest.raises(psycopg.Error) as caught:
            victim.execute("SELECT 1")
        found["terminated"] = is_transient(caught.value)
    assert found == {case: case in ("refused", "terminated") for case in found}


# -- 4. verify --------------------------------------------------------------------------------------------


def test_verify_of_an_unknown_tenant_is_bad_input_not_an_empty_success(first_hour: FirstHour) -> None:
    first_hour.add_stamps()
    for tenant in ("1", "99"):  # rows on shop-a but no route; neither rows nor route
        result = first_hour.run("verify", tenant, "--source", "shop-a", "--target", "shop-b")
        assert result.exit_code == 2, (tenant, result.output)
        assert _one_line(result).startswith(f"error: unknown tenant '{tenant}' (no route in the catalog;")
        assert "equal" not in result.stdout
    assert first_hour.run("route", "import", "--stamp", "shop-a").exit_code == 0
    known = first_hour.run("verify", "1", "--source", "shop-a", "--target", "shop-b")
    assert known.exit_code == 1 and "accounts: source 1 rows, target 0 rows" in known.stderr, known.output
