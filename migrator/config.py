"""`migrator.toml`: where the catalog lives and how tenants are keyed in the stamps' schema.

Found via `--config PATH`, then `MIGRATOR_CONFIG`, then `./migrator.toml`; `MIGRATOR_CATALOG_URL`
overrides `catalog_url`. Everything is validated here, before any connection is opened, so a
typo fails with the key at fault rather than half-way through a move.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Sequence
from dataclasses import astuple, dataclass, field
from pathlib import Path
from typing import Any

from migrator.errors import ConfigError

DEFAULT_FILE = "migrator.toml"


@dataclass(frozen=True)
class Reference:
    """A foreign key the schema does not declare (`[tenancy.references]`, common in Rails apps):
    `table`'s `columns` hold values of `parent`'s `parent_columns`, so its rows are found through them."""

    table: str
    columns: tuple[str, ...]
    parent: str
    parent_columns: tuple[str, ...]

    @property
    def name(self) -> str:
        """How messages and `move --dry-run` name it (no constraint name exists)."""
        return f"[tenancy.references] {self.table}.{','.join(self.columns)}"


@dataclass(frozen=True)
class Tenancy:
    """How tenant rows are recognised in every stamp (`[tenancy]`)."""

    column: str = "tenant_id"
    root_table: str = "tenants"
    root_column: str = "id"
    db_schema: str = "public"
    exclude: tuple[str, ...] = ()
    references: tuple[Reference, ...] = ()
    follow: tuple[str, ...] = ()
    """Global tables whose rows tenants share (a `users` row of several organisations): a move copies
    the rows its tenants reference that the target lacks, and cleanup never deletes them."""
    schemas: tuple[str, ...] = ()
    """More PostgreSQL schemas whose tables are found like those of `db_schema` (the default one)."""

    @property
    def searched(self) -> list[str]:
        """Every schema discovery reads: the default one first."""
        return list(dict.fromkeys((self.db_schema, *self.schemas)))


@dataclass(frozen=True)
class Limits:
    """Throttle limits of a move: the fleet's (`throttle` in the catalog, `[throttle]` here) and its own
    flags; None is no limit.

    A copy batch or catch-up round waits while a standby's replay lag, a logical slot's retained WAL
    or the active sessions of a stamp are over their limit; `critical_load` active sessions stop
    the move (unfenced, resumable).
    """

    max_replica_lag_s: float | None = None
    max_slot_lag_bytes: int | None = None
    max_active_sessions: int | None = None
    critical_load: int | None = None

    def stricter(self, other: Limits) -> Limits:
        """Each limit the lower of the two (a flag can tighten the fleet's limit, never loosen it)."""
        return Limits(*(_lower(a, b) for a, b in zip(astuple(self), astuple(other), strict=True)))

    @property
    def any(self) -> bool:
        return any(value is not None for value in astuple(self))

    @property
    def reads_activity(self) -> bool:
        """Whether the limits need another role's sessions and replication state (pg_read_all_stats)."""
        return (
            self.max_replica_lag_s is not None or self.max_active_sessions is not None or self.critical_load is not None
        )


def _lower(a: Any, b: Any) -> Any:
    return b if a is None else a if b is None else min(a, b)


@dataclass(frozen=True)
class Config:
    """The whole configuration; `path` is None when built from the environment alone."""

    catalog_url: str
    tenancy: Tenancy = field(default_factory=Tenancy)
    script_location: Path | None = None  # [schema]: the stamps' Alembic environment, if there is one
    path: Path | None = None
    throttle: Limits = field(default_factory=Limits)  # [throttle]: every move's limits, at the least

    def schema_env(self) -> Path:
        """The stamps' Alembic environment, for `migrator schema`; refused when none is configured or it is
        missing. Checked here, by the commands that use it, not on loading: a migrator.toml copied
        elsewhere still lists routes and moves tenants."""
        if self.script_location is None:
            raise ConfigError(
                f"{self.path or 'the configuration'}: no Alembic environment is configured for the stamps;"
                ' add [schema] script_location = "DIR" (the directory holding env.py) to use `migrator schema`'
            )
        if not self.script_location.is_dir():
            where = self.path or "the configuration"
            raise ConfigError(f"{where}: [schema] script_location: no such directory {self.script_location}")
        return self.script_location


_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # not allowed in a TOML comment
_TOP_KEYS = {"catalog_url", "tenancy", "schema", "throttle"}
# [throttle] key -> (Limits field, type, unit for messages)
_THROTTLE_KEYS: dict[str, tuple[str, type | tuple[type, ...], str]] = {
    "max_replica_lag": ("max_replica_lag_s", (int, float), "seconds"),
    "max_slot_lag": ("max_slot_lag_bytes", int, "bytes"),
    "max_active_sessions": ("max_active_sessions", int, "sessions"),
    "critical_load": ("critical_load", int, "sessions"),
}
_TENANCY_KEYS = {"column", "root_table", "root_column", "schema", "schemas", "exclude", "references", "follow"}
_REFERENCE = re.compile(r"^([^.,\s]+)\.([^.,\s]+(?:,[^.,\s]+)*)$")  # table.column or table.col1,col2
_SCHEMA_KEYS = {"script_location"}


def _check_keys(section: str, table: dict[str, Any], allowed: set[str], path: Path) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        where = f"[{section}] " if section else ""
        raise ConfigError(f"{path}: unknown key {where}{unknown[0]!r} (expected one of {', '.join(sorted(allowed))})")


def _string(table: dict[str, Any], key: str, default: str, section: str, path: Path) -> str:
    value = table.get(key, default)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{path}: [{section}] {key} must be a non-empty string, got {_shown(value)}")
    return value


def _shown(value: Any) -> str:
    """A wrong value for an error line: its repr on one line, cut short."""
    text = repr(value).replace("\n", " ")
    return text if len(text) <= 60 else text[:57] + "..."


def find_config_file(explicit: str | Path | None) -> Path:
    """The file named by --config, else MIGRATOR_CONFIG, else ./migrator.toml."""
    if explicit:
        return Path(explicit)
    env = os.environ.get("MIGRATOR_CONFIG")
    if env:
        return Path(env)
    return Path.cwd() / DEFAULT_FILE


def parse(text: str, path: Path) -> Config:
    """Validate the TOML text of a config file; every error names the file and the line or key."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        if message.endswith("(at end of document)"):  # tomllib names no line there: it is the last one
            message = message.replace("end of document", f"line {max(1, len(text.splitlines()))}, end of document")
        raise ConfigError(f"{path}: malformed TOML: {message}") from None
    _check_keys("", raw, _TOP_KEYS, path)
    tenancy_raw = raw.get("tenancy", {})
    schema_raw = raw.get("schema", {})
    for section, value in (("tenancy", tenancy_raw), ("schema", schema_raw)):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: {section} must be a table ([{section}]), got {value!r}")
    _check_keys("tenancy", tenancy_raw, _TENANCY_KEYS, path)
    _check_keys("schema", schema_raw, _SCHEMA_KEYS, path)
    exclude, follow = tenancy_raw.get("exclude", []), tenancy_raw.get("follow", [])
    schemas = tenancy_raw.get("schemas", [])
    for key, value in (("exclude", exclude), ("follow", follow), ("schemas", schemas)):
        if not isinstance(value, list) or not all(isinstance(t, str) and t for t in value):
            what = "schema" if key == "schemas" else "table"
            raise ConfigError(f"{path}: [tenancy] {key} must be a list of {what} names, got {_shown(value)}")
    tenancy = Tenancy(
        column=_string(tenancy_raw, "column", "tenant_id", "tenancy", path),
        root_table=_string(tenancy_raw, "root_table", "tenants", "tenancy", path),
        root_column=_string(tenancy_raw, "root_column", "id", "tenancy", path),
        db_schema=_string(tenancy_raw, "schema", "public", "tenancy", path),
        exclude=tuple(exclude),
        references=_references(tenancy_raw.get("references", {}), path),
        follow=tuple(follow),
        schemas=tuple(schemas),
    )
    file_url = raw.get("catalog_url")
    if file_url is not None and (not isinstance(file_url, str) or not file_url):
        raise ConfigError(f"{path}: catalog_url must be a non-empty string, got {type(file_url).__name__}")
    catalog_url = os.environ.get("MIGRATOR_CATALOG_URL") or file_url
    if not catalog_url:
        raise ConfigError(f"{path}: catalog_url is missing (or set MIGRATOR_CATALOG_URL)")
    script = None
    if "script_location" in schema_raw:
        script = _config_relative(Path(_string(schema_raw, "script_location", "", "schema", path)), path)
    throttle = _throttle(raw.get("throttle", {}), path)
    return Config(catalog_url=catalog_url, tenancy=tenancy, script_location=script, path=path, throttle=throttle)


def _throttle(raw: Any, path: Path) -> Limits:
    """`[throttle]`: the fleet's default limits (`max_replica_lag = 10`), a move's flags only stricter."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: throttle must be a table ([throttle]), got {_shown(raw)}")
    _check_keys("throttle", raw, set(_THROTTLE_KEYS), path)
    values: dict[str, Any] = {}
    for key, value in raw.items():
        name, kind, unit = _THROTTLE_KEYS[key]
        number = value if isinstance(value, int | float) and not isinstance(value, bool) else None
        if number is None or number <= 0 or not isinstance(number, kind):
            raise ConfigError(f"{path}: [throttle] {key} must be a positive number of {unit}, got {_shown(value)}")
        values[name] = value
    return Limits(**values)


