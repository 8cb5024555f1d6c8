"""The audit trail (`audit`): who changed which tenant's route, from where to where, and why.

Every route change (a move's flip, `route set`, `route import`), every policy override and every
plan apply adds one row, written in the transaction of the change itself, so a change is never
without its record. migrator's role may only read and append (docs/privileges.md); a trigger
refuses UPDATE, DELETE and TRUNCATE to everyone, the owner included.
"""

from __future__ import annotations

import getpass
import os
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, Protocol

import psycopg
from psycopg.rows import class_row


class Catalog(Protocol):
    """What the trail needs of the catalog (`store.Catalog` is one): its transactions and its actor.

    Declared here, below the store, because the store writes its own records through this module.
    """

    actor: str

    def transaction(self) -> AbstractContextManager[psycopg.Connection[Any]]: ...


class Action(StrEnum):
    """What an audit record says happened (`audit.action`)."""

    MOVE = "move"  # a move's routes flipped to its target
    REVERT = "revert"  # a revert's routes flipped back to the forward move's source
    ROUTE_SET = "route set"
    ROUTE_IMPORT = "route import"
    OVERRIDE = "policy override"  # a placement the policy forbids, allowed with --override-policy
    PLAN_APPLY = "plan apply"
    TENANT_SET = "tenant set"  # a tenant's residency, tier or anti-affinity changed


@dataclass(frozen=True)
class Event:
    """One thing to record; the regions are looked up from the stamps when it is written."""

    action: Action
    tenants: Sequence[str] = ()
    from_stamp: str | None = None
    to_stamp: str | None = None
    move_id: int | None = None
    reason: str | None = None


@dataclass(frozen=True)
class Record:
    """An audit row as `migrator audit` shows it."""

    id: int
    at: datetime
    actor: str
    db_role: str
    action: str
    tenants: list[str]
    from_stamp: str | None
    to_stamp: str | None
    from_region: str | None
    to_region: str | None
    move_id: int | None
    reason: str | None

    @property
    def cross_region(self) -> bool:
        return self.from_region is not None and self.to_region is not None and self.from_region != self.to_region


def default_actor() -> str:
    """Who runs migrator when `--actor` is not given: $USER, else the login name."""
    try:
        return os.environ.get("USER") or getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (a container's arbitrary uid)
        return "unknown"


def record(conn: psycopg.Connection[Any], actor: str, event: Event) -> None:
    """Append `event` in the caller's transaction (never a transaction of its own: see the module)."""
    conn.execute(
        "INSERT INTO audit (actor, action, tenants, from_stamp, to_stamp, from_region, to_region, move_id, reason)"
        " VALUES (%(actor)s, %(action)s, %(tenants)s, %(src)s, %(dst)s,"
        " (SELECT region FROM stamps WHERE name = %(src)s), (SELECT region FROM stamps WHERE name = %(dst)s),"
        " %(move)s, %(reason)s)",
        {"actor": actor, "action": event.action, "tenants": list(event.tenants), "src": event.from_stamp,
         "dst": event.to_stamp, "move": event.move_id, "reason": event.reason},
    )  # fmt: skip


def append(catalog: Catalog, event: Event) -> None:
    """Record an event that is a change of its own (a policy override, before its move starts)."""
    with catalog.transaction() as conn:
        record(conn, catalog.actor, event)


def trail(
    catalog: Catalog, tenant: str | None = None, since: datetime | None = None, cross_region: bool = False
) -> list[Record]:
    """`migrator audit`: the records, oldest first, of one tenant (--tenant), from a time on (--since),
    or only moves and reverts whose regions differ (--cross-region: which tenants' data left their region)."""
    with catalog.transaction() as conn, conn.cursor(row_factory=class_row(Record)) as cur:
        cur.execute(
            "SELECT id, at, actor, db_role, action, tenants, from_stamp, to_stamp, from_region, to_region, move_id,"
            " reason FROM audit WHERE (%(tenant)s::text IS NULL OR %(tenant)s = ANY(tenants))"
            " AND (%(since)s::timestamptz IS NULL OR at >= %(since)s)"
            " AND (NOT %(cross)s OR (action = ANY(%(moves)s) AND from_region IS DISTINCT FROM to_region))"
            " ORDER BY id",
            {"tenant": tenant, "since": since, "cross": cross_region, "moves": [Action.MOVE, Action.REVERT]},
        )
        return cur.fetchall()
