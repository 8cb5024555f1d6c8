"""DSN passwords never reach any command's output, logs or error messages."""

from __future__ import annotations

from conftest import Fleet

from migrator.db import dsn as dsnlib


def _password(fleet: Fleet) -> str:
    from psycopg import conninfo

    password = conninfo.conninfo_to_dict(fleet.dsn("eu-1")).get("password")
    assert password and len(str(password)) >= 8
    return str(password)


def test_no_command_prints_a_dsn_password(fleet: Fleet) -> None:
    secret = _password(fleet)
    fleet.seed("eu-1", 7, 300)
    bad_dsn = fleet.dsn("eu-1").replace("127.0.0.1:", "127.0.0.1:1") + "_missing"
    fleet.catalog.add_stamp("broken", bad_dsn)
    outputs = []
    for args in (
        ["stamp", "list"], ["stamp", "list", "--json"], ["route", "list"], ["tenant", "list"],
        ["tenant", "list", "--json"], ["move", "7", "--to", "eu-2", "--dry-run"],
        ["-v", "move", "7", "--to", "eu-2", "--yes"], ["move", "status"], ["move", "status", "1", "--json"],
        ["verify", "7", "--source", "eu-1", "--target", "eu-2"], ["doctor"],
        ["move", "7", "--to", "broken", "--yes"], ["tenant", "list", "--stamp", "broken"],
        ["stamp", "add", "x", "--dsn", f"postgresql://u:{secret}@127.0.0.1:1/db"],
    ):
        result = fleet.run(*args)
        outputs.append((args, result.exit_code, result.output))
    for args, _, text in outputs:
        assert secret not in text, args
    broken = [o for o in outputs if "broken" in o[0]]
    assert all(code != 0 and "stamp broken" in text for _, code, text in broken), broken


def test_masking_covers_urls_keyword_strings_and_services() -> None:
    assert dsnlib.mask("postgresql://app:s3cr3t@db:5432/x?sslmode=require") == "postgresql://app:***@db:5432/x?sslmode=require"
    assert dsnlib.mask("host=db password='a b\\'c' user=app") == "host=db password=*** user=app"
    assert dsnlib.mask("postgresql://db/x?password=s3cr3t") == "postgresql://db/x?password=***"
    assert dsnlib.mask("stamp_eu1") == "stamp_eu1"
    assert dsnlib.normalize("stamp_eu1") == "service=stamp_eu1"


def test_free_text_masking_covers_urls_and_keyword_strings_in_messages() -> None:
    import logging

    from migrator.cli import render

    text = (
        'connection to "postgresql://app:s3cr3t@db:5432/x" failed; retried with host=db password=hunter22 user=app'
        " and postgresql://db/x?sslmode=require&password=topsecret"
    )
    masked = dsnlib.mask_text(text)
    assert all(secret not in masked for secret in ("s3cr3t", "hunter22", "topsecret")), masked
    assert "postgresql://app:***@db:5432/x" in masked and "password=*** user=app" in masked
    record = logging.LogRecord("migrator.retry", logging.WARNING, __file__, 1, "transient error: %s", (text,), None)
    assert render.MaskingFilter().filter(record) and record.getMessage() == f"transient error: {masked}"
