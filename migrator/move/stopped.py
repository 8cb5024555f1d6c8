"""The line an interrupted command ends with: where it stopped, what it left in place, how to go on."""

from __future__ import annotations

from collections.abc import Sequence

from migrator import stamps
from migrator.catalog import Move
from migrator.context import Context
from migrator.interrupts import Stop, Stopped
from migrator.move import fence


def left_in_place(ctx: Context, move: Move) -> str:
    """What an unfinished move keeps on its source: the capture trigger, the fence (read from the stamp)."""
    with stamps.connect(ctx.catalog.stamp(move.source)) as conn:
        fenced, captured = fence.guards_of(conn, move.id)
    left = []
    if captured:
        left.append(f"the capture trigger on {move.source} (writes go on and are recorded)")
    if fenced:
        left.append(f"the fence on {move.source} (writes of {move.who} are refused)")
    else:
        left.append("no fence")
    return ", ".join(left)


def stopped_move(ctx: Context, move_id: int, stop: Stop) -> Stopped:
    """`Stopped` for move `move_id`, read back from the catalog and its source stamp after the stop."""
    move = ctx.catalog.move(move_id)
    return Stopped(
        f"move {move.id} of {move.who} ({move.source} -> {move.target}) stopped by {stop.name} at phase "
        f"{move.phase}; left in place: {left_in_place(ctx, move)}; resume: `migrator move --move {move.id}`, "
        f"abort: `migrator move abort {move.id}`",
        stop.exit_code,
    )


def stopped_apply(ctx: Context, path: str, move_ids: Sequence[int], not_started: int, stop: Stop) -> Stopped:
    """`Stopped` for `migrator apply`: the moves its stop left unfinished, each with what it keeps."""
    moves = [ctx.catalog.move(move_id) for move_id in move_ids]
    stopped = "; ".join(
        f"move {m.id} of {m.who} ({m.source} -> {m.target}) at phase {m.phase}: {left_in_place(ctx, m)}" for m in moves
    )
    aborts = ", ".join(f"`migrator move abort {m.id}`" for m in moves)
    return Stopped(
        f"apply {path} stopped by {stop.name}: {len(moves)} move(s) stopped at a safe point"
        + (f" ({stopped})" if moves else "")
        + f", {not_started} not started; resume: `migrator apply {path}`"
        + (f", abort a stopped move: {aborts}" if moves else ""),
        stop.exit_code,
    )
