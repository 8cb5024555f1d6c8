"""What the routing catalog stores: stamps, routes, moves and their per-table progress.

Plain frozen dataclasses built from catalog rows (psycopg's `class_row`), and the one enum of move
phases with the sets of phases the rest of the code asks about.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from migrator.config import Limits as Limits  # re-exported: the catalog stores the fleet's limits
from migrator.db import dsn as dsnlib


class StampState(StrEnum):
    """`migrator stamp set-state`: draining stamps receive no tenants, retired ones hold none."""

    ACTIVE = "active"
    DRAINING = "draining"
    RETIRED = "retired"


class Mode(StrEnum):
    """How a move guards its source (`moves.mode`): online captures writes and fences only for the
    cutover; offline fences the source from before the copy until the flip."""

    ONLINE = "online"
    OFFLINE = "offline"


class Phase(StrEnum):
    """A move's phase as stored in `moves.phase`: the one truth that `move status` and resume read.

    In order: created, copying, copied, then online `synced` (caught up, untouched rows verified) and
    `cutover` (fenced), or offline `verified`; then flipped and cleaned; or aborted. A flipped move
    whose revert flipped is `reverted`. A revert starts at `synced`: its copy is the forward move's source.
    """

    CREATED = "created"
    COPYING = "copying"
    COPIED = "copied"
    SYNCED = "synced"
    CUTOVER = "cutover"
    VERIFIED = "verified"
    FLIPPED = "flipped"
    CLEANED = "cleaned"
    ABORTED = "aborted"
    REVERTED = "reverted"


class PlanStatus(StrEnum):
    """A plan's status (`plans.status`): running, then how its last run ended."""

    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    STOPPED = "stopped"  # interrupted or --stop-on-error before every entry started


class EntryStatus(StrEnum):
    """A plan entry's status, as `plan_moves.status` records it and each entry's result reports it."""

    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"  # in a result: done before this run, or not started (`ApplyResult.not_started`)


class StepResult(StrEnum):
    """A stamp's step of a schema rollout, as `schema_runs.result` records it."""

    WAITING = "waiting"  # a queued rollout's step held back until the wave before it ended and its gate passed
    QUEUED = "queued"  # a queued rollout's step no worker has taken yet
    RUNNING = "running"
    OK = "ok"
    FAILED = "failed"
    SKIPPED = "skipped"  # nothing to do, or not tried after a failure
    DRY_RUN = "dry-run"


# A rollout's step in one of these has not ended: a worker runs it, or will.
UNFINISHED_STEPS: frozenset[StepResult] = frozenset({StepResult.WAITING, StepResult.QUEUED, StepResult.RUNNING})
# ... and in one of these a worker may take it now (a `running` one again when its worker died).
CLAIMABLE_STEPS: frozenset[StepResult] = frozenset({StepResult.QUEUED, StepResult.RUNNING})

# A move in one of these is finished (see the index move_tenants_one_open).
TERMINAL: frozenset[Phase] = frozenset({Phase.FLIPPED, Phase.CLEANED, Phase.ABORTED, Phase.REVERTED})
# The route points at the target from here on: abort is refused, cleanup may run.
FLIPPED: frozenset[Phase] = frozenset({Phase.FLIPPED, Phase.CLEANED})
# An offline move fences its source from its guard to its flip; an online one only in its cutover.
FENCED_OFFLINE: frozenset[Phase] = frozenset({Phase.CREATED, Phase.COPYING, Phase.COPIED, Phase.VERIFIED})
# The flip's compare-and-set accepts a move only in these phases.
FLIPPABLE: frozenset[Phase] = frozenset({Phase.VERIFIED, Phase.CUTOVER})


Cohort = tuple[str, ...]
"""The tenants one move carries together, sharing its source and target: one tenant, or many."""


def name_tenants(tenants: Cohort, limit: int = 5) -> str:
    """How messages name a move's tenants: `tenant 7`, or `3 tenants (7, 8, 9)`."""
    if len(tenants) == 1:
        return f"tenant {tenants[0]}"
    shown = ", ".join(tenants[:limit]) + (", ..." if len(tenants) > limit else "")
    return f"{len(tenants)} tenants ({shown})"


