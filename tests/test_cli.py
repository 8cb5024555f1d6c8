"""The command line is honest: every command has help, bad configuration is one clear line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from migrator.cli import cli
from migrator.cli.base import summary


def _commands(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], click.Command]]:
    found = []
    for name, command in group.commands.items():
        found.append(((*prefix, name), command))
        if isinstance(command, click.Group):
            found.extend(_commands(command, (*prefix, name)))
    return found


@pytest.mark.parametrize(("path", "command"), _commands(cli), ids=lambda v: " ".join(v) if isinstance(v, tuple) else "")
def test_every_command_has_help(path: tuple[str, ...], command: click.Command) -> None:
    assert command.help and len(command.help.strip()) > 10, path
    result = CliRunner().invoke(cli, [*path, "--help"])
    assert result.exit_code == 0, result.output
    for param in command.params:
        if isinstance(param, click.Option) and not param.hidden and param.name not in ("help",):
            assert param.help, (path, param.name)
    # Its one-line summary in its group's list is a whole sentence (a capital letter to a full stop), not cut
    # with `...` mid-word or mid-backtick.
    line = summary(command)
    assert line[:1].isupper() and line.endswith(".") and not line.endswith(".."), (path, line)
    assert line.count("`") % 2 == 0 and line.count("(") == line.count(")"), (path, line)
    if not command.hidden:
        listing = CliRunner().invoke(cli, [*path[:-1], "--help"], terminal_width=80).output
        assert line in " ".join(listing.split()), (path, line)


def test_move_help_shows_the_options_of_moving_and_its_other_commands() -> None:
    result = CliRunner().invoke(cli, ["move", "--help"], prog_name="migrator", terminal_width=80)
    assert result.exit_code == 0, result.output
    assert result.output.startswith("Usage: migrator move [OPTIONS] [TENANTS]...")
    options, commands = result.output.split("\nOptions:\n")[1].split("\nCommands:\n")
    moving = ("--to", "--tenants-file", "--move", "--jobs", "--offline", "--dry-run", "--no-revert-window", "--yes")
    for option in (*moving, "--json"):
        assert f"  {option} " in options, option
    assert [line.split()[0] for line in commands.splitlines() if line[:3].strip()] == ["abort", "revert", "status"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["apply", "plans/x.yaml", "--wait"],
            "--wait follows the moves --queue sends to workers; to follow a plan, `migrator plan wait plans/x.yaml`",
        ),
        (["schema", "upgrade", "--wait"], "--wait follows a queued rollout: add --queue"),
    ],
)
def test_wait_without_queue_is_refused_before_anything_is_read(args: list[str], message: str) -> None:
    """--queue and --wait arrive as one `Queued` argument, checked once for both commands: no config, plan
    file or catalog is read first (the config named here does not exist)."""
    result = CliRunner().invoke(cli, ["--config", "/nonexistent/migrator.toml", *args])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"error: {message}") and result.stderr.count("\n") == 1, result.stderr


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("catalog_url = 'x'\n[tenancy\ncolumn = 'a'", "malformed TOML"),
        ("catalog_url = 'x'\ncatalogue = 1\n", "unknown key 'catalogue'"),
        ("catalog_url = 'x'\n[tenancy]\ncolum = 'a'\n", "unknown key [tenancy] 'colum'"),
        ("[tenancy]\ncolumn = 'a'\n", "catalog_url is missing"),
        ("catalog_url = 'x'\n[tenancy]\nexclude = 'audit'\n", "exclude must be a list"),
    ],
)
def test_malformed_config_is_one_clear_line(
    tmp_path: Path, text: str, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MIGRATOR_CATALOG_URL", raising=False)
    path = tmp_path / "migrator.toml"
    path.write_text(text)
    result = CliRunner().invoke(cli, ["--config", str(path), "stamp", "list"])
    assert result.exit_code == 2
    assert message in result.stderr and str(path) in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_missing_config_file_is_reported(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["--config", str(tmp_path / "none.toml"), "route", "list"])
    assert result.exit_code == 2 and "no configuration file" in result.stderr


def test_help_loads_no_engine_dependency() -> None:
    """`migrator --help` and the groups' help answer fast: commands import their engine when they run (a
    command's own help reads the engine's defaults, so it may load it: `move --help` is the help of moving,
    with the engine's defaults)."""
    probe = (
        "import sys; from migrator.cli import main; sys.argv = ['migrator', *sys.argv[1:]]\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "heavy = {'psycopg', 'sqlalchemy', 'alembic', 'tqdm', 'prometheus_client', 'procrastinate', 'tenacity',"
        " 'yaml'}\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & heavy), file=sys.stderr)"
    )
    for args in (["--help"], ["schema", "--help"], ["plan", "--help"], ["stamp", "--help"]):
        found = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, check=True)
        assert found.stderr.strip().splitlines()[-1] == "[]", (args, found.stderr)
