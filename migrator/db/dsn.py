"""Connections to stamps and the catalog, with secrets masked and session settings pinned.

DSNs may be URLs, libpq keyword strings or bare service names. Every connection the tool opens
goes through `connect`, so the settings that change how values print (and therefore hash) are the
same on every stamp whatever its server configuration.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit, urlunsplit

import psycopg
from psycopg import conninfo

if TYPE_CHECKING:
    from sqlalchemy.engine import URL, Engine

# Settings that change the text form of values: pinned so checksums compare data, not configuration.
PINNED_SETTINGS: dict[str, str] = {
    "TimeZone": "UTC",
    "DateStyle": "ISO,MDY",
    "IntervalStyle": "postgres",
    "extra_float_digits": "3",
    "bytea_output": "hex",
    "lc_monetary": "C",
    "lc_numeric": "C",
    "standard_conforming_strings": "on",
    # As pg_dump does: a row-level security policy that would hide rows from migrator raises an error
    # (SQLSTATE 42501) instead of returning fewer rows, so no copy, checksum or size is silently smaller.
    "row_security": "off",
}

MASK = "***"
# `password=...` of a libpq keyword string, quoted or not (in free text it also catches `?password=`).
# A value already masked (`***` then a space, a parenthesis or the end) is left as it is, so masking a
# line twice (a message built from a masked DSN, then the log filter) keeps its punctuation.
_KEYWORD_PASSWORD = re.compile(r"(?i)(password\s*=\s*)(?!\*\*\*(?![^\s)]))('(?:[^'\\]|\\.)*'|\S+)")
# A URL's `password` query parameter, up to the next parameter.
_QUERY_PASSWORD = re.compile(r"(?i)([?&]password=)[^&]*")
# `scheme://user:password@` anywhere in free text.
_URL_USERINFO = re.compile(r"(\w+://[^:/@\s]+:)[^@\s]+@")


def normalize(dsn: str) -> str:
    """A bare word is a libpq service name (`pg_service.conf`); anything else is passed through."""
    dsn = dsn.strip()
    if "://" not in dsn and "=" not in dsn:
        return f"service={dsn}"
    return dsn


def server_of(dsn: str) -> str:
    """`host:port` of the server behind `dsn`: what a per-server connection budget counts against."""
    params = conninfo.conninfo_to_dict(normalize(dsn))
    return f"{params.get('host', '')}:{params.get('port', '5432')}"


def mask(dsn: str) -> str:
    """The DSN with any password replaced by `***`, for every line the tool prints or logs."""
    dsn = dsn.strip()
    if "://" in dsn:
        parts = urlsplit(dsn)
        if parts.password is not None:
            user = parts.username or ""
            host = parts.netloc.rsplit("@", 1)[1]
            parts = parts._replace(netloc=f"{user}:{MASK}@{host}")
        return _QUERY_PASSWORD.sub(rf"\g<1>{MASK}", urlunsplit(parts))
    return _KEYWORD_PASSWORD.sub(rf"\g<1>{MASK}", dsn)


def mask_text(text: str) -> str:
    """Mask anything that looks like a DSN password in free text (last line of defence for logs)."""
    text = _URL_USERINFO.sub(rf"\g<1>{MASK}@", text)
    return _KEYWORD_PASSWORD.sub(rf"\g<1>{MASK}", text)


def scrub(text: str, *dsns: str) -> str:
    """Remove passwords of the given DSNs from free text such as a driver's error message.

    Also their percent-encoded forms, as they appear in URLs (`sqlalchemy_url` renders one).
    """
    for dsn in dsns:
        try:
            password = conninfo.conninfo_to_dict(normalize(dsn)).get("password")
        except psycopg.ProgrammingError:
            continue
        if password:
            forms = {str(password), quote(str(password), safe=""), quote(str(password), safe=" +")}
            for form in sorted(forms, key=len, reverse=True):
                text = text.replace(form, MASK)
    return text


def reason(exc: BaseException, dsn: str) -> str:
    """The first line of a driver's error, with the DSN's password removed: the "why" of a one-line error."""
    text = str(exc).strip()
    return scrub(text.splitlines()[0] if text else type(exc).__name__, dsn)


def sqlalchemy_url(dsn: str, *, with_password: bool = True) -> URL:
    """The DSN (URL, keywords or service name) as a `postgresql+psycopg` SQLAlchemy URL.

    For Alembic environments that build their own engine from `sqlalchemy.url`. Every libpq
    parameter besides user, password and database travels in the query, which the psycopg dialect
    hands back to libpq as is; host and port join the URL proper only when they fit there (one
    host name, a numeric port), so socket directories and host lists keep working. Without the
    password it still names the stamp, for offline (`--sql`) runs that contact no database.
    """
    from sqlalchemy.engine import URL

    params = {key: str(value) for key, value in conninfo.conninfo_to_dict(normalize(dsn)).items() if value is not None}
    password = params.pop("password", None)
    if not with_password:
        password = None
    user, database = params.pop("user", None), params.pop("dbname", None)
    host, port = params.get("host"), params.get("port")
    in_url = host is not None and host != "" and not any(c in host for c in "/,:") and (port is None or port.isdigit())
    if in_url:
        params.pop("host")
        params.pop("port", None)
    return URL.create(
        "postgresql+psycopg",
        username="" if user is None and password else user,  # a URL holds a password only after a user name
        password=password,
        host=host if in_url else None,
        port=int(port) if in_url and port else None,
        database=database,
        query=params,
    )


def _options(pinned: bool) -> str:
    if not pinned:
        return ""
    return " ".join(f"-c {key}={value}" for key, value in PINNED_SETTINGS.items())


def connect(dsn: str, *, autocommit: bool = False, pinned: bool = True, **kwargs: Any) -> psycopg.Connection[Any]:
    """Open a connection with the pinned settings and a bounded connect timeout."""
    params: dict[str, Any] = {"connect_timeout": 10, "application_name": "migrator"}
    if pinned:
        params["options"] = _options(pinned)
    params.update(kwargs)
    return psycopg.connect(normalize(dsn), autocommit=autocommit, **params)


def may_skip_triggers(conn: psycopg.Connection[Any]) -> bool:
    """Whether the session's role may set `session_replication_role`: a superuser, or on PostgreSQL 15+
    a role granted `SET ON PARAMETER session_replication_role`."""
    query = "SELECT rolsuper FROM pg_roles WHERE rolname = current_user"
    if conn.info.server_version >= 150000:
        query = (
            "SELECT rolsuper OR has_parameter_privilege(current_user, 'session_replication_role', 'SET')"
            " FROM pg_roles WHERE rolname = current_user"
        )
    row = conn.execute(query).fetchone()
    return bool(row and row[0])


class WriteMode(StrEnum):
    """How migrator's write sessions on a target run (`write_as_copies`), recorded on each move."""

    REPLICA = "replica"  # no triggers, no foreign-key checks: migrator proves the foreign keys itself
    CHECKED = "checked"  # the target's triggers and foreign-key checks run for every write


