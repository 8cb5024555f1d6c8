"""Structural drift across the fleet: stamps at the same revision whose structures differ.

`schema status` reads each stamp's fingerprint (`migrator.stamps.fingerprint`) in the session that
reads its revision, groups the stamps at each revision by fingerprint, and marks the stamps outside
the majority's group as drifted (`odd`). With no strict majority (two groups of two stamps) every
group of that revision is drifted: nothing says which one is right. `schema diff` shows the
differences of two stamps object by object, or, with `--fleet`, of each minority group against its
revision's majority (one stamp of each group read in full).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from migrator import stamps
from migrator.catalog import Stamp
from migrator.context import Context
from migrator.db.alembic import read_revision
from migrator.rollout.runner import StampSchema, schema_status
from migrator.stamps.fanout import PER_SERVER, each_stamp
from migrator.stamps.fingerprint import Difference, Fingerprint, compare, fingerprint, short_length


class Surveyed(Protocol):
    """A stamp as a survey read it (`StampSchema`, `stamp create`'s look at the fleet)."""

    @property
    def stamp(self) -> str: ...
    @property
    def current(self) -> str | None: ...  # its revision
    @property
    def fingerprint(self) -> str | None: ...  # its structure's digest, None where not read


@dataclass(frozen=True)
class Structure:
    """The stamps at one revision sharing one fingerprint."""

    revision: str | None
    digest: str
    stamps: tuple[str, ...]
    majority: bool  # the largest group of its revision, strictly: the others drift from it


@dataclass(frozen=True)
class FleetStatus:
    """`schema status`: every stamp's revision and fingerprint, the structures found at each revision,
    and how many hex digits tell the fingerprints apart (`short`)."""

    stamps: tuple[StampSchema, ...]
    structures: tuple[Structure, ...]
    short: int


def fleet_status(ctx: Context, active_only: bool = False, per_server: int = PER_SERVER) -> FleetStatus:
    """Every stamp's revision and fingerprint, read in one session per stamp with at most `per_server`
    sessions on one server at once; the stamps outside their revision's majority marked `odd`."""
    rows = schema_status(ctx, active_only, per_server, fingerprints=True)
    found = structures(rows)
    odd = {name for s in found if not s.majority for name in s.stamps}
    marked = tuple(replace(r, odd=True) if r.stamp in odd else r for r in rows)
    return FleetStatus(marked, tuple(found), short_length(s.digest for s in found))


def structures(rows: Sequence[Surveyed]) -> list[Structure]:
    """The stamps grouped by revision (in order of first appearance) and fingerprint (largest first);
    unreachable stamps, which have no fingerprint, are in no group."""
    groups: dict[str | None, dict[str, list[str]]] = {}
    for row in rows:
        if row.fingerprint is not None:
            groups.setdefault(row.current, {}).setdefault(row.fingerprint, []).append(row.stamp)
    found = []
    for revision, digests in groups.items():
        ranked = sorted(digests.items(), key=lambda item: (-len(item[1]), item[0]))
        sizes = [len(names) for _, names in ranked]
        leader = len(ranked) == 1 or sizes[0] > sizes[1]
        found += [
            Structure(revision, digest, tuple(names), leader and n == 0) for n, (digest, names) in enumerate(ranked)
        ]
    return found


@dataclass(frozen=True)
class StampDiff:
    """The differences between two stamps, `ours` first, with the revision each is at."""

    ours: str
    theirs: str
    our_revision: str | None
    their_revision: str | None
    differences: tuple[Difference, ...]

    def lines(self) -> list[str]:
        return [d.describe(self.ours, self.theirs) for d in self.differences]


def diff_stamps(ctx: Context, ours: str, theirs: str) -> StampDiff:
    """`migrator schema diff A B`: every object that differs between two stamps."""
    first, second = ctx.catalog.stamp(ours), ctx.catalog.stamp(theirs)
    (rev_a, fp_a), (rev_b, fp_b) = each_stamp([first, second], _read)
    return StampDiff(first.name, second.name, rev_a, rev_b, tuple(compare(fp_a, fp_b)))


@dataclass(frozen=True)
class GroupDiff:
    """A minority group of one revision against the group it drifts from (the majority's)."""

    revision: str | None
    majority: Structure
    minority: Structure
    diff: StampDiff  # between one stamp of each group


def diff_fleet(ctx: Context, active_only: bool = False, per_server: int = PER_SERVER) -> list[GroupDiff]:
    """`migrator schema diff --fleet`: each minority group against its revision's majority (without a
    strict majority, against the largest group, first by digest), one stamp of each read in full."""
    found = structures(schema_status(ctx, active_only, per_server, fingerprints=True))
    pairs = []
    for structure in found:
        same = [s for s in found if s.revision == structure.revision]
        if len(same) > 1 and structure is not same[0]:
            pairs.append((same[0], structure))
    chosen = {name: ctx.catalog.stamp(name) for a, b in pairs for name in (a.stamps[0], b.stamps[0])}
    read = dict(zip(chosen, each_stamp(list(chosen.values()), _read, per_server), strict=True))
    result = []
    for majority, minority in pairs:
        (rev_a, fp_a), (rev_b, fp_b) = read[majority.stamps[0]], read[minority.stamps[0]]
        diff = StampDiff(majority.stamps[0], minority.stamps[0], rev_a, rev_b, tuple(compare(fp_a, fp_b)))
        result.append(GroupDiff(majority.revision, majority, minority, diff))
    return result


def _read(stamp: Stamp) -> tuple[str | None, Fingerprint]:
    with stamps.connect(stamp) as conn:
        return read_revision(conn), fingerprint(conn)
