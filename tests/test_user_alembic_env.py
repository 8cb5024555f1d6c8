"""The user's own Alembic environment, as `alembic init` writes it, driven unmodified across the fleet.

The stock env.py builds its own engine from `sqlalchemy.url` and renders offline SQL from it, so
migrator must give each stamp's run that URL (without the password for a dry run) while still
holding the stamp's schema lock on its own session.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import alembic
import pytest
from alembic import command
from alembic.config import Config
from conftest import REPO, STAMP_NAMES, Fleet, new_fleet, stamp_snapshot
from psycopg import sql

from migrator.db import alembic as migrations
from migrator.db import dsn as dsnlib
from migrator.local import pgserver
from migrator.rollout.runner import FAILED, OK, RolloutOptions, upgrade_fleet

STOCK_ENV = Path(alembic.__file__).parent / "templates" / "generic" / "env.py"
REV1, REV2, REV3 = "a1_accounts", "b2_account_email", "c3_audit_log"
# Columns of the user's tables at each revision: what "consistent with alembic_version" means here.
COLUMNS = {
    None: set(),
    REV1: {"accounts.id", "accounts.name"},
    REV2: {"accounts.id", "accounts.name", "accounts.email"},
    REV3: {"accounts.id", "accounts.name", "accounts.email", "audit_log.id", "audit_log.event"},
}


def write_revision(env: Path, revision: str, down: str | None, upgrade: str, downgrade: str) -> None:
    """A plain revision file, as a user writes one (one-line bodies)."""
    (env / "versions" / f"{revision}.py").write_text(
        f'"""{revision}"""\nimport sqlalchemy as sa\nfrom alembic import op\n\n'
        f"revision = {revision!r}\ndown_revision = {down!r}\nbranch_labels = None\ndepends_on = None\n\n\n"
        f"def upgrade() -> None:\n    {upgrade}\n\n\ndef downgrade() -> None:\n    {downgrade}\n"
    )


def alembic_init(project: Path) -> Path:
    """`alembic init` with the stock template, plus two revisions; env.py left exactly as generated."""
    project.mkdir()
    env = project / "migrations"
    command.init(Config(str(project / "alembic.ini")), str(env))
    assert (env / "env.py").read_bytes() == STOCK_ENV.read_bytes()
    write_revision(
        env, REV1, None,
        'op.create_table("accounts", sa.Column("id", sa.Integer, primary_key=True),'
        ' sa.Column("name", sa.Text, nullable=False))',
        'op.drop_table("accounts")',
    )  # fmt: skip
    write_revision(
        env, REV2, REV1,
        'op.add_column("accounts", sa.Column("email", sa.Text))',
        'op.drop_column("accounts", "email")',
    )  # fmt: skip
    return env


@pytest.fixture
def user_env(tmp_path: Path) -> Path:
    return alembic_init(tmp_path / "app")


@pytest.fixture
def user_fleet(pg: pgserver.LocalServer, templates: dict[str, str], tmp_path: Path, user_env: Path) -> Iterator[Fleet]:
    """Three empty stamps (no alembic_version) whose config points at the user's environment."""
    with new_fleet(pg, templates, tmp_path, stamp_template=None, script_location=user_env) as fleet:
        yield fleet


def state(fleet: Fleet, stamp: str) -> tuple[str | None, set[str]]:
    """The stamp's alembic_version and the columns of its tables besides alembic_version."""
    with dsnlib.connect(fleet.dsn(stamp), autocommit=True) as conn:
        revision = migrations.read_revision(conn)
        rows = conn.execute(
            "SELECT table_name || '.' || column_name FROM information_schema.columns"
            " WHERE table_schema = 'public' AND table_name <> 'alembic_version'"
        ).fetchall()
    return revision, {row[0] for row in rows}


def revisions(fleet: Fleet) -> dict[str, str | None]:
    return {name: state(fleet, name)[0] for name in STAMP_NAMES}


