"""What a new user sees: usage errors naming what was typed, one way to fail, progress fit for logs.

Every command that fails ends by raising one exception family, mapped to its exit code in one
place; the CLI's defaults are the engine's. Progress goes to stderr: bars on a terminal, plain
periodic lines elsewhere (CI, cron, Kubernetes logs), nothing with --no-progress.
"""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
import sys
import threading
from collections.abc import Sequence

import click
import pytest
from click.testing import CliRunner
from conftest import REPO, Fleet, catalog_snapshot, loaded_by, tenant_row_count

from migrator.cli import cli
from migrator.cli.render import LineMeter
from migrator.db import dsn as dsnlib
from migrator.move import MoveOptions
from migrator.plans.apply import ApplyOptions

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
    assert result.stderr.startswith("Usage: migrator move [OPTIONS] [TENANTS]...")  # the help of moving
    assert "  --to TEXT " in result.stderr and "\nCommands:\n  abort " in result.stderr


# -- one way to fail ----------------------------------------------------------------------------------


def _raised(fleet: Fleet, args: Sequence[str]) -> click.ClickException:
    """Run the CLI as a library would (not standalone): a failure must arrive as an exception, not SystemExit."""
    with pytest.raises(click.ClickException) as raised:
        cli.main(["--config", str(fleet.config_path), *args], prog_name="migrator", standalone_mode=False)
    return raised.value


def test_failed_checks_end_by_raising_the_one_family_with_their_exit_codes(fleet4: Fleet) -> None:
    fleet = fleet4
    fleet.seed("eu-1", 7, 500)
    assert fleet.run("move", "7", "--to", "eu-2", "--yes", "--json").exit_code == 0  # eu-1 stays fenced

    doctor = fleet.run("doctor")
    assert doctor.exit_code == 1 and "eu-1: " in doctor.stdout and doctor.stderr == "", doctor.output
    assert _raised(fleet, ["doctor"]).exit_code == 1

    with dsnlib.connect(fleet.dsn("ap-1"), autocommit=True) as conn:
        conn.execute("UPDATE alembic_version SET version_num = '0004_comments_search_index'")
    status = fleet.run("schema", "status")
    assert status.exit_code == 3 and "ap-1 (behind 2)" in status.stdout and status.stderr == "", status.output
    assert _raised(fleet, ["schema", "status"]).exit_code == 3

    with dsnlib.connect(fleet.dsn("eu-2"), autocommit=True) as conn:
        conn.execute("UPDATE users SET email = 'changed' WHERE id = (SELECT id FROM users WHERE tenant_id = 7 LIMIT 1)")
    verify = fleet.run("verify", "7", "--source", "eu-1", "--target", "eu-2")
    assert verify.exit_code == 1 and len(verify.stderr.strip().splitlines()) == 1, verify.output
    assert "users: source" in verify.stderr and "changed" in verify.stderr, verify.stderr
    assert _raised(fleet, ["verify", "7", "--source", "eu-1", "--target", "eu-2"]).exit_code == 1


def test_declining_a_confirmation_fails_in_one_line_and_changes_nothing(fleet: Fleet) -> None:
    fleet.seed("eu-1", 7, 300)
    before = catalog_snapshot(fleet)
    for args in (["move", "7", "--to", "eu-2"], ["cleanup", "7", "--stamp", "eu-2"]):
        for answer in ("n\n", ""):  # no, and no terminal to answer at all
            result = CliRunner().invoke(cli, ["--config", str(fleet.config_path), *args], input=answer)
            assert result.exit_code == 1, result.output
            assert result.stderr.strip().splitlines()[-1] == "error: not confirmed; nothing was changed", result.stderr
            assert result.stdout == ""  # the question goes to stderr, so stdout stays clean for --json
    assert catalog_snapshot(fleet) == before


# -- defaults: one truth --------------------------------------------------------------------------------


def _option(path: Sequence[str], name: str) -> tuple[click.Command, click.Option]:
    command: click.Command = cli
    for word in path:
        assert isinstance(command, click.Group)
        command = command.commands[word]
    found = [p for p in command.params if isinstance(p, click.Option) and p.name == name]
    assert len(found) == 1, (path, name)
    return command, found[0]


@pytest.mark.parametrize(
    ("path", "name", "engine"),
    [
        (("move", "run"), "batch_rows", MoveOptions().batch_rows),
        (("move", "run"), "cutover_backlog", MoveOptions().cutover.cutover_backlog),
        (("move", "run"), "catchup_timeout", MoveOptions().cutover.catchup_timeout_s),
        (("move", "run"), "max_freeze_ms", MoveOptions().cutover.max_freeze_ms),
        (("apply",), "parallel", ApplyOptions().parallel),
        (("apply",), "per_stamp", ApplyOptions().per_stamp),
        (("apply",), "batch_rows", ApplyOptions().batch_rows),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, tuple) else None,
)
def test_cli_defaults_are_the_engine_dataclass_defaults(path: tuple[str, ...], name: str, engine: object) -> None:
    command, option = _option(path, name)
    ctx = click.Context(command)
    assert option.get_default(ctx) == engine
    record = option.get_help_record(ctx)
    assert record is not None and f"[default: {engine};" in record[1], record