def write_mode(conn: psycopg.Connection[Any]) -> tuple[WriteMode, str]:
    """The mode this session's role gets on its stamp, and why, in words for `move status`."""
    role = conn.execute("SELECT current_user").fetchone()[0]  # type: ignore[index]
    if may_skip_triggers(conn):
        return WriteMode.REPLICA, (
            f"role {role} may set session_replication_role: no trigger or foreign-key check fires for "
            "migrator's writes, and migrator proves every foreign key before the flip"
        )
    return WriteMode.CHECKED, (
        f"role {role} may not set session_replication_role, so the target checks every foreign key as rows "
        f"arrive (faster with GRANT SET ON PARAMETER session_replication_role TO {role})"
    )


def write_as_copies(conn: psycopg.Connection[Any]) -> bool:
    """Make this session's writes copies, not business events, where the role may: `replica` mode.

    The application's ordinary triggers and rules (and migrator's own guard) do not fire for them,
    while every other session's still do. Foreign-key checks (triggers too) are skipped as well,
    which is safe because verify compares every row. Call it on a fresh connection: the setting is
    committed here and lasts for the session. Returns whether the session is in replica mode.
    """
    with conn.transaction():
        if not may_skip_triggers(conn):
            return False
        conn.execute("SET session_replication_role = replica")
    return True


def engine(dsn: str) -> Engine:
    """A SQLAlchemy engine over the same libpq DSN (any form), for reflection and Alembic."""
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    return create_engine(
        "postgresql+psycopg://",
        creator=lambda: connect(dsn),
        poolclass=NullPool,
    )