def no_secret(fleet: Fleet, *texts: str) -> None:
    for text in texts:
        assert fleet.server.password not in text


def sql_blocks(stdout: str) -> dict[str, str]:
    """A dry run's output by block header (`STAMPS: FROM -> TO (pending: ...)`), each with its SQL."""
    parts = re.split(r"^-- (\S.*: \S+ -> \S+ \(pending: .*\))$", stdout, flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_stock_env_upgrades_reports_and_downgrades_every_stamp(user_fleet: Fleet) -> None:
    fleet = user_fleet
    before = fleet.run("schema", "status")
    assert before.exit_code == 3, before.output
    assert "3 of 3 stamps drift from head b2_account_email: eu-1 (behind 2), eu-2 (behind 2), us-1 (behind 2)" in (
        before.stdout
    )

    upgrade = fleet.run("schema", "upgrade", "--yes")
    assert upgrade.exit_code == 0, upgrade.output
    assert {name: state(fleet, name) for name in STAMP_NAMES} == {name: (REV2, COLUMNS[REV2]) for name in STAMP_NAMES}
    after = fleet.run("schema", "status")
    assert after.exit_code == 0 and f"all 3 stamps at head {REV2}" in after.stdout

    down = fleet.run("schema", "downgrade", REV1, "--stamp", "eu-2", "--yes")
    assert down.exit_code == 0, down.output
    assert state(fleet, "eu-2") == (REV1, COLUMNS[REV1])
    assert revisions(fleet) == {"eu-1": REV2, "eu-2": REV1, "us-1": REV2}
    drift = fleet.run("schema", "status", "--json")
    assert drift.exit_code == 3
    assert {s["stamp"]: (s["state"], s["pending"]) for s in json.loads(drift.stdout)["stamps"]} == {
        "eu-1": ("up to date", []),
        "eu-2": ("behind", [REV2]),
        "us-1": ("up to date", []),
    }
    log = json.loads(fleet.run("schema", "log", "--stamp", "eu-2", "--json").stdout)
    assert [(r["direction"], r["from_revision"], r["to_revision"], r["result"]) for r in log] == [
        ("downgrade", REV2, REV1, OK),
        ("upgrade", None, REV2, OK),
    ]
    no_secret(fleet, before.output, upgrade.output, after.output, down.output, drift.output)


def test_dry_run_renders_each_stamps_sql_from_a_url_without_password_and_changes_nothing(user_fleet: Fleet) -> None:
    fleet = user_fleet
    assert fleet.run("schema", "upgrade", REV1, "--yes").exit_code == 0
    assert fleet.run("schema", "downgrade", "base", "--stamp", "eu-1", "--yes").exit_code == 0
    snapshots = {name: stamp_snapshot(fleet.dsn(name)) for name in STAMP_NAMES}

    result = fleet.run("schema", "upgrade", "--dry-run")
    assert result.exit_code == 0, result.output
    blocks = sql_blocks(result.stdout)
    fresh_header = f"eu-1: base -> {REV2} (pending: {REV1}, {REV2})"
    behind_header = f"eu-2, us-1: {REV1} -> {REV2} (pending: {REV2})"
    assert set(blocks) == {fresh_header, behind_header}
    fresh, behind = blocks[fresh_header], blocks[behind_header]
    assert "CREATE TABLE alembic_version" in fresh and "CREATE TABLE accounts" in fresh
    assert "ALTER TABLE accounts ADD COLUMN email TEXT" in fresh
    assert "CREATE TABLE" not in behind and "ALTER TABLE accounts ADD COLUMN email TEXT" in behind
    assert f"UPDATE alembic_version SET version_num='{REV2}' WHERE alembic_version.version_num = '{REV1}'" in behind
    assert "Traceback" not in result.output
    no_secret(fleet, result.output)
    assert {name: stamp_snapshot(fleet.dsn(name)) for name in STAMP_NAMES} == snapshots
    assert revisions(fleet) == {"eu-1": None, "eu-2": REV1, "us-1": REV1}


def test_revision_failing_on_one_stamp_leaves_it_consistent_while_the_others_reach_head(
    user_fleet: Fleet, user_env: Path
) -> None:
    fleet = user_fleet
    assert fleet.run("schema", "upgrade", REV1, "--yes").exit_code == 0
    write_revision(
        user_env, REV3, REV2,
        'op.create_table("audit_log", sa.Column("id", sa.Integer, primary_key=True), sa.Column("event", sa.Text))',
        'op.drop_table("audit_log")',
    )  # fmt: skip
    with dsnlib.connect(fleet.dsn("us-1")) as conn:  # only us-1 already has a table of that name
        conn.execute("CREATE TABLE audit_log (legacy text)")

    result = fleet.run("schema", "upgrade", "--yes", "--canary", "eu-1", "--parallel", "2", "--continue-on-error")
    assert result.exit_code == 1
    assert f'us-1: upgrade {REV3} failed, stamp left at {REV1}: relation "audit_log" already exists' in result.stderr
    assert "Traceback" not in result.output
    assert state(fleet, "eu-1") == state(fleet, "eu-2") == (REV3, COLUMNS[REV3])
    # The stock env.py runs all pending revisions in one transaction: REV2 went back with REV3.
    assert state(fleet, "us-1") == (REV1, COLUMNS[REV1] | {"audit_log.legacy"})
    runs = {r["stamp"]: r for r in json.loads(fleet.run("schema", "log", "--json").stdout) if r["to_revision"] == REV3}
    assert {name: (r["result"], r["from_revision"]) for name, r in runs.items()} == {
        "eu-1": (OK, REV1), "eu-2": (OK, REV1), "us-1": (FAILED, REV1),
    }  # fmt: skip


def broken_env(user_env: Path, kind: str) -> None:
    """env.py as users break it: importing their app (which is not installed), or a URL of its own."""
    env_py = user_env / "env.py"
    text = env_py.read_text()
    if kind == "import":
        env_py.write_text("import myapp.models  # noqa\n" + text)
    else:
        line = "config = context.config\n"
        env_py.write_text(text.replace(line, line + 'config.set_main_option("sqlalchemy.url", "driver://u:p@h/db")\n'))


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("import", "ModuleNotFoundError: No module named 'myapp'"),
        ("url", "NoSuchModuleError: Can't load plugin: sqlalchemy.dialects:driver"),
    ],
)
def test_broken_env_py_fails_with_one_line_naming_the_stamp_and_the_traceback_only_with_verbose(
    user_fleet: Fleet, user_env: Path, kind: str, message: str
) -> None:
    fleet = user_fleet
    broken_env(user_env, kind)

    upgrade = fleet.run("schema", "upgrade", "--yes", "--canary", "eu-2")
    assert upgrade.exit_code == 1
    assert f"eu-2: upgrade failed, stamp left at base: {message}" in upgrade.stderr
    assert upgrade.stdout.count("failed: eu-2; stopped after the canary failed on eu-2") == 1  # the summary, once
    assert upgrade.output.count(f"eu-2: upgrade failed, stamp left at base: {message}") == 1
    dry = fleet.run("schema", "upgrade", "--dry-run")
    assert dry.exit_code == 1
    assert dry.stdout.count(f"upgrade --dry-run failed: {message}") == 3
    assert dry.stdout.count(f"upgrade to {REV2}: 3 failed") == 1
    for result in (upgrade, dry):
        assert "Traceback" not in result.output

    verbose = fleet.run("-v", "schema", "upgrade", "--yes", "--canary", "eu-2")
    assert verbose.exit_code == 1
    assert "stamp eu-2 failed:\nTraceback (most recent call last):" in verbose.stderr
    assert message in verbose.stderr.split("Traceback (most recent call last):")[1]
    verbose_dry = fleet.run("--verbose", "schema", "upgrade", "--dry-run")
    assert "dry run of stamp us-1 failed:\nTraceback (most recent call last):" in verbose_dry.stderr
    no_secret(fleet, upgrade.output, dry.output, verbose.output, verbose_dry.output)
    assert revisions(fleet) == {"eu-1": None, "eu-2": None, "us-1": None}


