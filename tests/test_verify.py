"""`verify` proves equality, names the table and key of a difference, and ignores server settings."""

from __future__ import annotations

import json

from click.testing import Result
from conftest import Fleet
from psycopg import sql

from migrator.db import dsn as dsnlib
from migrator.move import MoveOptions, move_tenants
from migrator.progress import Silent


def _moved(fleet: Fleet, rows: int = 6_000) -> None:
    fleet.seed("eu-1", 7, rows)
    move_tenants(fleet.ctx, ("7",), "eu-2", MoveOptions(batch_rows=1_000), Silent())


def _verify_after_changing_a_row(fleet: Fleet, pick: str, change: str) -> tuple[int, Result]:
    """Move tenant 7, change one of its rows on the target (`pick` finds its id, `change` alters that row),
    then `verify --json`, which must fail."""
    _moved(fleet)
    with dsnlib.connect(fleet.dsn("eu-2"), autocommit=True) as conn:
        key = conn.execute(pick).fetchone()[0]
        conn.execute(change, (key,))
    result = fleet.run("verify", "7", "--source", "eu-1", "--target", "eu-2", "--json")
    assert result.exit_code == 1
    return key, result


def test_verify_names_table_and_key_of_altered_row(fleet: Fleet) -> None:
    key, result = _verify_after_changing_a_row(
        fleet,
        "SELECT id FROM tasks WHERE tenant_id = 7 ORDER BY id OFFSET 2500 LIMIT 1",
        "UPDATE tasks SET estimate_hours = 0.01 WHERE tenant_id = 7 AND id = %s",
    )
    bad = [t for t in json.loads(result.stdout)["tables"] if not t["equal"]]
    assert [t["table"] for t in bad] == ["tasks"]
    assert bad[0]["changed"] == [["7", str(key)]]
    assert f"(7, {key})" in result.stderr


def test_verify_names_table_and_key_of_missing_row(fleet: Fleet) -> None:
    key, result = _verify_after_changing_a_row(
        fleet,
        "SELECT id FROM comments WHERE tenant_id = 7 ORDER BY id DESC LIMIT 1",
        "DELETE FROM comments WHERE tenant_id = 7 AND id = %s",
    )
    bad = [t for t in json.loads(result.stdout)["tables"] if not t["equal"]]
    assert [(t["table"], t["missing"], t["target_rows"] + 1 == t["source_rows"]) for t in bad] == [
        ("comments", [["7", str(key)]], True)
    ]


def test_equal_data_verifies_equal_under_different_server_timezones(fleet: Fleet) -> None:
    for stamp, zone in (("eu-1", "Pacific/Chatham"), ("eu-2", "America/St_Johns")):
        with dsnlib.connect(fleet.server.dsn("postgres"), autocommit=True) as conn:
            db = conn.execute("SELECT %s::text", (fleet.dsn(stamp).rsplit("/", 1)[1],)).fetchone()[0]
            for setting, value in (
                ("TimeZone", zone),
                ("DateStyle", "SQL, DMY"),
                ("extra_float_digits", "-3"),
                ("bytea_output", "escape"),
                ("IntervalStyle", "iso_8601"),
            ):
                conn.execute(
                    sql.SQL("ALTER DATABASE {} SET {} = {}").format(
                        sql.Identifier(db), sql.Identifier(setting), sql.Literal(value)
                    )
                )
    _moved(fleet, rows=2_000)
    result = fleet.run("verify", "7", "--source", "eu-1", "--target", "eu-2", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["equal"] is True


def test_values_equal_by_operator_but_stored_differently_do_not_verify_equal(fleet: Fleet) -> None:
    """1.0 = 1.00, 0 = -0, 1 day = 24 hours and jsonb numbers compare (and hash) equal; a copy that
    changed one into the other still altered the row, so verify must see it."""
    changes = [("amount", "1.0", "1.00"), ("ratio", "0", "-0"), ("spent", "1 day", "24 hours"),
               ("meta", '{"a": 1.0}', '{"a": 1.00}')]  # fmt: skip
    for stamp in ("eu-1", "eu-2"):
        with dsnlib.connect(fleet.dsn(stamp), autocommit=True) as conn:
            conn.execute("ALTER TABLE tasks ADD amount numeric, ADD ratio float8, ADD spent interval")
    fleet.seed("eu-1", 7, 2_000)
    with dsnlib.connect(fleet.dsn("eu-1"), autocommit=True) as conn:
        keys = [r[0] for r in conn.execute("SELECT id FROM tasks WHERE tenant_id = 7 ORDER BY id LIMIT 4").fetchall()]
        for key, (column, before, _) in zip(keys, changes, strict=True):
            conn.execute(sql.SQL("UPDATE tasks SET {} = %s WHERE tenant_id = 7 AND id = %s").format(
                sql.Identifier(column)), (before, key))  # fmt: skip
    move_tenants(fleet.ctx, ("7",), "eu-2", MoveOptions(batch_rows=1_000), Silent())
    with dsnlib.connect(fleet.dsn("eu-2"), autocommit=True) as conn:
        for key, (column, before, after) in zip(keys, changes, strict=True):
            conn.execute(sql.SQL("UPDATE tasks SET {c} = %s WHERE tenant_id = 7 AND id = %s AND {c} = %s").format(
                c=sql.Identifier(column)), (after, key, before))  # fmt: skip
            assert conn.execute(sql.SQL("SELECT {}::text FROM tasks WHERE id = %s").format(
                sql.Identifier(column)), (key,)).fetchone()[0] != before  # fmt: skip
    result = fleet.run("verify", "7", "--source", "eu-1", "--target", "eu-2", "--json")
    assert result.exit_code == 1, result.output
    bad = [t for t in json.loads(result.stdout)["tables"] if not t["equal"]]
    assert [(t["table"], sorted(t["changed"])) for t in bad] == [("tasks", sorted(["7", str(k)] for k in keys))]
