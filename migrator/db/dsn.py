"""Connections to stamps and the catalog, with secrets masked and session settings pinned.

DSNs may be URLs, libpq keyword strings or bare service names. Every connection the tool opens
goes through `connect`, so the settings that change how values print (and therefore hash) are the
same on every stamp whatever its server configuration.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import conninfo

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

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
}

MASK = "***"
# `password=...` of a libpq keyword string, quoted or not (in free text it also catches `?password=`).
_KEYWORD_PASSWORD = re.compile(r"(?i)(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)")
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
    """Remove passwords of the given DSNs from free text such as a driver's error message."""
    for dsn in dsns:
        try:
            password = conninfo.conninfo_to_dict(normalize(dsn)).get("password")
        except psycopg.ProgrammingError:
            continue
        if password:
            text = text.replace(str(password), MASK)
    return text


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


def engine(dsn: str) -> Engine:
    """A SQLAlchemy engine over the same libpq DSN (any form), for reflection and Alembic."""
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    return create_engine(
        "postgresql+psycopg://",
        creator=lambda: connect(dsn),
        poolclass=NullPool,
    )
