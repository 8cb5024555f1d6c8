"""Provisioning databases on local servers: the one helper `fleet up`, the tests, the benchmarks and
the chaos run share, so they all build a catalog and stamps the same way."""

from __future__ import annotations

from pathlib import Path

from psycopg import sql

from migrator import config as configlib
from migrator.db import alembic
from migrator.db import dsn as dsnlib
from migrator.local.pgserver import LocalServer


def sample_app_env() -> Path:
    """The sample stamp application's Alembic environment, shipped as package data."""
    return alembic.packaged_env("migrator.local", "sample_app")


def create_database(server: LocalServer, name: str, template: str | None = None) -> str:
    """Create a database on the server (as a copy of `template`, if given) and return its DSN."""
    statement = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
    if template is not None:
        statement = sql.SQL("{} TEMPLATE {}").format(statement, sql.Identifier(template))
    with dsnlib.connect(server.dsn("postgres"), autocommit=True) as conn:
        conn.execute(statement)
    return server.dsn(name)


def drop_database(server: LocalServer, name: str) -> None:
    """Drop a database, closing its sessions first."""
    with dsnlib.connect(server.dsn("postgres"), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def catalog_database(server: LocalServer, name: str = "catalog") -> str:
    """A new database at the head of the routing catalog's migrations; returns its DSN."""
    dsn = create_database(server, name)
    alembic.upgrade(dsn, alembic.catalog_env())
    return dsn


def stamp_database(server: LocalServer, name: str) -> str:
    """A new database at the head of the sample stamp application; returns its DSN."""
    dsn = create_database(server, name)
    alembic.upgrade(dsn, sample_app_env())
    return dsn


def write_config(
    path: Path, catalog_url: str, tenancy: configlib.Tenancy | None = None, script_location: Path | None = None
) -> Path:
    """A private migrator.toml naming the catalog and (by default) the sample application's migrations."""
    text = configlib.render(catalog_url, tenancy or configlib.Tenancy(), script_location or sample_app_env())
    return configlib.write(path, text, force=True)
