"""What every step of one move's run works with, handed down as one value instead of nine parameters.

The options come from `migrator move`'s flags (or a plan's apply); `MoveRun` adds what the run
resolved before its first step: the catalog, both stamps, the source's layout and the tenant's
lock. The move's catalog record is not part of it: each step returns it anew with its phase.
"""

from __future__ import annotations

import functools
import os
import threading
from dataclasses import dataclass, field

from migrator.catalog import Catalog, Stamp, TenantLock
from migrator.errors import Interrupted
from migrator.metrics import Metrics
from migrator.move.capture import ReplaySessions
from migrator.move.throttle import Throttle, ThrottleOptions
from migrator.progress import Progress
from migrator.stamps.discovery import Layout


@dataclass(frozen=True)
class CutoverOptions:
    """Flags --cutover-backlog, --catchup-timeout, --max-freeze-ms, --cutover-attempts."""

    cutover_backlog: int = 200
    catchup_timeout_s: float = 600.0
    max_freeze_ms: float = 2000.0
    attempts: int = 3
    replay_batch: int = 2000


def default_jobs() -> int:
    """Streams per move unless --jobs says otherwise: the machine's cores, 2 to 4.

    Each stream is a source and a target backend; more than the cores of the servers only queue.
    """
    return max(2, min(4, os.cpu_count() or 2))


@dataclass(frozen=True)
class MoveOptions:
    """Options of `migrator move` (flags --batch-rows, --jobs, --rate-limit, --dry-run, --offline,
    --allow-triggers, --no-revert-window, cutover flags)."""

    batch_rows: int = 50_000
    jobs: int = field(default_factory=default_jobs)  # parallel copy (and verify) streams
    rate_limit: float | None = None
    dry_run: bool = False
    online: bool = True
    allow_triggers: bool = False  # proceed although application triggers would fire for migrator's writes
    override_reason: str | None = None  # --override-policy --reason: a placement the policy forbids, audited
    revert_window: bool = True  # the flip opens a revert window (--no-revert-window: no capture on the target)
    cutover: CutoverOptions = field(default_factory=CutoverOptions)
    throttle: ThrottleOptions = field(default_factory=ThrottleOptions)


@dataclass(frozen=True)
class MoveRun:
    """One invocation's run of a move, from its first step to the flip (or its failure)."""

    catalog: Catalog
    source: Stamp
    target: Stamp
    layout: Layout
    lock: TenantLock  # held for the whole run; the flip commits on its session
    options: MoveOptions
    progress: Progress
    metrics: Metrics  # the process's (`Context.metrics`)
    stop: threading.Event = field(default_factory=threading.Event)  # set by a worker's SIGTERM

    def safe_point(self, move_id: int) -> None:
        """Between steps, batches and catch-up rounds (never inside the freeze): honour a stop."""
        if self.stop.is_set():
            raise Interrupted(f"move {move_id}: stopped at a safe point; it resumes where it stood", move_id)

    @functools.cached_property
    def throttle(self) -> Throttle:
        """The run's throttle on its source and target (its sessions are closed when the run ends)."""
        return Throttle(
            self.catalog, (self.source, self.target), self.options.throttle.limits, self.progress, self.metrics
        )

    @functools.cached_property
    def replay(self) -> ReplaySessions:
        """The run's replay sessions, kept from one catch-up to the next (closed when the run ends)."""
        return ReplaySessions(self.source.dsn, self.target.dsn)

    def throttle_seconds(self) -> dict[str, float]:
        """Seconds the run waited for the stamps' replicas, slots and load, and for the standbys at the flip."""
        if "throttle" not in self.__dict__:  # never throttled: no session was opened
            return {}
        return {
            "throttled": round(self.throttle.throttled_s, 3),
            "standby_wait": round(self.throttle.standby_wait_s, 3),
        }

    def close(self) -> None:
        """Close the throttle's and the replay's sessions, if they opened any."""
        if "throttle" in self.__dict__:
            self.throttle.close()
        if "replay" in self.__dict__:
            self.replay.close()
