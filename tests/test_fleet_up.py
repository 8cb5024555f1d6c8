"""`fleet up` is all or nothing: a failure half-way leaves no PostgreSQL running; success says how to use it."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner

from migrator.cli import cli
from migrator.db import dsn as dsnlib
from migrator.local import pgserver
from migrator.local.fleet import STATE_FILE


def _postgres_processes(directory: Path) -> list[str]:
    """Command lines of running processes started for a data directory under `directory`."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # the process ended meanwhile
            continue
        if str(directory) in cmdline and "postgres" in cmdline:
            found.append(cmdline)
    return found


@pytest.mark.parametrize(
    ("args", "obstacle", "kind"),
    [
        # after server-1 started, server-2's directory cannot be created
        (["--servers", "2", "--stamps", "2"], "server-2", "file"),
        # after the server, the catalog and the stamp are up and migrated, migrator.toml cannot be written
        (["--servers", "1", "--stamps", "1"], "migrator.toml", "directory"),
    ],
    ids=["second server", "config file"],
)
def test_fleet_up_that_fails_half_way_stops_every_server_it_started(
    tmp_path: Path, args: list[str], obstacle: str, kind: str
) -> None:
    directory = tmp_path / "fleet"
    directory.mkdir()
    blocker = directory / obstacle
    if kind == "file":
        blocker.write_text("not a directory")
    else:
        blocker.mkdir()

    result = CliRunner().invoke(cli, ["fleet", "up", "--dir", str(directory), *args], prog_name="migrator")

    assert result.exit_code == 1, result.output
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1 and line.startswith("error: ") and str(blocker) in line, line
    assert _postgres_processes(directory) == []
    assert not (directory / STATE_FILE).exists()
    assert not (directory / "server-1").exists()  # what it created is gone, so the same command can run again
    assert blocker.exists()  # what was there before is left alone

    if kind == "file":
        blocker.unlink()
    else:
        blocker.rmdir()
    again = CliRunner().invoke(cli, ["fleet", "up", "--dir", str(directory), *args], prog_name="migrator")
    try:
        assert again.exit_code == 0, again.output
    finally:
        CliRunner().invoke(cli, ["fleet", "down", "--dir", str(directory)])
    assert _postgres_processes(directory) == []


def test_fleet_up_prints_the_export_line_the_next_commands_use(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MIGRATOR_CATALOG_URL", raising=False)
    monkeypatch.delenv("MIGRATOR_CONFIG", raising=False)
    directory = tmp_path / "my fleet"  # a space: the line must still paste into a shell
    result = CliRunner().invoke(cli, ["fleet", "up", "--dir", str(directory), "--stamps", "2"])
    try:
        assert result.exit_code == 0, result.output
        exports = [line for line in result.stdout.splitlines() if line.startswith("export ")]
        assert len(exports) == 1, result.stdout
        name, value = shlex.split(exports[0].removeprefix("export "))[0].split("=", 1)
        assert name == "MIGRATOR_CONFIG" and Path(value) == directory / "migrator.toml"
        password = json.loads((directory / "server-1" / "server.json").read_text())["password"]
        assert password not in result.output

        listed = CliRunner(env={"MIGRATOR_CONFIG": value}).invoke(cli, ["stamp", "list"])
        assert listed.exit_code == 0, listed.output
        assert "stamp-1" in listed.stdout and "stamp-2" in listed.stdout
        keys = CliRunner(env={"MIGRATOR_CONFIG": value}).invoke(cli, ["keys", "check", "--json"])
        assert keys.exit_code == 0, keys.output  # the local fleet starts strided: ids never collide
        blocks = {s["stamp"]: s["block"] for s in json.loads(keys.stdout)["stamps"]}
        assert blocks == {"stamp-1": 1, "stamp-2": 2}
    finally:
        CliRunner().invoke(cli, ["fleet", "down", "--dir", str(directory)])
    assert _postgres_processes(directory) == []


def test_fleet_up_with_replicas_starts_a_streaming_standby_that_fleet_down_stops(tmp_path: Path) -> None:
    directory = tmp_path / "replicated"
    result = CliRunner().invoke(cli, ["fleet", "up", "--dir", str(directory), "--stamps", "1", "--replicas", "1"])
    try:
        assert result.exit_code == 0, result.output
        assert "server-1 standby r1" in result.stdout
        server = pgserver.attach_server(directory / "server-1" / "data")
        with dsnlib.connect(server.dsn(), autocommit=True) as conn:
            streaming = conn.execute("SELECT application_name, state FROM pg_stat_replication").fetchall()
        assert streaming == [("r1", "streaming")]
    finally:
        CliRunner().invoke(cli, ["fleet", "down", "--dir", str(directory)])
    assert _postgres_processes(directory) == []
