"""The routing table for routers that are not Python: JSON, CSV or an nginx `map` block, written atomically.

An edge router reloads the file whenever it changes, so it must never see half a file: the text is
written to a temporary file in the same directory and renamed over the old one.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from collections.abc import Sequence
from enum import StrEnum
from pathlib import Path

from migrator.catalog.models import Route
from migrator.errors import BadInput


class ExportFormat(StrEnum):
    """`migrator route export --format`."""

    JSON = "json"
    CSV = "csv"
    NGINX_MAP = "nginx-map"


def render_routes(routes: Sequence[Route], fmt: ExportFormat) -> str:
    """The routes in `fmt`: JSON tenant -> {stamp, version, state}; CSV tenant,stamp,version,state; nginx map."""
    if fmt is ExportFormat.JSON:
        table = {r.tenant: {"stamp": r.stamp, "version": r.version, "state": r.state} for r in routes}
        return json.dumps(table, indent=2, sort_keys=True) + "\n"
    if fmt is ExportFormat.CSV:
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["tenant", "stamp", "version", "state"])
        writer.writerows([r.tenant, r.stamp, r.version, r.state] for r in routes)
        return out.getvalue()
    # nginx: `map $tenant $stamp { default ""; "42" "stamp-1"; }`, to include in an http block
    lines = ["map $tenant $stamp {", '    default "";']
    lines += [f"    {_nginx_string(r.tenant)} {_nginx_string(r.stamp)};" for r in routes]
    return "\n".join([*lines, "}"]) + "\n"


def _nginx_string(value: str) -> str:
    """A double-quoted nginx string; a quote or backslash is escaped, a newline cannot be written."""
    if any(c in value for c in "\r\n"):
        raise BadInput(f"{value!r} cannot be written to an nginx map (line break)")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$") + '"'


def write_atomically(path: Path, text: str) -> None:
    """Write then rename, so a reader sees the old file or the new one, never a partial one."""
    path = path.absolute()
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