def test_a_move_without_flags_runs_with_the_engine_defaults(fleet: Fleet) -> None:
    fleet.seed("eu-1", 7, 200)
    result = fleet.run("move", "7", "--to", "eu-2", "--yes", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["move"]["batch_rows"] == MoveOptions().batch_rows


def test_help_loads_no_sqlalchemy_or_alembic() -> None:
    """Defaults come from the engine lazily, so `migrator --help` stays fast."""
    code = "from click.testing import CliRunner; from migrator.cli import cli\n"
    code += "assert CliRunner().invoke(cli, ['--help']).exit_code == 0"
    assert loaded_by(code, "sqlalchemy", "alembic", "psycopg", "tqdm") == []


def test_moves_and_plans_load_no_sqlalchemy_or_alembic() -> None:
    """A move reads the schema revision in plain SQL: `migrator move`, `plan` and `apply` pay no 0.4 s of
    Alembic and SQLAlchemy imports (only schema commands and the catalog's own migrations load them)."""
    code = "import migrator.cli.moves, migrator.cli.plans, migrator.move, migrator.plans.apply, migrator.plans.planners"
    assert loaded_by(code, "sqlalchemy", "alembic") == []


# -- progress -----------------------------------------------------------------------------------------

CURSOR_CODES = ("\x1b[", "\r")
TOTAL_LINE = re.compile(r"^total: [\d,]+/[\d,]+ rows \(\d+%\), [\d,]+ rows/s, [\d.]+ s$", re.M)
DELETED_LINE = re.compile(r"^deleted: ([\d,]+) rows, [\d,]+ rows/s, [\d.]+ s$", re.M)


def _communicate(proc: subprocess.Popen[str]) -> tuple[str, str]:
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    return out, err


def test_piped_move_and_cleanup_print_progress_lines_without_cursor_codes(fleet: Fleet) -> None:
    rows = fleet.seed("eu-1", 7, 3_000)
    layout = fleet.layout()
    out, err = _communicate(fleet.popen("move", "7", "--to", "eu-2", "--batch-rows", "400", "--yes"))
    for text in (out, err):
        assert not any(code in text for code in CURSOR_CODES), text
    assert TOTAL_LINE.search(err) and f"{rows:,}/{rows:,} rows (100%)" in err, err
    for table in layout.tables:  # one closing line per table, with its rate
        assert re.search(rf"^{re.escape(table.label)}: [\d,]+/[\d,]+ rows \(\d+%\), [\d,]+ rows/s", err, re.M), err
    assert "flipped tenant 7 to eu-2" in err and "now on eu-2" in out

    out, err = _communicate(fleet.popen("cleanup", "7", "--stamp", "eu-1", "--yes"))
    for text in (out, err):
        assert not any(code in text for code in CURSOR_CODES), text
    deleted = DELETED_LINE.search(err)
    assert deleted and int(deleted.group(1).replace(",", "")) == rows, err
    assert f"deleted {rows} rows" in out and tenant_row_count(fleet.dsn("eu-1"), layout, "7") == 0


def test_no_progress_prints_no_progress_lines(fleet: Fleet) -> None:
    rows = fleet.seed("eu-1", 7, 2_000)
    out, err = _communicate(fleet.popen("move", "7", "--to", "eu-2", "--yes", "--no-progress"))
    assert "now on eu-2" in out and f"{rows} rows copied" in out
    assert "rows/s" not in err and "flipped" not in err, err
    out, err = _communicate(fleet.popen("cleanup", "7", "--stamp", "eu-1", "--yes", "--no-progress"))
    assert f"deleted {rows} rows" in out and "rows/s" not in err, err


def test_move_on_a_terminal_still_draws_bars(fleet: Fleet) -> None:
    """The line mode is for logs only: with stderr on a terminal, tqdm redraws its bars in place."""
    fleet.seed("eu-1", 7, 2_000)
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "migrator", "--config", str(fleet.config_path), "move", "7", "--to", "eu-2", "--yes"],
        stdout=subprocess.PIPE,
        stderr=follower,
        text=True,
        cwd=REPO,
    )
    os.close(follower)
    seen: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO once the process has closed the terminal
                return
            if not chunk:
                return
            seen.append(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    out, _ = proc.communicate(timeout=180)
    reader.join(timeout=30)
    os.close(leader)
    terminal = b"".join(seen).decode(errors="replace")
    assert proc.returncode == 0, terminal
    assert "\r" in terminal and "rows/s" not in terminal and "now on eu-2" in out, terminal


def test_line_meter_writes_one_line_per_interval_and_one_at_the_end(capsys: pytest.CaptureFixture[str]) -> None:
    every = LineMeter("tasks", 1_000, "rows", interval=0)
    for _ in range(4):
        every.update(250)
    every.close()
    every.close()
    lines = capsys.readouterr().err.splitlines()
    assert (
        [line.split(",")[0] for line in lines]
        == ["tasks: 250/1", "tasks: 500/1", "tasks: 750/1", "tasks: 1", "tasks: 1"]
        and lines[-1].startswith("tasks: 1,000/1,000 rows (100%)")
        and len(lines) == 5
    ), lines

    seldom = LineMeter("total", None, "rows", interval=3600)
    seldom.update(10)
    seldom.update(5)
    seldom.close()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("total: 15 rows, "), lines
