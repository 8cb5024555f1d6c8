"""`fleet plan` / `fleet apply`: the declared stamps (`migrator.provision.declared`) reconciled with the catalog.

The plan lists, per stamp, what would be created, updated, set draining (or active again) or retired,
and what the catalog would refuse (retiring a stamp that holds tenants), in the catalog's own words.
A stamp in the catalog but not in the file is listed as such and left as it is: retiring is only ever
asked for explicitly (`state: retired`), so a file that forgot a stamp never takes it out of service.

Apply refuses the whole plan, nothing changed, when any change is refused or any new DSN does not
connect or any new stamp fails `stamp create`'s checks. Then it creates (through `stamp create`),
updates, and changes states, in that order. Run again, the plan is empty: "nothing to change".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import psycopg
from psycopg import conninfo

from migrator.catalog import Stamp, StampState
from migrator.context import Context
from migrator.db import dsn as dsnlib
from migrator.errors import BadInput, MigratorError
from migrator.provision import declared as declaredlib
from migrator.provision.create import NewStamp, create_stamp, prepare
from migrator.provision.declared import Declared
from migrator.stamps.registry import check_connection


class Action(StrEnum):
    """What the plan does to one stamp, in the order apply does it."""

    CREATE = "create"
    UPDATE = "update"
    DRAIN = "drain"
    ACTIVATE = "activate"
    RETIRE = "retire"


STATE_ACTIONS = {
    StampState.DRAINING: Action.DRAIN,
    StampState.ACTIVE: Action.ACTIVATE,
    StampState.RETIRED: Action.RETIRE,
}
ATTRIBUTES = ("region", "capacity_rows", "capacity_bytes", "kind")


@dataclass(frozen=True)
class Change:
    """One change of the plan; `details` are shown as they are (no secret in them), `refused` says why
    the catalog forbids it."""

    stamp: str
    action: Action
    details: tuple[str, ...] = ()
    refused: str | None = None


@dataclass(frozen=True)
class FleetPlan:
    """What `fleet apply FILE` would change; `not_in_file` are catalog stamps the file leaves as they are."""

    source: Path
    changes: tuple[Change, ...]
    not_in_file: tuple[str, ...]
    declared: dict[str, Declared] = field(repr=False, compare=False)  # resolved DSNs: never rendered

    @property
    def refused(self) -> list[Change]:
        return [c for c in self.changes if c.refused]


@dataclass(frozen=True)
class Applied:
    """What `fleet apply` changed, in order."""

    plan: FleetPlan
    done: tuple[Change, ...]


def plan(ctx: Context, path: Path) -> FleetPlan:
    """`migrator fleet plan FILE`: the file against the catalog; reads the catalog only."""
    stamps = declaredlib.read(path)
    catalog = {s.name: s for s in ctx.catalog.stamps()}
    creates, updates, states = [], [], []
    for wanted in stamps:
        known = catalog.get(wanted.name)
        if known is None:
            if wanted.state != StampState.RETIRED:  # declared retired and never created: nothing to do
                creates.append(_create(wanted))
            continue
        details = _differences(known, wanted)
        if details:
            updates.append(Change(known.name, Action.UPDATE, details))
        if wanted.state is not None and wanted.state != known.state:
            refused = ctx.catalog.retire_refusal(known.name) if wanted.state == StampState.RETIRED else None
            states.append(
                Change(known.name, STATE_ACTIONS[wanted.state], (f"{known.state} -> {wanted.state}",), refused)
            )
    named = {s.name for s in stamps}
    not_in_file = tuple(name for name in catalog if name not in named)
    return FleetPlan(path, (*creates, *updates, *states), not_in_file, {s.name: s for s in stamps})


def apply(ctx: Context, path: Path) -> Applied:
    """`migrator fleet apply FILE`: the plan, checked whole before any change, then carried out.

    A change that fails once others are done stops the apply naming it and what was done before;
    running it again carries on from there (what is done no longer differs).
    """
    fleet_plan = plan(ctx, path)
    _check(ctx, fleet_plan)
    done: list[Change] = []
    for change in fleet_plan.changes:
        try:
            _carry_out(ctx, fleet_plan.declared[change.stamp], change)
        except MigratorError as exc:
            before = "; ".join(f"{c.action} {c.stamp}" for c in done) or "nothing"
            stopped = f"fleet apply stopped at {change.action} {change.stamp}: {exc}; done before it: {before}"
            raise (BadInput if isinstance(exc, BadInput) else MigratorError)(stopped) from None
        done.append(change)
    return Applied(fleet_plan, tuple(done))


def _check(ctx: Context, fleet_plan: FleetPlan) -> None:
    """Everything apply can check before changing anything: refusals, new DSNs, new stamps' databases."""
    if fleet_plan.refused:
        listed = "; ".join(f"{c.action} {c.stamp}: {c.refused}" for c in fleet_plan.refused)
        raise BadInput(f"fleet apply refused, nothing changed: {listed}")
    for change in fleet_plan.changes:
        wanted = fleet_plan.declared[change.stamp]
        if change.action == Action.CREATE:
            prepare(ctx, _new_stamp(wanted))
        elif change.action == Action.UPDATE and wanted.dsn is not None and _changes_dsn(change):
            check_connection(wanted.name, wanted.dsn, "nothing changed")


