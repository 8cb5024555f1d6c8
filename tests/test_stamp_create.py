"""`migrator stamp create`: a new stamp is provisioned at the fleet's revision and registered with its
attributes and key block in one step; anything it refuses or fails at registers nothing and says
where the database was left."""

from __future__ import annotations

import shutil
from pathlib import Path

from click.testing import CliRunner
from conftest import Fleet
from psycopg import sql

from migrator.cli import cli
from migrator.db import dsn as dsnlib
from migrator.db.alembic import current_revision
from migrator.local import provision
from migrator.stamps.sequences import block_of

HEAD = "0006_task_checklists"


def _empty_database(fleet: Fleet, name: str) -> str:
    """A new empty database on the fleet's server, dropped with the fleet; returns its DSN."""
    db = fleet.databases[0].removesuffix("_catalog") + f"_{name}"
    fleet.databases.append(db)
    return provision.create_database(fleet.server, db)


def _names(fleet: Fleet) -> list[str]:
    return [s.name for s in fleet.catalog.stamps()]


def _password(fleet: Fleet) -> str:
    return fleet.server.password


def test_stamp_create_brings_an_empty_database_to_head_and_registers_it_with_attributes_and_key_block(
    fleet: Fleet,
) -> None:
    assert fleet.run("keys", "stride", "--yes").exit_code == 0  # blocks 1..3: a new stamp gets the next one
    dsn = _empty_database(fleet, "eu_3")

    result = fleet.run(
        "stamp", "create", "eu-3", "--dsn", dsn, "--region", "eu", "--capacity-rows", "5000",
        "--state", "draining", "--kind", "dedicated",
    )  # fmt: skip

    assert result.exit_code == 0, result.output + result.stderr
    assert _password(fleet) not in result.output + result.stderr
    assert f"created stamp eu-3: provisioned at revision {HEAD}, draining" in result.stdout
    assert "key block 4" in result.stdout and dsnlib.mask(dsn) in result.stdout
    assert current_revision(dsn) == HEAD
    stamp = fleet.catalog.stamp("eu-3")
    assert (stamp.region, stamp.capacity_rows, stamp.state, stamp.kind, stamp.key_block) == (
        "eu", 5000, "draining", "dedicated", 4,
    )  # fmt: skip
    with dsnlib.connect(dsn, autocommit=True) as conn:
        query = "SELECT sequencename FROM pg_sequences WHERE data_type = 'bigint'::regtype"
        bigint = [r[0] for r in conn.execute(query)]
        assert bigint, "the sample application has bigint sequences"
        issued = [conn.execute("SELECT nextval(%s)", (name,)).fetchone()[0] for name in bigint]
    assert {block_of(value) for value in issued} == {4}  # its new ids never collide with another stamp's
    assert fleet.run("keys", "check").exit_code == 0


def test_a_database_holding_application_tables_is_refused_unless_adopted(fleet: Fleet) -> None:
    hand_made = _empty_database(fleet, "hand_made")
    with dsnlib.connect(hand_made, autocommit=True) as conn:
        conn.execute("CREATE TABLE notes (id bigint PRIMARY KEY, body text)")
        conn.execute("CREATE TABLE parted (id int) PARTITION BY RANGE (id)")
        conn.execute("CREATE TABLE parted_1 PARTITION OF parted FOR VALUES FROM (0) TO (10)")
        conn.execute("CREATE SCHEMA _migrator")  # migrator's own: not the application's
        conn.execute("CREATE TABLE _migrator.leftover (id int)")
    refused = fleet.run("stamp", "create", "eu-3", "--dsn", hand_made)
    assert refused.exit_code == 2
    assert "holds 2 application table(s) (public.notes, public.parted)" in refused.stderr  # a partition is its parent's
    assert "--adopt" in refused.stderr
    assert "nothing changed" in refused.stderr and _password(fleet) not in refused.stderr

    at_head = fleet.databases[0].removesuffix("_catalog") + "_at_head"  # a stamp migrated by hand, not registered
    fleet.databases.append(at_head)
    dsn = provision.create_database(fleet.server, at_head, template="tpl_stamp")
    refused = fleet.run("stamp", "create", "eu-4", "--dsn", dsn)
    assert refused.exit_code == 2 and f"at revision {HEAD}" in refused.stderr
    assert _names(fleet) == ["eu-1", "eu-2", "us-1"]

    adopted = fleet.run("stamp", "create", "eu-4", "--dsn", dsn, "--adopt", "--region", "eu")
    assert adopted.exit_code == 0, adopted.stderr
    assert f"adopted at {HEAD}, now at revision {HEAD}" in adopted.stdout
    assert fleet.catalog.stamp("eu-4").region == "eu"

    again = fleet.run("stamp", "create", "eu-5", "--dsn", dsn, "--adopt")
    assert again.exit_code == 2 and "already stamp eu-4's" in again.stderr


def test_a_stamp_create_that_fails_half_way_registers_nothing_and_names_the_revision_left(fleet: Fleet) -> None:
    dsn = _empty_database(fleet, "half")
    with dsnlib.connect(dsn, autocommit=True) as conn:  # not a table: the emptiness check lets it through,
        conn.execute("CREATE TYPE feature_flags AS (x int)")  # and revision 0002 cannot create its table

    failed = fleet.run("stamp", "create", "eu-3", "--dsn", dsn, "--region", "eu")

    assert failed.exit_code == 1
    line = failed.stderr.strip()
    assert len(line.splitlines()) == 1, line
    assert "upgrade 0002_collaboration failed, stamp left at 0001_core" in line and "feature_flags" in line
    left = "nothing registered; database left at revision 0001_core: drop it, or fix the cause and rerun with --adopt"
    assert left in line
    assert _password(fleet) not in failed.output + failed.stderr
    assert _names(fleet) == ["eu-1", "eu-2", "us-1"]
    assert current_revision(dsn) == "0001_core"

    assert fleet.run("stamp", "create", "eu-3", "--dsn", dsn).exit_code == 2  # not empty any more
    with dsnlib.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP TYPE feature_flags")
    resumed = fleet.run("stamp", "create", "eu-3", "--dsn", dsn, "--adopt")
    assert resumed.exit_code == 0, resumed.stderr
    assert "adopted at 0001_core, now at revision " + HEAD in resumed.stdout
    assert current_revision(dsn) == HEAD


