"""Where a tenant may live: its placement attributes (`tenants`) and the rules every placement
decision checks (a move's preflight, the planners, `apply`).

The rules are one pure function, `violations`, so a move, a planner and an apply cannot disagree:
- residency: a tenant with a residency lives only on stamps of those regions;
- tier: a `dedicated` tenant lives only on a `dedicated` stamp;
- a dedicated stamp holds one tenant at most (whatever the newcomer's tier);
- anti-affinity: two tenants sharing an anti-affinity label never share a stamp.
Each violation is one line naming the tenant, the rule and the stamp.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

from psycopg.rows import class_row

from migrator.catalog import audit
from migrator.catalog.models import Stamp

if TYPE_CHECKING:
    from migrator.catalog.store import Catalog


class Tier(StrEnum):
    """A tenant's tier (`tenants.tier`) and a stamp's kind (`stamps.kind`) share these two words."""

    SHARED = "shared"
    DEDICATED = "dedicated"


class Rule(StrEnum):
    """The rules, as violations name them."""

    RESIDENCY = "residency"
    TIER = "tier"
    DEDICATED = "dedicated stamp"
    ANTI_AFFINITY = "anti-affinity"


@dataclass(frozen=True)
class Placement:
    """A tenant's placement attributes; a tenant without a `tenants` row may live anywhere, shared."""

    tenant: str
    residency: tuple[str, ...] | None = None  # None: any region
    tier: Tier = Tier.SHARED
    anti_affinity: tuple[str, ...] = ()

    def __post_init__(self) -> None:  # rows come from the catalog as lists and text
        object.__setattr__(self, "residency", None if self.residency is None else tuple(self.residency))
        object.__setattr__(self, "tier", Tier(self.tier))
        object.__setattr__(self, "anti_affinity", tuple(self.anti_affinity))


def violations(tenant: Placement, target: Stamp, on_target: Iterable[Placement]) -> list[str]:
    """Why `tenant` may not live on `target` beside `on_target` (the other tenants there, or arriving
    with it); empty when it may."""
    others = [p for p in on_target if p.tenant != tenant.tenant]
    where = f"tenant {tenant.tenant} -> stamp {target.name}"
    found = []
    if tenant.residency is not None and target.region not in tenant.residency:
        region = f"in region {target.region}" if target.region else "without a region"
        found.append(
            f"{where}: {Rule.RESIDENCY}: it may live in {'|'.join(tenant.residency)} only, {target.name} is {region}"
        )
    if tenant.tier == Tier.DEDICATED and target.kind != Tier.DEDICATED:
        found.append(
            f"{where}: {Rule.TIER}: a dedicated tenant needs a dedicated stamp, {target.name} is {target.kind}"
        )
    if target.kind == Tier.DEDICATED and others:
        found.append(f"{where}: {Rule.DEDICATED}: {target.name} is dedicated and holds tenant {others[0].tenant}")
    labels = set(tenant.anti_affinity)
    for other in others if labels else ():  # a tenant without labels conflicts with none
        shared = sorted(labels & set(other.anti_affinity))
        if shared:
            found.append(f"{where}: {Rule.ANTI_AFFINITY} {shared[0]}: {target.name} holds tenant {other.tenant}")
    return found


@dataclass
class Layout:
    """The fleet as placement sees it: stamps, every tenant's attributes and where each lives.

    Planners place tenants on a copy of it (`place`), so each decision sees the ones before it.
    """

    stamps: dict[str, Stamp]
    placements: dict[str, Placement]
    homes: dict[str, set[str]] = field(default_factory=dict)  # stamp -> tenants routed (or planned) there
    _plain: dict[str, Placement] = field(default_factory=dict, repr=False, compare=False)

    def of(self, tenant: str) -> Placement:
        """The tenant's attributes; those of a tenant without any are made once (a plan asks for every
        tenant of a target for each tenant it places: thousands of times)."""
        found = self.placements.get(tenant) or self._plain.get(tenant)
        if found is None:
            found = self._plain[tenant] = Placement(tenant)
        return found

    @functools.cached_property
    def _labelled(self) -> set[str]:
        """The tenants with anti-affinity labels (the attributes do not change while a plan is made)."""
        return {t for t, p in self.placements.items() if p.anti_affinity}

    def violations(self, tenants: Sequence[str], target: str) -> list[str]:
        """Why this cohort may not go to `target` together (each member beside the others).

        Of the tenants beside it, the rules read only the first other one (a dedicated stamp's) and
        those with anti-affinity labels, so only they are handed over, in order: a planner asks this
        of every tenant it places, with hundreds of tenants on each target."""
        names = sorted({*self.homes.get(target, set()), *tenants})
        beside = [self.of(o) for i, o in enumerate(names) if i < 2 or o in self._labelled]
        stamp = self.stamps[target]
        return [line for t in tenants for line in violations(self.of(t), stamp, beside)]

    def place(self, tenants: Sequence[str], source: str, target: str) -> None:
        self.homes.setdefault(source, set()).difference_update(tenants)
        self.homes.setdefault(target, set()).update(tenants)

    def residency_key(self, tenant: str) -> tuple[str, ...] | None:
        """What a cohort's members must share (a cohort never mixes residencies)."""
        residency = self.of(tenant).residency
        return None if residency is None else tuple(sorted(residency))