def test_exception_in_a_revision_on_a_worker_stamp_is_one_line_and_its_traceback_reaches_verbose(
    user_fleet: Fleet, user_env: Path
) -> None:
    fleet = user_fleet
    write_revision(
        user_env, REV3, REV2,
        "if op.get_bind().exec_driver_sql('SELECT current_database()').scalar().endswith('us_1'):"
        " raise RuntimeError('no audit log on this stamp')",
        "pass",
    )  # fmt: skip

    line = f"us-1: upgrade {REV3} failed, stamp left at base: RuntimeError: no audit log on this stamp"
    args = ("schema", "upgrade", "--yes", "--canary", "eu-1", "--parallel", "2", "--continue-on-error")
    verbose = fleet.run("-v", *args)
    assert verbose.exit_code == 1
    assert line in verbose.stderr  # us-1 ran in a worker process; its traceback came back with the result
    trace = verbose.stderr.split("stamp us-1 failed:\nTraceback (most recent call last):")[1]
    assert f"{REV3}.py" in trace and "RuntimeError: no audit log on this stamp" in trace
    assert revisions(fleet) == {"eu-1": REV3, "eu-2": REV3, "us-1": None}

    quiet = fleet.run("schema", "upgrade", "--yes")  # us-1 alone now, in-process
    assert quiet.exit_code == 1
    assert line in quiet.stderr and "Traceback" not in quiet.output
    no_secret(fleet, quiet.output, verbose.output)