def test_without_an_alembic_environment_stamp_create_refuses_and_explains(fleet: Fleet, tmp_path: Path) -> None:
    config = tmp_path / "no-schema.toml"
    config.write_text(f'catalog_url = "{fleet.catalog.url}"\n')
    config.chmod(0o600)
    dsn = _empty_database(fleet, "no_env")

    result = CliRunner().invoke(cli, ["--config", str(config), "stamp", "create", "eu-3", "--dsn", dsn])

    assert result.exit_code == 2
    assert "no Alembic environment" in result.stderr and "script_location" in result.stderr
    assert "migrator stamp add" in result.stderr
    assert _names(fleet) == ["eu-1", "eu-2", "us-1"] and current_revision(dsn) is None


def test_a_broken_env_py_registers_nothing_and_says_the_database_has_no_revision(fleet: Fleet, tmp_path: Path) -> None:
    env = tmp_path / "broken_env"
    shutil.copytree(provision.sample_app_env(), env)
    (env / "env.py").write_text("raise RuntimeError('env.py cannot reach the secrets vault')\n")
    config = provision.write_config(tmp_path / "broken.toml", fleet.catalog.url, script_location=env)
    dsn = _empty_database(fleet, "broken_env")

    result = CliRunner().invoke(cli, ["--config", str(config), "stamp", "create", "eu-3", "--dsn", dsn])

    assert result.exit_code == 1
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1 and "env.py cannot reach the secrets vault" in line, line
    assert line.endswith("nothing registered; the database has no revision: fix the cause and run it again"), line
    assert _names(fleet) == ["eu-1", "eu-2", "us-1"] and current_revision(dsn) is None


def test_a_fleet_mid_rollout_is_refused_and_a_fleet_behind_head_gives_its_own_revision(fleet: Fleet) -> None:
    dsn = _empty_database(fleet, "mid")

    assert fleet.run("schema", "downgrade", "0005_task_watchers", "--stamp", "us-1", "--yes").exit_code == 0
    refused = fleet.run("stamp", "create", "eu-3", "--dsn", dsn)
    assert refused.exit_code == 2
    assert f"the fleet is not at one revision (2 at {HEAD}, 1 at 0005_task_watchers (us-1))" in refused.stderr
    assert current_revision(dsn) is None and _names(fleet) == ["eu-1", "eu-2", "us-1"]

    assert fleet.run("schema", "downgrade", "0005_task_watchers", "--yes").exit_code == 0
    created = fleet.run("stamp", "create", "eu-3", "--dsn", dsn)
    assert created.exit_code == 0, created.stderr
    assert "at revision 0005_task_watchers" in created.stdout and f"behind head {HEAD}" in created.stdout
    assert current_revision(dsn) == "0005_task_watchers"


def _index(fleet: Fleet, stamp: str, name: str, column: str) -> None:
    with dsnlib.connect(fleet.dsn(stamp), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE INDEX {} ON tasks ({})").format(sql.Identifier(name), sql.Identifier(column)))


def test_a_new_stamp_must_have_the_structure_most_of_the_fleet_shares(fleet: Fleet) -> None:
    for stamp in ("eu-1", "eu-2"):  # a hot-fix index made by hand on two stamps of three, never in a revision
        _index(fleet, stamp, "tasks_due_hotfix", "due_at")
    dsn = _empty_database(fleet, "shaped")

    differs = fleet.run("stamp", "create", "eu-3", "--dsn", dsn)

    assert differs.exit_code == 1
    line = differs.stderr.strip()
    assert "its structure differs from the fleet's (2 of 3 stamps share" in line and "like eu-1" in line, line
    assert "index tasks_due_hotfix: only on eu-1 (CREATE INDEX tasks_due_hotfix ON public.tasks" in line, line
    assert "USING btree (due_at)); nothing registered;" in line, line
    assert line.endswith(f"database left at revision {HEAD}: drop it, or fix the cause and rerun with --adopt")
    assert _names(fleet) == ["eu-1", "eu-2", "us-1"] and current_revision(dsn) == HEAD

    _index(fleet, "us-1", "tasks_due_hotfix", "due_at")  # now on every stamp: the new one gets it too
    with dsnlib.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE INDEX tasks_due_hotfix ON tasks (due_at)")
    adopted = fleet.run("stamp", "create", "eu-3", "--dsn", dsn, "--adopt")
    assert adopted.exit_code == 0, adopted.stderr

    for stamp in ("eu-1", "eu-2"):  # eu-1 and eu-2 against us-1 and eu-3: two ties two
        _index(fleet, stamp, "tasks_title", "title")
    tie = _empty_database(fleet, "tie")
    refused = fleet.run("stamp", "create", "eu-4", "--dsn", tie)
    assert refused.exit_code == 2
    assert "have 2 structures and none is shared by more stamps than the others" in refused.stderr
    assert "(eu-1, eu-2)" in refused.stderr and "(eu-3, us-1)" in refused.stderr
    assert current_revision(tie) is None and "eu-4" not in _names(fleet)