def list_tenants(tenants: Cohort, limit: int = 5) -> str:
    """A cohort inside a message's parentheses: `tenant 7`, or `tenants 7, 8, 9, ...`."""
    if len(tenants) == 1:
        return f"tenant {tenants[0]}"
    return "tenants " + ", ".join(tenants[:limit]) + (", ..." if len(tenants) > limit else "")


@dataclass(frozen=True)
class Stamp:
    name: str
    dsn: str
    region: str | None
    capacity_rows: int | None
    capacity_bytes: int | None
    state: str
    key_block: int | None = None
    """Its block of sequence values (`migrator.stamps.sequences`); None until `keys stride`."""
    kind: str = "shared"
    """`shared` (many tenants) or `dedicated` (one tenant at most): `migrator stamp add|update --kind`."""

    @property
    def masked_dsn(self) -> str:
        return dsnlib.mask(self.dsn)


@dataclass(frozen=True)
class Route:
    tenant: str
    stamp: str
    version: int
    state: str
    updated_at: datetime


@dataclass(frozen=True)
class Move:
    """A move of a cohort (`tenants`, one or many, listed in `move_tenants`) from source to target.

    `tenant` is the cohort's first tenant, kept in `moves` for readers of the catalog from before
    cohorts; `route_versions` are the versions each route must still have when the move flips.
    """

    id: int
    tenant: str
    source: str
    target: str
    mode: Mode
    phase: Phase
    route_version: int
    schema_revision: str | None
    batch_rows: int
    rows_total: int
    rows_copied: int
    source_checksum: str | None
    target_checksum: str | None
    freeze_ms: float | None
    error: str | None
    operator: str
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    write_mode: str | None = None  # `WriteMode` of the target's writes, decided at the start
    write_mode_reason: str | None = None
    reverts: int | None = None  # a revert: the flipped move it takes back (whose capture log it replays)
    window_opened_at: datetime | None = None  # the flip opened a revert window (capture on the target)
    window_closed_at: datetime | None = None  # cleanup dropped that capture, or a revert used it
    tenants: Cohort = ()
    route_versions: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", Mode(self.mode))  # rows come from the catalog as text
        object.__setattr__(self, "phase", Phase(self.phase))
        object.__setattr__(self, "tenants", tuple(self.tenants))  # arrays come as lists
        object.__setattr__(self, "route_versions", tuple(self.route_versions))

    @property
    def who(self) -> str:
        """`tenant 7` or `50 tenants (7, 8, ...)`, for messages."""
        return name_tenants(self.tenants)

    @property
    def is_open(self) -> bool:
        return self.phase not in TERMINAL

    @property
    def capture_id(self) -> int:
        """The id under which the move's source logs the tenants' writes (`_migrator.changes`): its
        own; for a revert, the forward move's, whose window captured them on its target."""
        return self.id if self.reverts is None else self.reverts

    @property
    def window_open(self) -> bool:
        """The flip opened a revert window that no cleanup or revert has closed yet."""
        return self.phase == Phase.FLIPPED and self.window_opened_at is not None and self.window_closed_at is None


@dataclass(frozen=True)
class TableProgress:
    move_id: int
    table_name: str
    position: int
    rows_total: int
    rows_copied: int
    done: bool
    source_checksum: str | None
    target_checksum: str | None


# The columns of `moves` that `Catalog.update_move` may change.
MOVE_FIELDS = {
    "phase",
    "rows_total",
    "rows_copied",
    "source_checksum",
    "target_checksum",
    "freeze_ms",
    "error",
    "finished_at",
    "write_mode",
    "write_mode_reason",
}


def describe_move(move: Move) -> str:
    """How messages name a move, so an operator can find it in `migrator move status`."""
    return f"move {move.id} of {move.who} ({move.source} -> {move.target}, phase {move.phase})"