def test_second_run_is_refused_while_a_stock_env_migrates_on_its_own_connection(
    user_fleet: Fleet, user_env: Path
) -> None:
    fleet = user_fleet
    write_revision(user_env, REV3, REV2, 'op.execute("SELECT pg_sleep(3)")', "pass")
    first = fleet.popen("schema", "upgrade", "--yes", "--json")
    try:
        deadline = time.monotonic() + 30
        sessions: list[tuple[int, str]] = []
        while len(sessions) < 2:
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.05)
            canary = next((name for name in STAMP_NAMES if sessions_of(fleet, name)), None)
            sessions = sessions_of(fleet, canary) if canary else []
        assert canary is not None
        # The schema lock is held by one session while Alembic's own connection runs the revision.
        assert sorted(kind for _, kind in sessions) == ["lock", "migrating"]
        assert sessions[0][0] != sessions[1][0]

        second = upgrade_fleet(fleet.ctx, RolloutOptions(parallel=4))
        assert first.poll() is None
        assert [o.stamp for o in second.failed] == [canary]
        assert f"stamp {canary} is being migrated by another migrator run (backend pid" in str(second.failed[0].error)
    finally:
        out, err = first.communicate(timeout=60)
    assert first.returncode == 0, err
    assert all(s["result"] == OK for s in json.loads(out)["stamps"])
    assert revisions(fleet) == {name: REV3 for name in STAMP_NAMES}


def sessions_of(fleet: Fleet, stamp: str) -> list[tuple[int, str]]:
    """Backends on the stamp's database holding an advisory lock ("lock") or sleeping in the revision."""
    with dsnlib.connect(fleet.dsn(stamp), autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid, 'lock' FROM pg_locks WHERE locktype = 'advisory' AND granted"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            " UNION ALL SELECT pid, 'migrating' FROM pg_stat_activity WHERE datname = current_database()"
            " AND state = 'active' AND query LIKE '%pg_sleep(3)%' AND pid <> pg_backend_pid()"
        ).fetchall()
    return [(int(pid), str(kind)) for pid, kind in rows]


