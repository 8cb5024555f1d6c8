"""The route flips only by a compare-and-set on its version: two operators can never both win."""

from __future__ import annotations

import threading
from dataclasses import replace

import psycopg
import pytest
from conftest import Fleet, tenant_digest, tenant_row_count

from migrator.catalog import Mode, Move, Route
from migrator.db import dsn as dsnlib
from migrator.errors import RouteConflict
from migrator.move import MoveOptions, move_tenants
from migrator.progress import Silent


def _race(fleet: Fleet, moves: list[Move]) -> tuple[list[Route], list[RouteConflict]]:
    """Each operator flips on its own catalog session, released at the same instant."""
    start = threading.Barrier(len(moves))
    won: list[Route] = []
    lost: list[RouteConflict] = []

    def operator(move: Move) -> None:
        with dsnlib.connect(fleet.catalog.url, autocommit=True) as conn:
            start.wait()
            try:
                won.extend(fleet.catalog.flip(move, conn))
            except RouteConflict as exc:
                lost.append(exc)

    threads = [threading.Thread(target=operator, args=(m,)) for m in moves]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    return won, lost


def test_two_operators_flipping_the_same_route_version_exactly_one_wins(fleet: Fleet) -> None:
    fleet.seed("eu-1", 5, 50)
    for _ in range(10):
        route = fleet.catalog.route("5")
        targets = [s for s in ("eu-1", "eu-2", "us-1") if s != route.stamp]
        move = fleet.catalog.create_move([route], targets[0], Mode.OFFLINE, 100)
        move = fleet.catalog.update_move(move.id, phase="verified")
        # The second operator read the same route version and wants the tenant elsewhere.
        won, lost = _race(fleet, [move, replace(move, target=targets[1])])
        assert len(won) == 1 and len(lost) == 1, (won, lost)
        assert "changed under move" in str(lost[0])
        after = fleet.catalog.route("5")
        assert after.version == route.version + 1  # one flip, never two, never a skipped version
        assert after.stamp == won[0].stamp in targets


class _ChangesRouteBeforeFlip(Silent):
    """Another operator's change lands between this move's verify and its flip."""

    def __init__(self, catalog_url: str, tenant: str) -> None:
        self.catalog_url, self.tenant = catalog_url, tenant

    def phase(self, message: str) -> None:
        if message.startswith("flipping route"):
            with psycopg.connect(self.catalog_url, autocommit=True) as conn:
                conn.execute("UPDATE routes SET version = version + 1 WHERE tenant = %s", (self.tenant,))


def test_a_route_changed_under_a_move_is_not_flipped_and_the_move_can_be_aborted(fleet: Fleet) -> None:
    fleet.seed("eu-1", 6, 400)
    layout = fleet.layout()
    before = tenant_digest(fleet.dsn("eu-1"), layout, "6")
    version = fleet.catalog.route("6").version

    with pytest.raises(RouteConflict, match=r"route of tenant 6 changed under move \d+: expected eu-1 v1"):
        move_tenants(
            fleet.ctx, ("6",), "eu-2", MoveOptions(online=False), _ChangesRouteBeforeFlip(fleet.catalog.url, "6")
        )

    route = fleet.catalog.route("6")
    assert (route.stamp, route.version) == ("eu-1", version + 1)  # only the other operator's change
    move = fleet.catalog.open_move("6")
    assert move is not None and move.phase == "verified"
    result = fleet.run("move", "abort", str(move.id), "--yes")
    assert result.exit_code == 0, result.output
    assert tenant_digest(fleet.dsn("eu-1"), layout, "6") == before
    assert tenant_row_count(fleet.dsn("eu-2"), layout, "6") == 0
    with dsnlib.connect(fleet.dsn("eu-1"), autocommit=True) as conn:  # the source takes writes again
        conn.execute("UPDATE tenants SET name = 'still here' WHERE id = 6")


def test_a_rehearsed_flip_changes_nothing_and_finds_a_changed_route_before_the_freeze(fleet: Fleet) -> None:
    """The flip's statements run once before the freeze, rolled back, on the session that will flip (its
    first statements there cost the freeze several ms): routes, the move and the audit stay as they
    were, and a route changed meanwhile fails the rehearsal already; the flip itself still decides."""
    fleet.seed("eu-1", 8, 50)
    route = fleet.catalog.route("8")
    move = fleet.catalog.update_move(fleet.catalog.create_move([route], "eu-2", Mode.OFFLINE, 100).id, phase="verified")
    with dsnlib.connect(fleet.catalog.url, autocommit=True) as conn:
        audited = conn.execute("SELECT count(*), coalesce(max(id), 0) FROM audit").fetchone()
        fleet.catalog.rehearse_flip(move, conn)
        assert fleet.catalog.route("8") == route
        assert fleet.catalog.move(move.id).phase == "verified"
        assert conn.execute("SELECT count(*), coalesce(max(id), 0) FROM audit").fetchone() == audited
        flipped = fleet.catalog.flip(move, conn)  # the rehearsal's session flips for real
        assert [(r.stamp, r.version) for r in flipped] == [("eu-2", route.version + 1)]
        # The next audit id follows the last one: the rehearsal drew none (an append-only trail has no gaps).
        assert conn.execute("SELECT count(*), max(id) FROM audit").fetchone() == (audited[0] + 1, audited[1] + 1)

    back = fleet.catalog.update_move(
        fleet.catalog.create_move([fleet.catalog.route("8")], "eu-1", Mode.OFFLINE, 100).id, phase="verified"
    )
    with dsnlib.connect(fleet.catalog.url, autocommit=True) as other:
        other.execute("UPDATE routes SET version = version + 1 WHERE tenant = '8'")  # another operator's change
    with (
        dsnlib.connect(fleet.catalog.url, autocommit=True) as conn,
        pytest.raises(RouteConflict, match=r"route of tenant 8 changed under move \d+: expected eu-2"),
    ):
        fleet.catalog.rehearse_flip(back, conn)
    assert fleet.catalog.route("8").stamp == "eu-2" and fleet.catalog.move(back.id).phase == "verified"