def _references(raw: Any, path: Path) -> tuple[Reference, ...]:
    """`[tenancy.references]`: `"invoice_lines.invoice_id" = "invoices.id"` (composite: `t.a,b` = `p.x,y`)."""
    if not isinstance(raw, dict):
        raise ConfigError(f'{path}: [tenancy.references] must be a table of "table.column" = "table.column"')
    found = []
    for child, parent in raw.items():
        left = _REFERENCE.match(child)
        right = _REFERENCE.match(parent) if isinstance(parent, str) else None
        if not (left and right):
            raise ConfigError(
                f"{path}: [tenancy.references] {_shown(child)} = {_shown(parent)}: write "
                '"table.column" = "parent_table.column" (columns comma-separated for a composite key)'
            )
        columns, parent_columns = tuple(left[2].split(",")), tuple(right[2].split(","))
        if len(columns) != len(parent_columns):
            raise ConfigError(
                f"{path}: [tenancy.references] {child!r} names {len(columns)} columns but {parent!r} "
                f"names {len(parent_columns)}"
            )
        found.append(Reference(left[1], columns, right[1], parent_columns))
    return tuple(found)


def _config_relative(value: Path, config_file: Path) -> Path:
    """A path in the file is relative to the file's own directory (like Alembic's `%(here)s`),
    never to the current directory or the install location."""
    value = value.expanduser()
    return value if value.is_absolute() else (config_file.absolute().parent / value)


