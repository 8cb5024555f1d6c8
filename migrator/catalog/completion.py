"""What the shell completes from the catalog (`migrator move 7 --to <TAB>`): stamp names and move ids.

One connection with a short timeout, never retried: a slow or unreachable catalog must not stall
the shell, so the caller completes nothing then.
"""

from __future__ import annotations

from migrator.db import dsn as dsnlib

TIMEOUT_S = 2


def _rows(url: str, query: str) -> list[tuple[str, str]]:
    options = f"-c statement_timeout={TIMEOUT_S * 1000}"
    with dsnlib.connect(url, autocommit=True, pinned=False, connect_timeout=TIMEOUT_S, options=options) as conn:
        return [(str(value), str(about)) for value, about in conn.execute(query).fetchall()]


def stamp_names(url: str) -> list[tuple[str, str]]:
    """(name, "state, region") of every stamp."""
    return _rows(url, "SELECT name, state || coalesce(', ' || region, '') FROM stamps ORDER BY name")


def move_ids(url: str) -> list[tuple[str, str]]:
    """(id, "source -> target, phase") of the 50 newest moves."""
    return _rows(url, "SELECT id, source || ' -> ' || target || ', ' || phase FROM moves ORDER BY id DESC LIMIT 50")