_PLACEMENT_SELECT = "SELECT tenant, residency, tier, anti_affinity FROM tenants"


def load_layout(catalog: Catalog) -> Layout:
    """The whole fleet's placement, read in one catalog transaction."""
    stamps = {s.name: s for s in catalog.stamps()}
    with catalog.transaction() as conn:
        with conn.cursor(row_factory=class_row(Placement)) as cur:
            cur.execute(_PLACEMENT_SELECT)
            placements = {p.tenant: p for p in cur.fetchall()}
        homes: dict[str, set[str]] = {}
        for tenant, stamp in conn.execute("SELECT tenant, stamp FROM routes"):
            homes.setdefault(stamp, set()).add(tenant)
    return Layout(stamps, placements, homes)


def check(catalog: Catalog, tenants: Sequence[str], target: str) -> list[str]:
    """The violations of moving this cohort to `target` now (a move's preflight)."""
    return load_layout(catalog).violations(tenants, target)


def placements(catalog: Catalog, tenants: Sequence[str] | None = None) -> dict[str, Placement]:
    """The attributes recorded for these tenants (all, without `tenants`); others have none."""
    with catalog.transaction() as conn, conn.cursor(row_factory=class_row(Placement)) as cur:
        cur.execute(
            _PLACEMENT_SELECT + " WHERE %(t)s::text[] IS NULL OR tenant = ANY(%(t)s)",
            {"t": None if tenants is None else list(tenants)},
        )
        return {p.tenant: p for p in cur.fetchall()}


@dataclass(frozen=True)
class Change:
    """`migrator tenant set`: what to change of a tenant's attributes (None: leave it as it is)."""

    residency: tuple[str, ...] | None = None
    anywhere: bool = False  # --residency any: clear the residency
    tier: Tier | None = None
    anti_affinity: tuple[str, ...] | None = None


def set_placement(catalog: Catalog, tenants: Sequence[str], change: Change) -> list[Placement]:
    """Record the change for each tenant (one transaction, with its audit record); returns them.

    A residency set here is not checked against where the tenant lives now: the next move or plan
    checks it, and `migrator tenant list` shows who is out of place."""
    with catalog.transaction() as conn:
        conn.execute(
            "INSERT INTO tenants AS t (tenant, residency, tier, anti_affinity)"
            " SELECT u, %(residency)s::text[], coalesce(%(tier)s, 'shared'), coalesce(%(labels)s::text[], '{}')"
            " FROM unnest(%(tenants)s::text[]) u"
            " ON CONFLICT (tenant) DO UPDATE SET"
            " residency = CASE WHEN %(anywhere)s THEN NULL ELSE coalesce(%(residency)s::text[], t.residency) END,"
            " tier = coalesce(%(tier)s, t.tier), anti_affinity = coalesce(%(labels)s::text[], t.anti_affinity),"
            " updated_at = now()",
            {"tenants": list(tenants), "residency": None if change.residency is None else list(change.residency),
             "anywhere": change.anywhere, "tier": change.tier,
             "labels": None if change.anti_affinity is None else list(change.anti_affinity)},
        )  # fmt: skip
        audit.record(conn, catalog.actor, audit.Event(audit.Action.TENANT_SET, tenants, reason=describe(change)))
    found = placements(catalog, tenants)
    return [found[t] for t in tenants]


def describe(change: Change) -> str:
    """A change as the audit trail words it."""
    parts = [
        *(["residency any"] if change.anywhere else []),
        *([f"residency {'|'.join(change.residency)}"] if change.residency is not None else []),
        *([f"tier {change.tier}"] if change.tier is not None else []),
        *([f"anti-affinity {','.join(change.anti_affinity) or '-'}"] if change.anti_affinity is not None else []),
    ]
    return ", ".join(parts)
