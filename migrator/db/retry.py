"""Bounded retries of transient database errors (lost connection, serialization failure, deadlock).

Only errors that a retry can cure are retried; everything else, including the fence's own
SQLSTATE, propagates at once. Each attempt is logged so an operator can see flapping links.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

import psycopg
from tenacity import RetryCallState, retry, retry_if_exception, stop_after_attempt, wait_exponential

log = logging.getLogger("migrator.retry")

T = TypeVar("T")

# Class 08 is connection exceptions; 57P0x are shutdowns and pg_terminate_backend; class 40 is rollback.
_TRANSIENT_STATES = {"57P01", "57P02", "57P03", "40001", "40P01"}

# A failed connection attempt carries no SQLSTATE (libpq only has the message), so these texts tell
# a wrong DSN or wrong credentials, which no retry cures, from a refused or lost connection.
_MISCONFIGURED = (
    "authentication failed",  # FATAL: password (or peer, ident...) authentication failed for user
    "no password supplied",
    "does not exist",  # FATAL: database "x" / role "x" does not exist
    "no pg_hba.conf entry",
    "invalid connection option",
    "for connection option",  # invalid integer value "x" for connection option "port"
    "definition of service",  # definition of service "x" not found
    "Name or service not known",  # DNS has no such host (a temporary resolver failure stays transient)
)


def is_transient(exc: BaseException) -> bool:
    """True for errors that a fresh connection or a new transaction can cure."""
    if not isinstance(exc, psycopg.Error):
        return False
    state = exc.sqlstate
    if state is None:
        return isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError) and not any(
            text in str(exc) for text in _MISCONFIGURED
        )
    return state.startswith("08") or state in _TRANSIENT_STATES


def _log_attempt(state: RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome else None
    log.warning(
        "transient error in %s (attempt %d): %s",
        state.fn.__name__ if state.fn else "?",
        state.attempt_number,
        str(exc).splitlines()[0] if exc else "",
    )


def transient(attempts: int = 6, max_wait: float = 8.0) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Decorator: retry the call on transient errors, with exponential back-off, then re-raise."""
    return retry(
        retry=retry_if_exception(is_transient),
        stop=stop_after_attempt(attempts),
        wait=wait_exponential(multiplier=0.2, max=max_wait),
        before_sleep=_log_attempt,
        reraise=True,
    )
