"""Shell completion (`eval "$(_MIGRATOR_COMPLETE=bash_source migrator)"`) completes stamp names and move
ids from the catalog, and plan files from plans/; a catalog it cannot reach completes nothing, quietly
and at once. Driven the way bash drives it: click's environment variables."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from conftest import Fleet

from migrator.cli import cli


def complete(config: Path, *words: str) -> Result:
    """What bash asks for with the cursor after `words` (the last one is the word being completed)."""
    line = ["migrator", "--config", str(config), *words]
    env = {"_MIGRATOR_COMPLETE": "bash_complete", "COMP_WORDS": " ".join(line), "COMP_CWORD": str(len(line) - 1)}
    return CliRunner().invoke(cli, [], env=env, prog_name="migrator")


def values(result: Result) -> list[str]:
    assert result.exit_code == 0, result.output
    return [line.split(",", 1)[1] for line in result.stdout.splitlines() if line]


def test_stamp_names_complete_from_the_catalog(fleet: Fleet) -> None:
    assert values(complete(fleet.config_path, "move", "7", "--to", "")) == ["eu-1", "eu-2", "us-1"]
    assert values(complete(fleet.config_path, "move", "7", "--to", "eu")) == ["eu-1", "eu-2"]
    assert values(complete(fleet.config_path, "cleanup", "7", "--stamp", "u")) == ["us-1"]
    assert values(complete(fleet.config_path, "stamp", "check", "e")) == ["eu-1", "eu-2"]
    assert values(complete(fleet.config_path, "plan", "drain", "us")) == ["us-1"]
    assert values(complete(fleet.config_path, "stamp", "add", "e")) == []  # a new stamp's name is the user's


def test_move_ids_complete_from_the_catalog(fleet: Fleet) -> None:
    fleet.seed("eu-1", 7, 200)
    moved = fleet.run("move", "7", "--to", "eu-2", "--yes")
    assert moved.exit_code == 0, moved.output
    [move] = fleet.catalog.moves()
    assert values(complete(fleet.config_path, "move", "status", "")) == [str(move.id)]
    assert values(complete(fleet.config_path, "cleanup", "--move", "")) == [str(move.id)]


def test_plan_files_complete_from_the_plans_directory(
    fleet: Fleet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "plans").mkdir()
    for name in ("drain-eu-1.yaml", "rebalance-us-1.yaml", "README.md"):
        (tmp_path / "plans" / name).write_text("")
    assert values(complete(fleet.config_path, "apply", "")) == ["plans/drain-eu-1.yaml", "plans/rebalance-us-1.yaml"]
    assert values(complete(fleet.config_path, "plan", "show", "plans/d")) == ["plans/drain-eu-1.yaml"]
    assert complete(fleet.config_path, "apply", "elsewhere/").stdout == "file,elsewhere/\n"  # the shell's own


def test_an_unreachable_catalog_completes_nothing_quietly_and_at_once(tmp_path: Path) -> None:
    config = tmp_path / "migrator.toml"
    config.write_text('catalog_url = "postgresql://operator:pw@127.0.0.1:1/catalog"\n')  # nothing listens there
    started = time.monotonic()
    result = complete(config, "move", "7", "--to", "")
    assert result.exit_code == 0 and result.stdout.strip() == "" and result.stderr == ""
    assert time.monotonic() - started < 3
    assert complete(tmp_path / "missing.toml", "move", "7", "--to", "").stdout.strip() == ""
