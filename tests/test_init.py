"""`migrator init` writes a commented, private migrator.toml, guessing the tenancy from a real stamp."""

from __future__ import annotations

import itertools
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from conftest import Fleet

from migrator import config as configlib
from migrator.cli import cli
from migrator.config import Tenancy
from migrator.db import dsn as dsnlib
from migrator.local import pgserver, provision

SECRET = "S3cretPW"
_numbers = itertools.count(1)

# An application of its own: tenants are accounts keyed by uuid, one global table, one table that
# holds the tenant key only through a composite foreign key, and no Alembic.
ACCOUNTS_APP = """
CREATE TABLE plans (code text PRIMARY KEY, price numeric);
CREATE TABLE accounts (id uuid PRIMARY KEY, name text NOT NULL, plan text REFERENCES plans);
CREATE TABLE members (
    account_id uuid NOT NULL REFERENCES accounts, id bigint, email text NOT NULL, org_id int,
    PRIMARY KEY (account_id, id));
CREATE TABLE invoices (
    account_id uuid NOT NULL REFERENCES accounts, no bigint, total numeric NOT NULL,
    PRIMARY KEY (account_id, no));
CREATE TABLE invoice_lines (
    account_id uuid NOT NULL, invoice_no bigint, line int, amount numeric NOT NULL,
    PRIMARY KEY (account_id, invoice_no, line), FOREIGN KEY (account_id, invoice_no) REFERENCES invoices);
"""


@pytest.fixture(autouse=True)
def _no_catalog_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MIGRATOR_CATALOG_URL", raising=False)
    monkeypatch.delenv("MIGRATOR_CONFIG", raising=False)


@pytest.fixture
def databases(pg: pgserver.LocalServer) -> Iterator[list[str]]:
    """Names of databases a test creates on the session's server; dropped afterwards."""
    created: list[str] = []
    yield created
    for name in created:
        provision.drop_database(pg, name)


def _init(*args: str) -> Result:
    return CliRunner().invoke(cli, ["init", *args], prog_name="migrator")


def _private(path: Path) -> bool:
    return stat.S_IMODE(path.stat().st_mode) == 0o600


def test_init_from_a_stamp_guesses_the_tenancy_and_writes_a_private_file_that_loads(
    fleet: Fleet, tmp_path: Path
) -> None:
    path = tmp_path / "app.toml"  # the fleet's own migrator.toml is next to it
    result = _init("--catalog", fleet.catalog.url, "--from-stamp", fleet.dsn("eu-1"), "--path", str(path))
    assert result.exit_code == 0, result.output
    # the sample application: 9 tables, 6 with tenant_id; users, projects, attachments reference tenants(id)
    assert "tenancy column tenant_id: present in 6 of 10 tables" in result.stdout, result.stdout
    assert "root table tenants (id), referenced by 3 foreign keys" in result.stdout, result.stdout
    assert f"wrote {path}" in result.stdout
    assert fleet.server.password not in result.output
    assert _private(path)

    loaded = configlib.load(path)
    assert loaded.tenancy == Tenancy("tenant_id", "tenants", "id", "public", ())
    assert loaded.catalog_url == fleet.catalog.url  # the file holds the URL as given
    assert loaded.script_location is None
    text = path.read_text()
    assert "\n# [schema]\n" in text and "\n[schema]" not in text  # alembic_version is there: only a hint
    assert "tenancy column tenant_id: present in 6 of 10 tables" in text  # the reasons stay with the file
    assert fleet.server.password not in text.replace(fleet.catalog.url, "")  # the stamp's DSN is masked

    listed = CliRunner().invoke(cli, ["--config", str(path), "stamp", "list"])
    assert listed.exit_code == 0 and "eu-1" in listed.stdout, listed.output


