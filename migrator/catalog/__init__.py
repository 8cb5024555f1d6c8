"""The routing catalog, the one shared piece: what it stores (`models`), access to it (`store`),
the tenant's move lock (`locks`), the records of plans (`plans`) and rollouts (`schema_runs`) and its own Alembic
migrations (`migrations/`, package data)."""

from migrator.catalog.locks import TenantLock
from migrator.catalog.models import (
    FENCED_OFFLINE,
    FLIPPED,
    TERMINAL,
    UNFINISHED_STEPS,
    Cohort,
    EntryStatus,
    Mode,
    Move,
    Phase,
    PlanStatus,
    Route,
    Stamp,
    StampState,
    StepResult,
    TableProgress,
    describe_move,
    list_tenants,
    name_tenants,
)
from migrator.catalog.store import Catalog

__all__ = [
    "FENCED_OFFLINE", "FLIPPED", "TERMINAL", "UNFINISHED_STEPS", "Catalog", "Cohort", "EntryStatus", "Mode", "Move",
    "Phase", "PlanStatus", "Route", "Stamp", "StampState", "StepResult", "TableProgress", "TenantLock",
    "describe_move", "list_tenants", "name_tenants",
]  # fmt: skip
