"""The retry policies, declared once: what each retries, for how long, and why there.

Only errors that a retry can cure are retried; everything else, including the fence's own
SQLSTATE, propagates at once. A policy is applied at the outermost step that is idempotent and
owns its connections (a public `Catalog` method, a stamp step that opens its own), never also to
the helpers it calls, so attempts never multiply. A function handed a connection it cannot
replace is not retried on transient errors: the caller that owns the connection retries the
whole step or fails fast. Deadlines are computed by the caller, outside the retried call, so a
retry never restarts the clock. A call that starts retrying logs one warning, so an operator can see
flapping links; each further attempt is logged with `-v`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator

import psycopg
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
    wait_incrementing,
)

from migrator.errors import FreezeTooLong, Unreachable

log = logging.getLogger("migrator.retry")

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
    """True for errors that a fresh connection or a new transaction can cure (a stamp session that
    could not open, `Unreachable`, when its cause was)."""
    if isinstance(exc, Unreachable):
        return exc.transient
    if not isinstance(exc, psycopg.Error):
        return False
    state = exc.sqlstate
    if state is None:
        return isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError) and not any(
            text in str(exc) for text in _MISCONFIGURED
        )
    return state.startswith("08") or state in _TRANSIENT_STATES


_observers: list[Callable[[str], None]] = []


@contextlib.contextmanager
def observe(callback: Callable[[str], None]) -> Iterator[None]:
    """Call `callback(step name)` for every transient retry while the block runs (metrics count them)."""
    _observers.append(callback)
    try:
        yield
    finally:
        _observers.remove(callback)


def _log_attempt(state: RetryCallState) -> None:
    """One warning when a call starts retrying, then each further attempt at INFO (`-v`): an unreachable
    catalog gives one line while it is waited for, and then the one error line, not a warning per attempt."""
    exc = state.outcome.exception() if state.outcome else None
    step = state.fn.__name__ if state.fn else "?"
    why = str(exc).splitlines()[0] if exc else ""
    if state.attempt_number == 1:
        log.warning("transient error in %s, retrying for a few seconds: %s", step, why)
    else:
        log.info("transient error in %s (attempt %d): %s", step, state.attempt_number, why)
    for callback in list(_observers):
        callback(step)


def _on_transient_errors() -> Retrying:
    """6 attempts with back-off doubling from 0.2 s (0.2, 0.4, 0.8, 1.6, 3.2): about 6 s in all."""
    return Retrying(
        retry=retry_if_exception(is_transient),
        stop=stop_after_attempt(6),
        wait=wait_exponential(multiplier=0.2, max=8.0),
        before_sleep=_log_attempt,
        reraise=True,
    )


CATALOG = _on_transient_errors()
"""A public `Catalog` method (and the rollout's `RunLog` statements, `catalog.locks.take_slot`):
one short catalog transaction, run again whole on a transient error. About 6 s, enough for a
catalog restart or failover, short enough that a command against a dead catalog fails clearly. The
session of the failed attempt is dropped (`Catalog.transaction`), so the next attempt reconnects.
Not for `Catalog.flip`, which runs on the tenant lock's session and fails fast instead."""

STAMP_STEP = _on_transient_errors()
"""An idempotent step on a stamp that opens its own connections: one table's copy (from the
cursor committed on the target), one table's batch delete, a catch-up (replay by key, towards a
deadline fixed by its caller). Run again whole on a transient error (stamp restart, terminated
sessions), for about 6 s; each attempt reconnects and resumes from what was committed."""

LOCK_YIELD = Retrying(
    retry=retry_if_exception_type(psycopg.errors.LockNotAvailable),
    stop=stop_after_attempt(50),
    wait=wait_incrementing(start=0.05, increment=0.05, max=1.0),
    reraise=True,
)
"""migrator's DDL on the application's tables (installing or dropping the guard triggers), each
attempt in a (sub)transaction with a 200 ms lock_timeout: on a lock conflict this side rolls back,
releasing its locks, and tries again after 50 ms, 100 ms, ... up to 1 s, 50 attempts (about 50 s
in all), so PostgreSQL never picks the application as a deadlock victim. The one policy used on
a connection handed in: a lock timeout leaves that connection healthy, only the savepoint is lost."""


def freeze_attempts(attempts: int) -> Retrying:
    """The online cutover's attempts (--cutover-attempts): an attempt whose freeze would exceed
    --max-freeze-ms lifts the fence and raises FreezeTooLong; the next one starts after 0.5 s, 1 s,
    ... up to 5 s, so the burst of writes that made the freeze too long can pass. Nothing else is
    retried here: other failures stop the move, resumable."""
    return Retrying(
        retry=retry_if_exception_type(FreezeTooLong),
        stop=stop_after_attempt(attempts),
        wait=wait_incrementing(start=0.5, increment=0.5, max=5.0),
        reraise=True,
    )
