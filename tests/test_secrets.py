"""DSN passwords never reach any command's output, logs or error messages."""

from __future__ import annotations

from conftest import Fleet
from sqlalchemy.engine import make_url

from migrator.db import dsn as dsnlib
from migrator.db.alembic import alembic_config
from migrator.local.provision import sample_app_env


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
        ["stamp", "list"],
        ["stamp", "list", "--json"],
        ["route", "list"],
        ["tenant", "list"],
        ["tenant", "list", "--json"],
        ["move", "7", "--to", "eu-2", "--dry-run"],
        ["move", "7", "--to", "broken", "--yes"],  # before the move, whose revert window would refuse it
        ["-v", "move", "7", "--to", "eu-2", "--yes"],
        ["move", "status"],
        ["move", "status", "1", "--json"],
        ["verify", "7", "--source", "eu-1", "--target", "eu-2"],
        ["doctor"],
        ["tenant", "list", "--stamp", "broken"],
        ["stamp", "add", "x", "--dsn", f"postgresql://u:{secret}@127.0.0.1:1/db"],
    ):
        result = fleet.run(*args)
        outputs.append((args, result.exit_code, result.output))
    for args, _, text in outputs:
        assert secret not in text, args
    broken = [o for o in outputs if "broken" in o[0]]
    assert all(code != 0 and "stamp broken" in text for _, code, text in broken), broken


def test_masking_covers_urls_keyword_strings_and_services() -> None:
    assert (
        dsnlib.mask("postgresql://app:s3cr3t@db:5432/x?sslmode=require")
        == "postgresql://app:***@db:5432/x?sslmode=require"
    )
    assert dsnlib.mask("host=db password='a b\\'c' user=app") == "host=db password=*** user=app"
    assert dsnlib.mask("postgresql://db/x?password=s3cr3t") == "postgresql://db/x?password=***"
    assert dsnlib.mask("stamp_eu1") == "stamp_eu1"
    assert dsnlib.normalize("stamp_eu1") == "service=stamp_eu1"


def test_sqlalchemy_url_carries_every_dsn_form_and_drops_the_password_for_offline_runs() -> None:
    dsn = "postgresql://app:p%40ss%25@db:5432/x?sslmode=require"
    url = dsnlib.sqlalchemy_url(dsn)
    assert (url.drivername, url.username, url.password, url.host, url.port, url.database) == (
        "postgresql+psycopg", "app", "p@ss%", "db", 5432, "x"
    )  # fmt: skip
    assert dict(url.query) == {"sslmode": "require"}
    rendered = url.render_as_string(hide_password=False)
    assert make_url(rendered).password == "p@ss%"
    assert dsnlib.scrub(rendered, dsn) == "postgresql+psycopg://app:***@db:5432/x?sslmode=require"  # encoded form too
    # ConfigParser interpolation: the % of the encoded password survives the in-memory Alembic config.
    assert alembic_config(sample_app_env(), url=url).get_main_option("sqlalchemy.url") == rendered
    offline = dsnlib.sqlalchemy_url(dsn, with_password=False)
    assert offline.password is None and "p%40ss" not in offline.render_as_string(hide_password=False)

    sockets = dsnlib.sqlalchemy_url("host=/run/postgresql,db2 port=5432,5433 dbname=x user=app password='a b'")
    assert sockets.host is None and sockets.port is None and sockets.password == "a b"
    assert dict(sockets.query) == {"host": "/run/postgresql,db2", "port": "5432,5433"}
    assert dict(dsnlib.sqlalchemy_url("stamp_eu1").query) == {"service": "stamp_eu1"}
    no_user = dsnlib.sqlalchemy_url("host=db dbname=x password=pw")  # libpq's default user, the password kept
    assert make_url(no_user.render_as_string(hide_password=False)).password == "pw"


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


def test_masking_a_masked_keyword_dsn_again_keeps_the_line_intact() -> None:
    line = "cannot connect to stamp eu-1 (host=db password=***): connection refused"
    assert dsnlib.mask_text(line) == line
    assert dsnlib.mask_text("(host=db password=hunter2 user=x)") == "(host=db password=*** user=x)"
    assert "hunter2" not in dsnlib.mask_text("(host=db password=hunter2)")
