"""Paths in migrator.toml are relative to the file, and `[schema]` is optional.

`script_location` resolves from the config file's own directory (never the current directory nor
where migrator is installed), a missing one is refused before any connection by the commands that use
it (a config copied elsewhere still lists routes and moves tenants), and a config without
`[schema]` still moves tenants while `migrator schema` says that no environment is configured.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import STAMP_NAMES, Fleet, tenant_digest

from migrator import config as configlib
from migrator.db import dsn as dsnlib
from migrator.local.provision import sample_app_env

HEAD = "0006_task_checklists"


def migrator(config: Path, cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """The CLI as a real process started in `cwd`, so relative paths cannot lean on the test's directory."""
    return subprocess.run(
        [sys.executable, "-m", "migrator", "--config", str(config), *args],
        capture_output=True, text=True, cwd=cwd, env={**os.environ, **env}, timeout=120,
    )  # fmt: skip


def test_script_location_is_relative_to_the_config_file_not_the_current_directory(fleet: Fleet, tmp_path: Path) -> None:
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    shutil.copytree(sample_app_env(), project / "db" / "stamp", ignore=shutil.ignore_patterns("__pycache__"))
    elsewhere.mkdir()
    config = project / "migrator.toml"
    config.write_text(configlib.render(fleet.catalog.url, configlib.Tenancy(), Path("db/stamp")))
    assert 'script_location = "db/stamp"' in config.read_text()

    status = migrator(config, elsewhere, "schema", "status")
    assert status.returncode == 0, status.stderr
    assert f"all 3 stamps at head {HEAD}" in status.stdout
    history = migrator(Path("../project/migrator.toml"), elsewhere, "schema", "history")  # --config relative to cwd
    assert history.returncode == 0, history.stderr
    assert history.stdout.splitlines()[1].split()[:2] == ["head", HEAD]
    via_env = subprocess.run(
        [sys.executable, "-m", "migrator", "schema", "history"],
        capture_output=True, text=True, cwd=elsewhere, env={**os.environ, "MIGRATOR_CONFIG": str(config)}, timeout=120,
    )  # fmt: skip
    assert via_env.returncode == 0 and HEAD in via_env.stdout, via_env.stderr


def test_missing_script_location_is_refused_naming_the_path_before_any_connection(tmp_path: Path) -> None:
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    project.mkdir()
    elsewhere.mkdir()
    (elsewhere / "db" / "stamp").mkdir(parents=True)  # present only beside the current directory
    (elsewhere / "db" / "stamp" / "env.py").write_text("")
    config = project / "migrator.toml"
    config.write_text(  # nothing listens on port 1: a connection attempt would fail differently
        'catalog_url = "postgresql://operator:s3cr3t-pw@127.0.0.1:1/catalog"\n'
        '\n[schema]\nscript_location = "db/stamp"\n'
    )
    for args in (("schema", "status"), ("schema", "upgrade", "--yes"), ("schema", "history")):
        result = migrator(config, elsewhere, *args)
        assert result.returncode == 2, (args, result.stderr)
        assert result.stderr == (
            f"error: {config}: [schema] script_location: no such directory {project / 'db' / 'stamp'}\n"
        ), args
        assert result.stdout == "" and "s3cr3t-pw" not in result.stderr


def test_a_config_copied_where_its_script_location_is_missing_still_runs_commands_that_do_not_use_it(
    fleet: Fleet, tmp_path: Path
) -> None:
    fleet.seed("eu-1", 7, 300)
    copied = tmp_path / "copied" / "migrator.toml"
    copied.parent.mkdir()
    copied.write_text(configlib.render(fleet.catalog.url, configlib.Tenancy(), Path("db/stamp")))
    listed = migrator(copied, tmp_path, "route", "list")
    assert listed.returncode == 0, listed.stderr
    assert "eu-1" in listed.stdout
    moved = migrator(copied, tmp_path, "move", "7", "--to", "eu-2", "--yes")
    assert moved.returncode == 0, moved.stderr
    status = migrator(copied, tmp_path, "schema", "status")
    assert status.returncode == 2 and "[schema] script_location: no such directory" in status.stderr


def test_without_schema_section_schema_commands_say_so_and_moves_still_work(fleet: Fleet, tmp_path: Path) -> None:
    for name in STAMP_NAMES:  # stamps whose schema nobody manages with Alembic
        with dsnlib.connect(fleet.dsn(name)) as conn:
            conn.execute("DROP TABLE alembic_version")
    config = tmp_path / "no-schema.toml"
    config.write_text(configlib.render(fleet.catalog.url, configlib.Tenancy(), None))
    assert "[schema]" not in config.read_text()
    fleet.config_path = config

    for args in (("schema", "status"), ("schema", "upgrade", "--yes"), ("schema", "history")):
        result = fleet.run(*args)
        assert result.exit_code == 2, (args, result.output)  # not 3: there is nothing to drift from
        assert "no Alembic environment is configured for the stamps" in result.stderr
        assert 'add [schema] script_location = "DIR"' in result.stderr

    fleet.seed("eu-1", 7, 300)
    layout = fleet.layout("eu-1")
    before = tenant_digest(fleet.dsn("eu-1"), layout, "7")
    moved = fleet.run("move", "7", "--to", "eu-2", "--yes")
    assert moved.exit_code == 0, moved.output
    assert fleet.catalog.route("7").stamp == "eu-2"
    assert tenant_digest(fleet.dsn("eu-2"), layout, "7") == before