def _carry_out(ctx: Context, wanted: Declared, change: Change) -> None:
    if change.action == Action.CREATE:
        create_stamp(ctx, _new_stamp(wanted))
    elif change.action == Action.UPDATE:
        ctx.catalog.update_stamp(
            wanted.name,
            dsn=wanted.dsn if _changes_dsn(change) else None,
            region=wanted.region,
            capacity_rows=wanted.capacity_rows,
            capacity_bytes=wanted.capacity_bytes,
            kind=wanted.kind,
        )
    else:
        assert wanted.state is not None
        ctx.catalog.set_stamp_state(wanted.name, wanted.state)


def _changes_dsn(change: Change) -> bool:
    return any(detail.startswith("dsn ") for detail in change.details)


def _create(wanted: Declared) -> Change:
    """A stamp to create, with the attributes it gets; refused without a DSN to create it on."""
    details = [
        f"region {wanted.region or '-'}",
        f"capacity {f'{wanted.capacity_rows:,} rows' if wanted.capacity_rows else 'unlimited'}",
        wanted.kind or "shared",
        str(wanted.state or StampState.ACTIVE),
        f"dsn {wanted.shown_dsn}" if wanted.written else "no dsn",
        *(["adopting its database"] if wanted.adopt else []),
    ]
    refused = None if wanted.dsn else "not in the catalog, and the file gives no `dsn` or `service` to create it on"
    return Change(wanted.name, Action.CREATE, tuple(details), refused)


def _new_stamp(wanted: Declared) -> NewStamp:
    assert wanted.dsn is not None  # a create without one is refused in the plan
    return NewStamp(
        wanted.name,
        wanted.dsn,
        wanted.region,
        wanted.capacity_rows,
        wanted.capacity_bytes,
        wanted.state or StampState.ACTIVE,
        wanted.kind or "shared",
        wanted.adopt,
    )


def _differences(known: Stamp, wanted: Declared) -> tuple[str, ...]:
    """`key old -> new` for each attribute the file manages (gives) that the catalog has otherwise."""
    found = [
        f"{key} {getattr(known, key) or '-'} -> {getattr(wanted, key)}"
        for key in ATTRIBUTES
        if getattr(wanted, key) is not None and getattr(wanted, key) != getattr(known, key)
    ]
    if wanted.dsn is not None and not same_database_dsn(known.dsn, wanted.dsn):
        found.append(f"dsn {known.masked_dsn} -> {wanted.shown_dsn}")
    return tuple(found)


def same_database_dsn(a: str, b: str) -> bool:
    """Two DSNs that say the same thing, whatever their form (URL or keywords, order of keywords)."""
    try:
        return conninfo.conninfo_to_dict(dsnlib.normalize(a)) == conninfo.conninfo_to_dict(dsnlib.normalize(b))
    except psycopg.Error:
        return a.strip() == b.strip()