def test_init_guesses_another_applications_tenancy_and_a_move_works_with_it(
    pg: pgserver.LocalServer, templates: dict[str, str], databases: list[str], tmp_path: Path
) -> None:
    n = next(_numbers)
    names = {"catalog": f"init{n}_catalog", "a": f"init{n}_a", "b": f"init{n}_b"}
    databases.extend(names.values())
    catalog_url = provision.create_database(pg, names["catalog"], template=templates["catalog"])
    stamps = {}
    for stamp in ("a", "b"):
        stamps[stamp] = provision.create_database(pg, names[stamp])
        with dsnlib.connect(stamps[stamp], autocommit=True) as conn:
            conn.execute(ACCOUNTS_APP)
            conn.execute("INSERT INTO plans VALUES ('team', 49)")  # global rows exist on every stamp
    account = str(uuid.uuid4())
    with dsnlib.connect(stamps["a"], autocommit=True) as conn:
        conn.execute("INSERT INTO accounts VALUES (%s, 'Acme', 'team')", (account,))
        conn.execute(
            "INSERT INTO members SELECT %s, g, 'm' || g || '@acme.test', 1 FROM generate_series(1, 40) g", (account,)
        )
        conn.execute("INSERT INTO invoices SELECT %s, g, g * 10 FROM generate_series(1, 30) g", (account,))
        conn.execute(
            "INSERT INTO invoice_lines SELECT %s, g, l, 5 FROM generate_series(1, 30) g, generate_series(1, 3) l",
            (account,),
        )

    path = tmp_path / "migrator.toml"
    result = _init("--catalog", catalog_url, "--from-stamp", stamps["a"], "--path", str(path))
    assert result.exit_code == 0, result.output
    assert "tenancy column account_id: present in 3 of 5 tables" in result.stdout, result.stdout
    assert "other candidates, in fewer tables: org_id (1)" in result.stdout, result.stdout
    assert "root table accounts (id), referenced by 2 foreign keys" in result.stdout, result.stdout
    assert pg.password not in result.output
    text = path.read_text()
    assert "schema]" not in text and "alembic" not in text  # no Alembic on this stamp: no hint either
    assert configlib.load(path).tenancy == Tenancy("account_id", "accounts", "id", "public", ())

    def run(*args: str) -> Result:
        return CliRunner().invoke(cli, ["--config", str(path), *args], catch_exceptions=False)

    for stamp, dsn in stamps.items():
        assert run("stamp", "add", stamp, "--dsn", dsn).exit_code == 0
    assert run("route", "set", account, "a").exit_code == 0
    moved = run("move", account, "--to", "b", "--yes", "--no-progress")
    assert moved.exit_code == 0, moved.output
    assert f"{1 + 40 + 30 + 90} rows copied and verified" in moved.stdout, moved.stdout


def test_init_refuses_to_overwrite_a_file_without_force(tmp_path: Path) -> None:
    path = tmp_path / "migrator.toml"
    path.write_text("catalog_url = 'postgresql://keep@me/catalog'\n")
    path.chmod(0o644)
    result = _init("--path", str(path), "--from-stamp", "postgresql://nobody@127.0.0.1:1/never-reached")
    assert result.exit_code == 2, result.output
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1 and str(path) in line and "--force" in line, line
    assert path.read_text() == "catalog_url = 'postgresql://keep@me/catalog'\n"  # and nothing was connected to

    result = _init("--path", str(path), "--force")
    assert result.exit_code == 0, result.output
    assert configlib.load(path).tenancy == Tenancy() and _private(path)


def test_init_without_a_stamp_writes_the_commented_defaults(tmp_path: Path) -> None:
    catalog = f"postgresql://operator:{SECRET}@catalog.internal:5432/catalog"
    path = tmp_path / "chosen.toml"
    result = CliRunner().invoke(cli, ["--config", str(path), "init", "--catalog", catalog], prog_name="migrator")
    assert result.exit_code == 0, result.output
    assert SECRET not in result.output
    assert f"`migrator --config {path} catalog init`" in result.stdout  # --config is where init writes
    loaded = configlib.load(path)
    assert loaded.tenancy == Tenancy() and loaded.catalog_url == catalog and loaded.script_location is None
    text = path.read_text()
    assert "schema]" not in text
    lines = text.splitlines()
    for key in ("catalog_url", "column", "root_table", "schema", "exclude"):  # each explained where it is set
        at = next(i for i, line in enumerate(lines) if line.startswith(f"{key} = "))
        assert lines[at - 1].startswith("# "), (key, text)
    assert _private(path)

    bare = tmp_path / "bare.toml"
    result = _init("--path", str(bare))
    assert result.exit_code == 0, result.output
    assert "catalog_url is a placeholder" in result.stdout
    assert configlib.load(bare).catalog_url  # parses even before the catalog is chosen


