"""What a new user sees: usage errors that name what was typed, in one line."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from migrator.cli import cli

# -- usage errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "where", "what"),
    [
        (["move", "--bogus"], "migrator move", "No such option '--bogus'"),
        (["move", "42", "--to", "eu-2", "--bogus"], "migrator move", "No such option '--bogus'"),
        (["move", "42"], "migrator move", "Missing option '--to'"),
        (["move", "run", "42", "--bogus"], "migrator move run", "No such option '--bogus'"),
        (["move", "status", "--bogus"], "migrator move status", "No such option '--bogus'"),
        (["--bogus", "route", "list"], "migrator", "No such option '--bogus'"),
        (["stamp", "lst"], "migrator stamp", "No such command 'lst'"),
        (["schema", "upgrade", "--parallel", "0"], "migrator schema upgrade", "Invalid value for '--parallel'"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_usage_errors_name_what_was_typed_in_one_line(args: list[str], where: str, what: str) -> None:
    result = CliRunner().invoke(cli, args, prog_name="migrator")
    assert result.exit_code == 2, result.output
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1 and line.startswith(f"error: {where}: {what}"), line
    assert result.stdout == ""


def test_a_group_named_alone_shows_its_help() -> None:
    result = CliRunner().invoke(cli, ["move"], prog_name="migrator")
    assert result.exit_code == 2 and "error" not in result.stderr
    assert result.stderr.startswith("Usage: migrator move [OPTIONS] COMMAND [ARGS]...")
