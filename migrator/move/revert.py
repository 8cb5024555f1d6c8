"""The revert window: a flipped move taken back in seconds, without a copy.

From its flip until cleanup, a move's target captures its tenants' writes (the guard of `fence`,
the forward move's id in `_migrator.changes` there), while the source keeps its copy, fenced and
exactly as the flip proved it. A revert is then a move of its own from the target back to the
source that starts where an online move stands after its copy (`synced`): it replays the window's
log onto the source while the application writes on, then runs the same freeze as any cutover
(fence the target, drain, prove every captured key, compare-and-set the routes back) and lifts the
source's fence. Keys never written since the flip were proven equal by the forward flip and are
untouched on both sides since, so nothing of the tenant is read in full.

Here: what a revert is refused for (before anything is changed), what finishes one after its flip,
and what closes a window (cleanup).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg

from migrator import stamps
from migrator.catalog import Catalog, Cohort, Move, Phase, Route, describe_move
from migrator.db import dsn as dsnlib
from migrator.db.alembic import read_revision
from migrator.db.dsn import WriteMode
from migrator.errors import BadInput, PreflightError
from migrator.move import fence
from migrator.stamps.discovery import Layout


@dataclass(frozen=True)
class Revertible:
    """A forward move whose revert may start: the routes to flip back, the stamps' revision, and how
    the revert's writes will run on the forward move's source."""

    routes: list[Route]
    revision: str | None
    write_mode: tuple[WriteMode, str]


def check_revert(catalog: Catalog, forward: Move) -> Revertible:
    """Refuse, naming why, a revert that cannot be exact: no window (never opened, or closed by
    cleanup), the routes moved on since the flip (another move, `route set`), the stamps at different
    schema revisions, or the window's capture missing on the target."""
    if forward.reverts is not None:
        raise BadInput(
            f"move {forward.id} is itself a revert (of move {forward.reverts}): it opened no revert window; "
            f"move the tenants with `migrator move`"
        )
    if forward.phase not in (Phase.FLIPPED, Phase.CLEANED):
        hint = "abort it with `migrator move abort`" if forward.is_open else "nothing to take back"
        raise BadInput(f"{describe_move(forward)} is not a flipped move; {hint}")
    if forward.window_opened_at is None:
        raise BadInput(
            f"move {forward.id} flipped without a revert window (--no-revert-window); move the tenants back "
            "with `migrator move`"
        )
    if forward.window_closed_at is not None or forward.phase == Phase.CLEANED:
        closed = forward.window_closed_at or forward.updated_at
        raise BadInput(
            f"the revert window of move {forward.id} closed at {closed:%Y-%m-%d %H:%M:%S %Z} (cleanup removed "
            f"the copy on {forward.source}); move the tenants back with `migrator move`"
        )
    routes = catalog.routes_of(forward.tenants)
    for route, version in zip(routes, forward.route_versions, strict=True):
        if route.stamp != forward.target or route.version != version + 1:
            raise BadInput(
                f"the route of tenant {route.tenant} moved on since move {forward.id} flipped it (now {route.stamp} "
                f"v{route.version}, the flip left {forward.target} v{version + 1}); not reverted"
            )
    live, old = catalog.stamp(forward.target), catalog.stamp(forward.source)
    with stamps.connect(live) as tgt, stamps.connect(old) as src:
        revisions = read_revision(tgt), read_revision(src)
        if revisions[0] != revisions[1]:
            raise BadInput(
                f"schema revisions differ: {live.name} is at {revisions[0]}, {old.name} at {revisions[1]}; the "
                f"revert of move {forward.id} replays rows by key and needs both at one revision "
                "(`migrator schema upgrade`)"
            )
        missing = set(forward.tenants) - fence.capturing(tgt, forward.id)
        if missing:
            raise PreflightError(
                f"the revert window of move {forward.id} does not capture tenant(s) {', '.join(sorted(missing))} on "
                f"{live.name} (its guard was removed by hand?): writes since the flip may be missing from the "
                "log; move the tenants back with `migrator move` after `migrator cleanup`"
            )
        write_mode = dsnlib.write_mode(src)
    return Revertible(routes, revisions[0], write_mode)


def lift(src: psycopg.Connection[Any], tgt: psycopg.Connection[Any], layout: Layout, tenants: Cohort) -> None:
    """After a revert flipped: its source (the forward move's target) keeps its fence and stops
    capturing, and the tenants' guard on its target (the forward move's source) goes, so they write
    there again. Run in the freeze's own sessions as the flip commits, and by `finish`. Idempotent."""
    with src.transaction():
        fence.stop_capture(src, tenants)
    fence.unguard(tgt, layout, tenants)


def finish(catalog: Catalog, revert: Move, layout: Layout) -> None:
    """`lift` again, in sessions of its own, for `move revert` when a crash came between a revert's
    flip and its lift."""
    with (
        stamps.connect(catalog.stamp(revert.source), autocommit=False) as src,
        stamps.connect(catalog.stamp(revert.target), autocommit=False) as tgt,
    ):
        lift(src, tgt, layout, revert.tenants)


def close_windows(catalog: Catalog, stamp_name: str, tenants: tuple[str, ...], layout: Layout) -> list[int]:
    """Cleanup of the tenants' leftovers on `stamp_name`: first drop the target's capture of them in the
    revert windows of the flipped moves away from it; a window is recorded closed once none of its
    tenants is captured any more (cleanup of part of a cohort leaves the rest's). Returns those closed."""
    closed = []
    for move in catalog.open_windows(tenants):
        if move.source != stamp_name:
            continue
        with stamps.connect(catalog.stamp(move.target), autocommit=False) as tgt:
            fence.unguard(tgt, layout, tuple(t for t in move.tenants if t in tenants))
            rest = fence.capturing(tgt, move.id)
        if not rest:
            catalog.close_window(move.id)
            closed.append(move.id)
    return closed