def test_stamps_given_as_url_keywords_with_odd_password_and_service_name_all_migrate(
    user_fleet: Fleet, tmp_path: Path
) -> None:
    fleet = user_fleet
    server = fleet.server
    role, password = f"app owner {uuid.uuid4().hex[:8]}", "p%4 0@x/y:z'q%%"
    eu2_db, us1_db = fleet.databases[2], fleet.databases[3]
    with dsnlib.connect(server.dsn("postgres"), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(role), sql.Literal(password)))
    try:
        with dsnlib.connect(server.dsn(eu2_db), autocommit=True) as conn:
            conn.execute(sql.SQL("GRANT CREATE ON SCHEMA public TO {}").format(sql.Identifier(role)))
        quoted = password.replace("\\", "\\\\").replace("'", "\\'")
        fleet.catalog.update_stamp(
            "eu-2", dsn=f"host={server.host} port={server.port} dbname={eu2_db} user='{role}' password='{quoted}'"
        )
        services = tmp_path / "pg_service.conf"
        services.write_text(
            f"[stamp_us1]\nhost={server.host}\nport={server.port}\ndbname={us1_db}\n"
            f"user={server.user}\npassword={server.password}\n"
        )
        fleet.catalog.update_stamp("us-1", dsn="stamp_us1")
        env = {**os.environ, "PGSERVICEFILE": str(services)}

        def run(*args: str) -> subprocess.CompletedProcess[str]:  # a process of its own: workers see the env
            return subprocess.run(
                [sys.executable, "-m", "migrator", "--config", str(fleet.config_path), *args],
                capture_output=True, text=True, cwd=REPO, env=env, timeout=120,
            )  # fmt: skip

        dry = run("schema", "upgrade", "--dry-run")
        assert dry.returncode == 0, dry.stderr
        assert f"-- eu-1, eu-2, us-1: base -> {REV2}" in dry.stdout
        upgrade = run("schema", "upgrade", "--yes", "--canary", "us-1", "--parallel", "2")
        assert upgrade.returncode == 0, upgrade.stdout + upgrade.stderr
        status = run("schema", "status")
        assert status.returncode == 0 and f"all 3 stamps at head {REV2}" in status.stdout
        assert all(state(fleet, name) == (REV2, COLUMNS[REV2]) for name in STAMP_NAMES)
        with dsnlib.connect(server.dsn(eu2_db), autocommit=True) as conn:  # migrated as that role, not as admin
            assert conn.execute("SELECT tableowner FROM pg_tables WHERE tablename = 'accounts'").fetchone() == (role,)
        for result in (dry, upgrade, status):
            for secret in (password, password.replace("%", "%%"), quote(password, safe=" +"), server.password):
                assert secret not in result.stdout + result.stderr
    finally:
        with dsnlib.connect(server.dsn(eu2_db), autocommit=True) as conn:
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
        with dsnlib.connect(server.dsn("postgres"), autocommit=True) as conn:
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_revision_file_that_does_not_import_is_refused_in_one_line_before_any_stamp(
    user_fleet: Fleet, user_env: Path
) -> None:
    fleet = user_fleet
    (user_env / "versions" / f"{REV3}.py").write_text(
        f"import myapp.models\n\nrevision = {REV3!r}\ndown_revision = {REV2!r}\n"
    )
    status = fleet.run("schema", "status")
    assert status.exit_code == 2  # bad input, not a drift alarm
    message = f"{user_env}: cannot load its revisions: ModuleNotFoundError: No module named 'myapp'"
    assert status.stderr == f"error: {message}\n"
    verbose = fleet.run("-v", "schema", "upgrade", "--yes")
    assert verbose.exit_code == 2
    assert f"loading the revisions of {user_env} failed:\nTraceback (most recent call last):" in verbose.stderr
    assert f"{REV3}.py" in verbose.stderr
    assert json.loads(fleet.run("schema", "log", "--json").stdout) == []
    assert revisions(fleet) == {name: None for name in STAMP_NAMES}