def load(explicit: str | Path | None = None) -> Config:
    """Load and validate the configuration the CLI and the engine run with."""
    path = find_config_file(explicit)
    if not path.is_file():
        raise ConfigError(f"no configuration file at {path} (use --config, MIGRATOR_CONFIG or ./migrator.toml)")
    return parse(path.read_text(encoding="utf-8"), path)


def render(
    catalog_url: str,
    tenancy: Tenancy,
    script_location: Path | None,
    *,
    notes: Sequence[str] = (),
    schema_hint: bool = False,
) -> str:
    """A commented config file (`fleet up`, `migrator init`) that `parse` reads back as these values.

    `notes` become comment lines at the top (how `init` guessed the tenancy); with no
    `script_location`, `schema_hint` adds a commented-out [schema] section to fill in.
    """

    def q(value: str) -> str:  # a TOML basic string: JSON's escapes are TOML's, plus DEL
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")

    exclude = ", ".join(q(t) for t in tenancy.exclude)
    lines = [
        "# migrator.toml: where the routing catalog is and how tenant rows are recognised on every stamp.",
        "# Found via --config, then $MIGRATOR_CONFIG, then ./migrator.toml; paths are relative to this file.",
        *(f"# {_CONTROL.sub(' ', note)}" for note in notes),
        "",
        "# The routing catalog's database (tenant -> stamp); $MIGRATOR_CATALOG_URL overrides it.",
        f"catalog_url = {q(catalog_url)}",
        "",
        "[tenancy]",
        "# The tenant key column. Tables without it that reach a table with it through foreign keys are",
        "# the tenants' too (found through those keys); the rest are global and never moved.",
        f"column = {q(tenancy.column)}",
        "# The table whose key *is* the tenant id, and that key column.",
        f"root_table = {q(tenancy.root_table)}",
        f"root_column = {q(tenancy.root_column)}",
        "# The schema holding the tenant tables (the root table's; `schemas` adds more to search).",
        f"schema = {q(tenancy.db_schema)}",
        *([f"schemas = [{', '.join(q(s) for s in tenancy.schemas)}]"] if tenancy.schemas else []),
        "# Tables never moved even though they have the tenant column.",
        f"exclude = [{exclude}]",
    ]
    if tenancy.follow:
        lines += [
            "# Global tables whose rows tenants share: a move copies the referenced rows the target lacks.",
            f"follow = [{', '.join(q(t) for t in tenancy.follow)}]",
        ]
    if tenancy.references:
        lines += [
            "",
            "# Foreign keys the schema does not declare: rows of the left table are found through them.",
            "[tenancy.references]",
            *(
                f"{q(r.table + '.' + ','.join(r.columns))} = {q(r.parent + '.' + ','.join(r.parent_columns))}"
                for r in tenancy.references
            ),
        ]
    if script_location is not None:
        lines += ["", "# The stamps' Alembic environment, for `migrator schema`.", "[schema]"]
        lines += [f"script_location = {q(str(script_location))}"]
    elif schema_hint:
        lines += [
            "",
            "# The stamps have an alembic_version table: to run their migrations with `migrator schema`,",
            "# name the directory holding the application's Alembic env.py.",
            "# [schema]",
            '# script_location = "path/to/alembic"',
        ]
    return "\n".join(lines) + "\n"


def refuse_existing(path: Path, force: bool) -> None:
    """An existing file is kept unless `force`: it may be someone's working configuration."""
    if not force and (path.exists() or path.is_symlink()):
        raise ConfigError(f"{path} already exists; pass --force to overwrite it")


def write(path: Path, text: str, *, force: bool = False) -> Path:
    """Write a config file readable by its owner only (it holds the catalog URL, perhaps a password)."""
    refuse_existing(path, force)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)  # O_EXCL: no race with another writer
    fd = os.open(path, flags, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        os.fchmod(handle.fileno(), 0o600)  # an overwritten file would keep its old mode
        handle.write(text)
    return path
