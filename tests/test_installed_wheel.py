"""The wheel as a user gets it: built, installed into a fresh virtual environment, run from elsewhere.

Nothing here imports the source tree in the child processes: the `migrator` console script of the
fresh environment must find its catalog migrations and the sample application's environment as
package data, and the config's relative `script_location` from the config file's directory.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO, tenant_digest

from migrator import __version__
from migrator import config as configlib
from migrator.db import dsn as dsnlib
from migrator.db.alembic import current_revision
from migrator.local import pgserver, provision
from migrator.local.seed import TenantSpec, seed_tenant
from migrator.stamps.discovery import discover

HEAD = "0006_task_checklists"
# The child processes see neither the source tree nor this interpreter's environment.
CLEAN_ENV = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "MIGRATOR_CONFIG")}


@dataclass(frozen=True)
class Installed:
    venv: Path

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    @property
    def migrator(self) -> Path:
        return self.venv / "bin" / "migrator"


def _run(*args: str | Path, cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, cwd=cwd, env=CLEAN_ENV, timeout=timeout
    )
    assert result.returncode == 0, f"{args}: {result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="session")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """The wheel built from a copy of the tree (no build/ left in it) and installed into a new venv."""
    base = tmp_path_factory.mktemp("wheel")
    source = base / "source"
    shutil.copytree(
        REPO, source,
        ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__", ".fleet", "migrator.toml"),
    )  # fmt: skip
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", base / "dist", source, cwd=base)
    [wheel] = (base / "dist").glob("stamp_migrator-*.whl")  # the distribution's name on the package index
    _run(sys.executable, "-m", "venv", base / "venv", cwd=base)
    found = Installed(base / "venv")
    _run(found.python, "-m", "pip", "install", "-q", "--find-links", base / "dist", wheel, cwd=base)
    return found


@pytest.fixture
def databases(pg: pgserver.LocalServer) -> Iterator[dict[str, str]]:
    """An empty catalog database and two empty stamp databases on the session's server."""
    names = {"catalog": "whl_catalog", "eu-1": "whl_eu_1", "eu-2": "whl_eu_2"}
    dsns = {role: provision.create_database(pg, db) for role, db in names.items()}
    try:
        yield dsns
    finally:
        for db in names.values():
            provision.drop_database(pg, db)


def test_the_wheel_carries_no_test_tooling(installed: Installed, tmp_path: Path) -> None:
    """migrator.testing (the writer and its oracle, the chaos engine) stays in the checkout; fleet up stays."""
    found = "import importlib.util as u; print(u.find_spec('migrator.testing'), u.find_spec('migrator.local.fleet'))"
    testing, fleet = _run(installed.python, "-c", found, cwd=tmp_path).stdout.split(maxsplit=1)
    assert testing == "None" and str(installed.venv) in fleet
    assert not list(installed.venv.rglob("migrator/testing"))


def test_installed_wheel_runs_a_fleet_from_another_directory(
    installed: Installed, databases: dict[str, str], pg: pgserver.LocalServer, tmp_path: Path
) -> None:
    where = _run(
        installed.python, "-c", "import migrator.local.provision as p; print(p.__file__); print(p.sample_app_env())",
        cwd=tmp_path,
    ).stdout.split()  # fmt: skip
    assert all(Path(p).is_relative_to(installed.venv) for p in where), where  # not the source tree
    ops = tmp_path / "ops"
    shutil.copytree(where[1], ops / "stamp-env", ignore=shutil.ignore_patterns("__pycache__"))
    config = ops / "migrator.toml"
    config.write_text(configlib.render(databases["catalog"], configlib.Tenancy(), Path("stamp-env")))

    def migrator(*args: str) -> str:
        result = _run(installed.migrator, *args, cwd=ops)  # ./migrator.toml, found from the current directory
        output = result.stdout + result.stderr
        assert pg.password not in output, args
        return output

    assert migrator("--version").strip() == f"migrator, version {__version__}"
    distribution = "import importlib.metadata as m; print(m.version('stamp-migrator'))"
    assert _run(installed.python, "-c", distribution, cwd=tmp_path).stdout.strip() == __version__
    migrator("catalog", "init")
    for name in ("eu-1", "eu-2"):
        migrator("stamp", "add", name, "--dsn", databases[name], "--region", "eu")

    behind = subprocess.run(
        [installed.migrator, "schema", "status"], capture_output=True, text=True, cwd=ops, env=CLEAN_ENV, timeout=60
    )
    assert behind.returncode == 3 and "eu-1 (behind 6), eu-2 (behind 6)" in behind.stdout, behind.stderr
    dry = migrator("schema", "upgrade", "--dry-run")
    assert f"-- eu-1, eu-2: base -> {HEAD}" in dry and "CREATE TABLE tenants" in dry
    assert all(current_revision(databases[name]) is None for name in ("eu-1", "eu-2"))
    migrator("schema", "upgrade", "--yes")
    assert f"all 2 stamps at head {HEAD}" in migrator("schema", "status")

    with dsnlib.connect(databases["eu-1"]) as conn:
        seed_tenant(conn, TenantSpec(1, 400))
        layout = discover(conn, configlib.Tenancy())
    before = tenant_digest(databases["eu-1"], layout, "1")
    migrator("route", "set", "1", "eu-1")
    migrator("move", "1", "--to", "eu-2", "--yes")
    assert migrator("route", "get", "1").startswith("tenant 1 -> eu-2 (version 2")
    assert tenant_digest(databases["eu-2"], layout, "1") == before
    migrator("verify", "1", "--source", "eu-1", "--target", "eu-2")
    migrator("cleanup", "1", "--stamp", "eu-1", "--yes")
    assert sum(rows for rows, _ in tenant_digest(databases["eu-1"], layout, "1").values()) == 0
    assert tenant_digest(databases["eu-2"], layout, "1") == before
