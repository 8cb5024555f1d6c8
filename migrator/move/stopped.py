"""The line an interrupted move ends with: where it stopped, what it left in place, how to go on."""

from __future__ import annotations

from migrator import stamps
from migrator.context import Context
from migrator.interrupts import Stop, Stopped
from migrator.move import fence


def stopped_move(ctx: Context, move_id: int, stop: Stop) -> Stopped:
    """`Stopped` for move `move_id`, read back from the catalog and its source stamp after the stop."""
    move = ctx.catalog.move(move_id)
    with stamps.connect(ctx.catalog.stamp(move.source)) as conn:
        fenced, captured = fence.guards_of(conn, move.id)
    left = []
    if captured:
        left.append(f"the capture trigger on {move.source} (writes go on and are recorded)")
    if fenced:
        left.append(f"the fence on {move.source} (writes of {move.who} are refused)")
    else:
        left.append("no fence")
    return Stopped(
        f"move {move.id} of {move.who} ({move.source} -> {move.target}) stopped by {stop.name} at phase "
        f"{move.phase}; left in place: {', '.join(left)}; resume: `migrator move --move {move.id}`, "
        f"abort: `migrator move abort {move.id}`",
        stop.exit_code,
    )
