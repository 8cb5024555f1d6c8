"""What each stamp holds against its capacity, and the stamp settings that bound it (capacity, state).

A stamp's usage is the sum of the sizes (see `migrator.stamps.sizes`) of the tenants *routed* to
it: leftovers of moved tenants awaiting cleanup and partial copies of running moves are not
counted. A capacity that is not set is unlimited. `StampUsage` is also the one reckoning of a
stamp's use after planned moves against its capacity, for the planners and for `apply`'s check.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, replace

from migrator import stamps
from migrator.catalog import Stamp, StampState
from migrator.context import Context
from migrator.db.alembic import read_revision
from migrator.errors import BadInput
from migrator.stamps.discovery import discover
from migrator.stamps.registry import check_connection
from migrator.stamps.sizes import TenantSize, measure


@dataclass(frozen=True)
class Overrun:
    """One unit in which a stamp would hold more than its capacity."""

    unit: str  # "rows" or "bytes"
    used: int
    capacity: int

    @property
    def short(self) -> int:
        return self.used - self.capacity


@dataclass(frozen=True)
class StampUsage:
    """What the tenants routed to a stamp hold, against its capacity (None: unlimited)."""

    stamp: Stamp
    rows: int
    bytes: int
    revision: str | None

    @property
    def free_rows(self) -> float:
        return math.inf if self.stamp.capacity_rows is None else self.stamp.capacity_rows - self.rows

    @property
    def free_bytes(self) -> float:
        return math.inf if self.stamp.capacity_bytes is None else self.stamp.capacity_bytes - self.bytes

    @property
    def utilisation(self) -> float | None:
        """Rows used / capacity_rows (None without a row capacity)."""
        return None if self.stamp.capacity_rows is None else self.rows / self.stamp.capacity_rows

    def shifted(self, rows: int, size: int) -> StampUsage:
        """The usage once a tenant of `rows` rows and `size` bytes has moved here (negative: away)."""
        return replace(self, rows=self.rows + rows, bytes=self.bytes + size)

    def overruns(self) -> list[Overrun]:
        """Each unit in which the usage exceeds the stamp's capacity; empty when it fits."""
        return [
            Overrun(unit, used, capacity)
            for unit, used, capacity in (
                ("rows", self.rows, self.stamp.capacity_rows),
                ("bytes", self.bytes, self.stamp.capacity_bytes),
            )
            if capacity is not None and used > capacity
        ]

    def fits(self, rows: int, size: int) -> bool:
        """Whether a tenant of `rows` rows and `size` bytes fits in what is left."""
        return not self.shifted(rows, size).overruns()


def shift(usage: dict[str, StampUsage], source: str, target: str, rows: int, size: int) -> None:
    """Account one tenant moving from `source` to `target` in a fleet's usage (in place)."""
    usage[source] = usage[source].shifted(-rows, -size)
    usage[target] = usage[target].shifted(rows, size)


@dataclass(frozen=True)
class FleetSizes:
    """Sizes measured on a set of stamps: every routed tenant's size and every stamp's usage."""

    tenants: dict[str, TenantSize]
    usage: dict[str, StampUsage]

    def routed_to(self, stamp: str) -> list[TenantSize]:
        return [t for t in self.tenants.values() if t.stamp == stamp]


def measure_fleet(ctx: Context, chosen: Iterable[Stamp]) -> FleetSizes:
    """Measure the given stamps; keeps only tenants routed to the stamp they were measured on."""
    routes = {r.tenant: r.stamp for r in ctx.catalog.routes()}
    tenants: dict[str, TenantSize] = {}
    usage: dict[str, StampUsage] = {}
    for stamp in chosen:
        with stamps.connect(stamp) as conn:
            revision = read_revision(conn)
            found = measure(conn, discover(conn, ctx.config.tenancy), stamp.name)
        routed = [t for t in found.values() if routes.get(t.tenant) == stamp.name]
        tenants.update({t.tenant: t for t in routed})
        usage[stamp.name] = StampUsage(stamp, sum(t.rows for t in routed), sum(t.bytes for t in routed), revision)
    return FleetSizes(tenants, usage)


# -- stamp settings (`migrator stamp set-state`, `migrator stamp update`) ------------------------------


def set_stamp_state(ctx: Context, name: str, state: str) -> Stamp:
    """Mark a stamp active, draining (receives no tenants) or retired (holds nothing and never will).

    Retiring is refused while a tenant is routed there or an unfinished move touches it; the check
    and the change happen in one catalog transaction holding the stamp's row lock.
    """
    if state not in set(StampState):
        raise BadInput(f"unknown stamp state {state!r} (expected one of {', '.join(StampState)})")
    return ctx.catalog.set_stamp_state(name, StampState(state))


def update_stamp(
    ctx: Context,
    name: str,
    capacity_rows: int | None,
    capacity_bytes: int | None,
    region: str | None,
    dsn: str | None = None,
    *,
    check: bool = True,
    kind: str | None = None,
) -> Stamp:
    """Change a stamp's capacity (flags --capacity-rows, --capacity-bytes), region, DSN or kind (--kind:
    shared, or dedicated to one tenant; placement checks it, see `migrator.catalog.policy`).

    A new DSN is first proven to connect, as for `stamp add` (unless `check` is off).
    """
    if capacity_rows is None and capacity_bytes is None and region is None and dsn is None and kind is None:
        raise BadInput("nothing to update: give --capacity-rows, --capacity-bytes, --region, --dsn or --kind")
    if dsn is not None and check:
        ctx.catalog.stamp(name)  # an unknown stamp is named before any connection is tried
        check_connection(name, dsn, "not changed")
    return ctx.catalog.update_stamp(
        name, capacity_rows=capacity_rows, capacity_bytes=capacity_bytes, region=region, dsn=dsn, kind=kind
    )
