"""One exception family, so the CLI can map every failure to one clear line and an exit code."""

from __future__ import annotations


class MigratorError(Exception):
    """An operation failed for a reason the operator should read (exit code 1)."""

    exit_code = 1


class BadInput(MigratorError):
    """The request itself is wrong: unknown names, malformed files, unsafe preconditions (exit 2)."""

    exit_code = 2


class ConfigError(BadInput):
    """`migrator.toml` or the environment is missing or malformed."""


class PreflightError(BadInput):
    """A move would be unsafe; raised before anything is written."""


class LockBusy(MigratorError):
    """Another operator holds the lock for this tenant or stamp."""


class VerifyMismatch(MigratorError):
    """Source and target differ; the route is not flipped."""


class RouteConflict(MigratorError):
    """The route's compare-and-set lost: someone else changed it first."""


class CheckFailed(MigratorError):
    """A check (`stamp check`, `doctor`) found problems and printed them; the exit code says so."""


class GateFailed(CheckFailed):
    """A check that pipelines gate on failed (exit 3, apart from the 1 of any other failure)."""

    exit_code = 3


class SchemaDrift(GateFailed):
    """`schema status`: an active stamp is not at head."""


class KeysCollide(GateFailed):
    """`keys check`: some tenant's ids are taken on another stamp."""


class Declined(MigratorError):
    """The operator answered no to a confirmation; nothing was changed."""


class NotConverging(MigratorError):
    """Online catch-up did not reach --cutover-backlog within --catchup-timeout: the application writes
    faster than the replay, so the move stops (writable, resumable) rather than force a long freeze."""


class Unreachable(MigratorError):
    """A stamp did not answer. `transient` when a later attempt may reach it (refused, timed out, cut
    off), not when the DSN or its credentials are wrong: queue workers retry only the former."""

    def __init__(self, message: str, *, transient: bool) -> None:
        super().__init__(message)
        self.transient = transient


class Interrupted(MigratorError):
    """A stop was asked for (a worker's SIGTERM, the command's Ctrl-C): the move stopped at a safe point,
    resumable; `move_id` names it."""

    def __init__(self, message: str, move_id: int | None = None) -> None:
        super().__init__(message)
        self.move_id = move_id


class FreezeTooLong(MigratorError):
    """The cutover could not finish within --max-freeze-ms; writes were resumed."""
