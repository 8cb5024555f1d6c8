"""The one Alembic `env.py` body shared by the catalog and stamp environments.

Online, it runs on the SQLAlchemy connection handed over in `config.attributes["connection"]`
(how `migrator.migrations` drives Alembic in-process), else on an engine built by
`migrator.dsn.engine` from `-x dsn=...` or `sqlalchemy.url`, so every connection gets the same
pinned session settings. Each revision commits on its own: a failing revision leaves the database
at the previous one instead of rolling back the whole upgrade.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.engine import Connection, make_url

from migrator import dsn as dsnlib
from migrator.errors import BadInput


def run_env(context: Any) -> None:
    """Entry point for env.py: `run_env(alembic.context)`."""
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
    dsn = context.get_x_argument(as_dictionary=True).get("dsn") or context.config.get_main_option("sqlalchemy.url")
    if not dsn:
        raise BadInput("no database given: pass `-x dsn=...` or set sqlalchemy.url")
    if "://" in dsn and "+" in dsn.split("://", 1)[0]:
        dsn = make_url(dsn).set(drivername="postgresql").render_as_string(hide_password=False)
    return str(dsn)
