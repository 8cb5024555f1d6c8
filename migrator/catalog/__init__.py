"""The routing catalog, the one shared piece: what it stores (`models`), access to it (`store`),
the tenant's move lock (`locks`), the records of rollouts (`schema_runs`) and its own Alembic
migrations (`migrations/`, package data)."""

from migrator.catalog.locks import TenantLock
from migrator.catalog.models import (
    FENCED_OFFLINE,
    FLIPPED,
    TERMINAL,
    Cohort,
    Mode,
    Move,
    Phase,
    Route,
    Stamp,
    StampState,
    TableProgress,
    describe_move,
    name_tenants,
)
from migrator.catalog.store import Catalog

__all__ = [
    "FENCED_OFFLINE", "FLIPPED", "TERMINAL", "Catalog", "Cohort", "Mode", "Move", "Phase", "Route", "Stamp",
    "StampState", "TableProgress", "TenantLock", "describe_move", "name_tenants",
]  # fmt: skip
