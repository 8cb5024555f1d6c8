"""Alembic driven in-process: upgrading the catalog and stamps, and reading their revisions.

Alembic runs on a connection from `migrator.dsn` handed over through `Config.attributes`, so DSNs
of any form (URL, keywords, service name) work and no password is ever put on a command line.
"""

from __future__ import annotations

from pathlib import Path

import psycopg
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError

from migrator import dsn as dsnlib
from migrator.errors import BadInput, MigratorError

REPO_ROOT = Path(__file__).resolve().parent.parent


def schema_path(name: str) -> Path:
    """An Alembic environment shipped with the repository: `schemas/<name>` (`stamp` or `catalog`)."""
    return REPO_ROOT / "schemas" / name


def alembic_config(script_location: Path | str, connection: Connection | None = None) -> Config:
    """A file-less Alembic config; with `connection`, env.py migrates on it instead of connecting itself."""
    location = Path(script_location)
    if not location.is_absolute():
        location = REPO_ROOT / location
    if not (location / "env.py").is_file():
        raise BadInput(f"{location} is not an Alembic environment (no env.py)")
    config = Config()
    # Config options go through ConfigParser interpolation: a literal % must be doubled.
    config.set_main_option("script_location", str(location).replace("%", "%%"))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def upgrade(dsn: str, script_location: Path | str, revision: str = "head") -> None:
    """Upgrade the database to `revision`; each revision commits on its own."""
    config = alembic_config(script_location)
    engine = dsnlib.engine(dsn)
    try:
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


def current_revision(dsn: str) -> str | None:
    """The revision stamped in `alembic_version`, or None when the database was never migrated."""
    try:
        with dsnlib.connect(dsn, autocommit=True) as conn:
            found = conn.execute("SELECT to_regclass('alembic_version') IS NOT NULL").fetchone()
            if not found or not found[0]:
                return None
            rows = conn.execute("SELECT version_num FROM alembic_version ORDER BY 1").fetchall()
    except psycopg.Error as exc:
        message = dsnlib.scrub(str(exc), dsn).strip()
        raise MigratorError(f"cannot read the schema revision of {dsnlib.mask(dsn)}: {message}") from None
    if not rows:
        return None
    # Several rows only with branches; joined so a mismatch between stamps still shows.
    return ",".join(str(row[0]) for row in rows)


def head_revision(script_location: Path | str) -> str:
    """The single head of the environment's revision graph."""
    try:
        head = ScriptDirectory.from_config(alembic_config(script_location)).get_current_head()
    except CommandError as exc:
        raise BadInput(f"{script_location}: {exc}") from None
    if head is None:
        raise BadInput(f"{script_location} has no revisions")
    return head
