"""Alembic driven in-process: the catalog's and the stamps' environments, their revisions, and the
`env.py` body of the environments migrator ships.

Every run's in-memory `Config` offers env.py both ways to reach the database: the cookbook's
`config.attributes["connection"]` (a connection from `migrator.db.dsn`; migrator's own envs use it)
and `sqlalchemy.url` (the DSN of any form as a SQLAlchemy URL, which the `env.py` of `alembic init`
reads). Neither ever reaches a file, a log line or a command line.

Alembic and SQLAlchemy load only when a function here drives Alembic: `read_revision` is plain SQL,
and every move reads it, so importing the move pipeline costs no Alembic (about 0.4 s a process).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg

from migrator.db import dsn as dsnlib
from migrator.errors import BadInput, MigratorError

if TYPE_CHECKING:
    from alembic.config import Config
    from sqlalchemy.engine import URL, Connection


def packaged_env(package: str, name: str) -> Path:
    """An Alembic environment shipped inside the package as data (`importlib.resources`).

    pip installs wheels unpacked, so the resource is a real directory Alembic can read.
    """
    return Path(str(resources.files(package) / name))


def catalog_env() -> Path:
    """The routing catalog's own migrations (`migrator catalog init`)."""
    return packaged_env("migrator.catalog", "migrations")


def alembic_config(script_location: Path | str, connection: Connection | None = None, url: URL | None = None) -> Config:
    """A file-less Alembic config for one database, whichever way its env.py connects.

    With `connection`, an env.py that reads `config.attributes["connection"]` migrates on it; with
    `url`, one that builds its own engine from `sqlalchemy.url` (the stock `alembic init` env.py)
    connects there. Offline (`--sql`) runs get a `url` without the password: only the dialect matters.
    """
    from alembic.config import Config

    location = Path(script_location)
    if not (location / "env.py").is_file():
        raise BadInput(f"{location} is not an Alembic environment (no env.py)")
    config = Config()
    # Config options go through ConfigParser interpolation: a literal % must be doubled.
    config.set_main_option("script_location", str(location).replace("%", "%%"))
    if url is not None:
        config.set_main_option("sqlalchemy.url", url.render_as_string(hide_password=False).replace("%", "%%"))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def upgrade(dsn: str, script_location: Path | str, revision: str = "head") -> None:
    """Upgrade the database to `revision`; each revision commits on its own."""
    from alembic import command
    from alembic.util import CommandError
    from sqlalchemy.exc import SQLAlchemyError

    engine = dsnlib.engine(dsn)
    try:
        config = alembic_config(script_location, url=dsnlib.sqlalchemy_url(dsn))
        with engine.connect() as conn:
            config.attributes["connection"] = conn
            command.upgrade(config, revision)
    except CommandError as exc:
        raise BadInput(f"cannot upgrade {dsnlib.mask(dsn)} to {revision}: {exc}") from None
    except (SQLAlchemyError, psycopg.Error) as exc:
        message = dsnlib.scrub(str(getattr(exc, "orig", None) or exc), dsn).strip()
        raise MigratorError(f"upgrade of {dsnlib.mask(dsn)} failed: {message}") from None
    finally:
        engine.dispose()


def read_revision(conn: psycopg.Connection[Any]) -> str | None:
    """The database's Alembic revision: the one way every job reads it.

    The rows of `alembic_version`, as Alembic's `MigrationContext.get_current_heads()` reads them,
    in one plain query (the cutover reads it inside the write freeze, where building a SQLAlchemy
    connection would cost more than the query). Several heads (branches) are joined in order, so
    they never match one known id; None when the database was never migrated.
    """
    found = conn.execute("SELECT to_regclass('alembic_version') IS NOT NULL").fetchone()
    if not found or not found[0]:
        return None
    rows = conn.execute("SELECT version_num FROM alembic_version ORDER BY 1").fetchall()
    return ",".join(str(row[0]) for row in rows) or None


def current_revision(dsn: str) -> str | None:
    """`read_revision` of the database at `dsn`, with a failure naming it (password masked)."""
    try:
        with dsnlib.connect(dsn, autocommit=True) as conn:
            return read_revision(conn)
    except psycopg.Error as exc:
        message = dsnlib.scrub(str(exc), dsn).strip()
        raise MigratorError(f"cannot read the schema revision of {dsnlib.mask(dsn)}: {message}") from None


# -- the env.py body of migrator's own environments ------------------------------------------------


def run_env(context: Any) -> None:
    """Entry point for env.py: `run_env(alembic.context)`.

    Online, it runs on the SQLAlchemy connection handed over in `config.attributes["connection"]`,
    else on an engine built by `migrator.db.dsn.engine` from `-x dsn=...` or `sqlalchemy.url`, so
    every connection gets the same pinned session settings. Each revision commits on its own: a
    failing revision leaves the database at the previous one instead of rolling back the upgrade.
    """
    if context.is_offline_mode():
        _run_offline(context)
    else:
        _run_online(context)


def _run_offline(context: Any) -> None:
    """`--sql`: emit a script with values inlined; no database is contacted, so only the dialect matters."""
    context.configure(
        dialect_name="postgresql",
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        transaction_per_migration=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def _run_online(context: Any) -> None:
    connection = context.config.attributes.get("connection")
    if connection is not None:
        _migrate(context, connection)
        return
    engine = dsnlib.engine(_target_dsn(context))
    try:
        with engine.connect() as conn:
            _migrate(context, conn)
    finally:
        engine.dispose()


def _migrate(context: Any, connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=None, transaction_per_migration=True)
    with context.begin_transaction():
        context.run_migrations()


def _target_dsn(context: Any) -> str:
    """`-x dsn=...` wins over `sqlalchemy.url`; a SQLAlchemy URL loses its `+driver` to become a libpq URL."""
    from sqlalchemy.engine import make_url

    dsn = context.get_x_argument(as_dictionary=True).get("dsn") or context.config.get_main_option("sqlalchemy.url")
    if not dsn:
        raise BadInput("no database given: pass `-x dsn=...` or set sqlalchemy.url")
    if "://" in dsn and "+" in dsn.split("://", 1)[0]:
        dsn = make_url(dsn).set(drivername="postgresql").render_as_string(hide_password=False)
    return str(dsn)