def test_init_from_an_unreachable_stamp_fails_in_one_masked_line_and_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "migrator.toml"
    result = _init("--path", str(path), "--from-stamp", f"postgresql://app:{SECRET}@127.0.0.1:1/app")
    assert result.exit_code == 1, result.output
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1 and "cannot connect to the stamp given by --from-stamp" in line, line
    assert "postgresql://app:***@127.0.0.1:1/app" in line and SECRET not in result.output
    assert not path.exists()


@pytest.mark.parametrize(
    ("ddl", "reasons", "tenancy"),
    [
        (
            "CREATE TABLE workspaces (id int PRIMARY KEY);"
            "CREATE TABLE docs (workspace_id int NOT NULL, id int, PRIMARY KEY (workspace_id, id));"
            "CREATE TABLE pages (workspace_id int NOT NULL, n int PRIMARY KEY)",
            [
                "tenancy column workspace_id: present in 2 of 3 tables",
                "root table workspaces (id): no foreign key references it by workspace_id, guessed by name",
            ],
            Tenancy("workspace_id", "workspaces", "id"),
        ),
        (
            "CREATE TABLE things (id int PRIMARY KEY, name text)",
            ["no tenant key column found"],
            Tenancy(),
        ),
    ],
    ids=["root by name", "nothing tenant-like"],
)
def test_init_says_how_it_guessed_when_foreign_keys_do_not_tell(
    pg: pgserver.LocalServer, databases: list[str], tmp_path: Path, ddl: str, reasons: list[str], tenancy: Tenancy
) -> None:
    name = f"init{next(_numbers)}_app"
    databases.append(name)
    dsn = provision.create_database(pg, name)
    with dsnlib.connect(dsn, autocommit=True) as conn:
        conn.execute(ddl)
    path = tmp_path / "migrator.toml"
    result = _init("--from-stamp", dsn, "--path", str(path))
    assert result.exit_code == 0, result.output
    for reason in reasons:
        assert reason in result.stdout, result.stdout
    assert configlib.load(path).tenancy == tenancy


def test_init_prints_how_each_table_is_placed_and_names_references_that_are_no_foreign_key(
    pg: pgserver.LocalServer, databases: list[str], tmp_path: Path
) -> None:
    name = f"init{next(_numbers)}_app"
    databases.append(name)
    dsn = provision.create_database(pg, name)
    with dsnlib.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE accounts (id bigint PRIMARY KEY);"
            "CREATE TABLE projects (id bigint PRIMARY KEY, account_id bigint NOT NULL REFERENCES accounts);"
            "CREATE TABLE milestones (id bigint PRIMARY KEY, project_id bigint NOT NULL REFERENCES projects);"
            "CREATE TABLE tasks (id bigint PRIMARY KEY, project_id bigint NOT NULL);"  # no constraint (Rails)
            "CREATE TABLE currencies (code text PRIMARY KEY)"
        )
    path = tmp_path / "migrator.toml"
    result = _init("--from-stamp", dsn, "--path", str(path))
    assert result.exit_code == 0, result.output
    for line in (
        "  accounts: by column id",
        "  projects: by column account_id",
        "  milestones: by path milestones.project_id -> projects.account_id",
        "  currencies: global (no tenant column, no foreign key to a tenant table)",
        "  tasks: global (no tenant column, no foreign key to a tenant table)",
        "  tasks.project_id (like projects)",
    ):
        assert line in result.stdout, (line, result.stdout)
    assert "# " + "  milestones: by path" in path.read_text()  # kept as comments in the file
