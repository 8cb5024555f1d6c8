"""The fleet as code: the declarative file of `fleet plan` / `fleet apply`, read and checked.

A YAML file (or TOML, by its `.toml` suffix) lists the stamps under `stamps`:

    stamps:
      - name: eu-3
        service: eu3            # a service of pg_service.conf (its password in ~/.pgpass), or
        dsn: ${EU3_DSN}         # a DSN, whole or in part from the environment
        region: eu
        capacity_rows: 5000000
        state: draining         # active (the default for a new stamp), draining or retired
        kind: shared            # or dedicated

Secrets stay out of the file: a DSN with a literal password is refused, naming the stamp and the
two ways to give it instead. A key left out is not managed: the catalog's value is kept.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import yaml
from psycopg import conninfo

from migrator.catalog import StampState
from migrator.db import dsn as dsnlib
from migrator.errors import BadInput

KINDS = ("shared", "dedicated")
KEYS = {"name", "dsn", "service", "region", "capacity_rows", "capacity_bytes", "state", "kind", "adopt"}
_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_PLACEHOLDER = "migrator-environment-reference"


@dataclass(frozen=True)
class Declared:
    """One stamp of the file. `dsn` is the one to connect with (references filled in from the
    environment: it may hold a password, never shown); `written` is the DSN as the file gives it."""

    name: str
    dsn: str | None = None
    written: str | None = None
    region: str | None = None
    capacity_rows: int | None = None
    capacity_bytes: int | None = None
    state: StampState | None = None
    kind: str | None = None
    adopt: bool = False

    @property
    def shown_dsn(self) -> str:
        """The DSN as the output may show it: as written, masked (a password could only come from the environment)."""
        return dsnlib.mask(self.written or "")


def read(path: Path) -> list[Declared]:
    """The stamps the file declares, each checked; refused naming the file, the stamp and the key."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput(f"cannot read {path}: {exc}") from None
    try:
        raw = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        form = "TOML" if path.suffix == ".toml" else "YAML"
        raise BadInput(f"{path} is not valid {form}: {_first_line(exc)}") from None
    if not isinstance(raw, dict) or set(raw) != {"stamps"} or not isinstance(raw["stamps"], list):
        raise BadInput(f"{path}: expected one key, `stamps`, holding a list of stamps (name, dsn or service, ...)")
    declared = [_entry(path, number, entry) for number, entry in enumerate(raw["stamps"], start=1)]
    seen: set[str] = set()
    for stamp in declared:
        if stamp.name in seen:
            raise BadInput(f"{path}: stamp {stamp.name} is declared twice")
        seen.add(stamp.name)
    return declared


def _entry(path: Path, number: int, entry: Any) -> Declared:
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"].strip():
        raise BadInput(f"{path}: stamp #{number} needs a `name`")
    name = entry["name"].strip()
    where = f"{path}: stamp {name}"
    unknown = sorted(set(entry) - KEYS)
    if unknown:
        raise BadInput(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(KEYS))})")
    if "dsn" in entry and "service" in entry:
        raise BadInput(f"{where}: give `dsn` or `service`, not both")
    written = _written_dsn(where, entry)
    state = _choice(where, entry, "state", [s.value for s in StampState])
    return Declared(
        name,
        _resolved(where, written) if written is not None else None,
        written,
        _text(where, entry, "region"),
        _count(where, entry, "capacity_rows"),
        _count(where, entry, "capacity_bytes"),
        StampState(state) if state else None,
        _choice(where, entry, "kind", list(KINDS)),
        _flag(where, entry, "adopt"),
    )


def _written_dsn(where: str, entry: dict[str, Any]) -> str | None:
    """The DSN as written (`service: NAME` is `service=NAME`), refused if it holds a literal password."""
    if "service" in entry:
        service = _text(where, entry, "service")
        return None if service is None else conninfo.make_conninfo(service=service)
    written = _text(where, entry, "dsn")
    if written is None:
        return None
    try:
        params = conninfo.conninfo_to_dict(dsnlib.normalize(_REFERENCE.sub(_PLACEHOLDER, written)))
    except psycopg.Error:
        raise BadInput(f"{where}: `dsn` is not a libpq DSN ({dsnlib.mask(written)})") from None
    if params.get("password") not in (None, _PLACEHOLDER):
        raise BadInput(
            f"{where}: the DSN holds a password; keep secrets out of the file: give a service name "
            "(`service: NAME`, from pg_service.conf, its password in ~/.pgpass) or an environment reference "
            "(`dsn: ${STAMP_DSN}`, or `${STAMP_PASSWORD}` in its place)"
        )
    return written


def _resolved(where: str, written: str) -> str:
    """The DSN with each `${VAR}` replaced by the environment's value; an unset variable is refused."""

    def value(match: re.Match[str]) -> str:
        found = os.environ.get(match.group(1))
        if found is None:
            raise BadInput(f"{where}: environment variable {match.group(1)} is not set")
        return found

    return _REFERENCE.sub(value, written)


def _text(where: str, entry: dict[str, Any], key: str) -> str | None:
    value = entry.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise BadInput(f"{where}: `{key}` must be a non-empty string")
    return value.strip()


def _count(where: str, entry: dict[str, Any], key: str) -> int | None:
    value = entry.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BadInput(f"{where}: `{key}` must be a positive whole number, found {value!r}")
    return value


def _choice(where: str, entry: dict[str, Any], key: str, allowed: list[str]) -> str | None:
    value = entry.get(key)
    if value is not None and value not in allowed:
        raise BadInput(f"{where}: `{key}` must be one of {', '.join(allowed)}, found {value!r}")
    return value


def _flag(where: str, entry: dict[str, Any], key: str) -> bool:
    value = entry.get(key, False)
    if not isinstance(value, bool):
        raise BadInput(f"{where}: `{key}` must be true or false")
    return value


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
