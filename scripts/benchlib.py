"""What the benchmark scripts share: local servers that are stopped whatever happens, and migrated databases."""

from __future__ import annotations

import shutil
import signal
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from migrator import config as configlib
from migrator import migrations, pgserver
from migrator.catalog import Catalog
from migrator.fleet import create_database


def _terminated(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def stop_on_sigterm() -> None:
    """Make `kill` raise SystemExit, so the benchmark's finally blocks stop its servers."""
    signal.signal(signal.SIGTERM, _terminated)


@contextmanager
def local_servers(prefix: str, names: Sequence[str]) -> Iterator[tuple[Path, list[pgserver.LocalServer]]]:
    """One local PostgreSQL server per name in a temporary directory; all stopped and removed at the end."""
    stop_on_sigterm()
    base = Path(tempfile.mkdtemp(prefix=prefix))
    base.chmod(0o755)
    servers: list[pgserver.LocalServer] = []
    try:
        for name in names:
            servers.append(pgserver.start_server(base / name))
        yield base, servers
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(base, ignore_errors=True)


def stamp_database(server: pgserver.LocalServer, name: str) -> str:
    """A new database at the head of the sample stamp schema; returns its DSN."""
    dsn = create_database(server, name)
    migrations.upgrade(dsn, migrations.schema_path("stamp"))
    return dsn


def catalog_with_config(server: pgserver.LocalServer, base: Path) -> tuple[Catalog, Path]:
    """A migrated catalog database and a migrator.toml naming it, for the `migrator` processes."""
    catalog = Catalog(create_database(server, "catalog"))
    migrations.upgrade(catalog.url, migrations.schema_path("catalog"))
    config = base / "migrator.toml"
    config.write_text(configlib.render(catalog.url, configlib.Tenancy(), migrations.schema_path("stamp")))
    return catalog, config
