"""The routing catalog, the one shared piece: what it stores (`models`), access to it (`store`),
the tenant's move lock (`locks`), the records of plans (`plans`) and rollouts (`schema_runs`), the
statements the application's router runs (`routes`) and its own Alembic migrations (`migrations/`,
package data).

The names below load on first use (PEP 562): `migrator.router` reads routes through `routes`
without paying for the store, the models and the retry policies it never uses.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from migrator.catalog.locks import TenantLock
    from migrator.catalog.models import (
        FENCED_OFFLINE,
        FLIPPED,
        TERMINAL,
        UNFINISHED_STEPS,
        Cohort,
        EntryStatus,
        Limits,
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

_MODELS = (
    "FENCED_OFFLINE",
    "FLIPPED",
    "TERMINAL",
    "UNFINISHED_STEPS",
    "Cohort",
    "EntryStatus",
    "Limits",
    "Mode",
    "Move",
    "Phase",
    "PlanStatus",
    "Route",
    "Stamp",
    "StampState",
    "StepResult",
    "TableProgress",
    "describe_move",
    "list_tenants",
    "name_tenants",
)
_HOMES = {"TenantLock": "locks", "Catalog": "store", **dict.fromkeys(_MODELS, "models")}


def __getattr__(name: str) -> Any:
    """A name of the catalog, imported from its module when first asked for."""
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value
    return value


__all__ = [
    "FENCED_OFFLINE", "FLIPPED", "TERMINAL", "UNFINISHED_STEPS", "Catalog", "Cohort", "EntryStatus", "Limits", "Mode",
    "Move", "Phase", "PlanStatus", "Route", "Stamp", "StampState", "StepResult", "TableProgress", "TenantLock",
    "describe_move", "list_tenants", "name_tenants",
]  # fmt: skip
