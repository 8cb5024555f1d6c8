"""What the benchmark scripts share: local servers that are stopped whatever happens, and migrated databases."""

from __future__ import annotations

import shutil
import signal
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from migrator import config as configlib
from migrator.catalog import Catalog
from migrator.local import pgserver, provision


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


def catalog_with_config(
    server: pgserver.LocalServer, base: Path, name: str = "catalog", tenancy: configlib.Tenancy | None = None
) -> tuple[Catalog, Path]:
    """A migrated catalog database and a config file naming it (`migrator.toml` for the default
    catalog, else `<name>.toml`), for the `migrator` processes."""
    catalog = Catalog(provision.catalog_database(server, name))
    config = "migrator.toml" if name == "catalog" else f"{name}.toml"
    return catalog, provision.write_config(base / config, catalog.url, tenancy)
