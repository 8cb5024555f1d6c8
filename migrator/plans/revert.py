"""`migrator apply --revert PLAN`: take back every move of a plan that is still inside its revert window.

The plan's ledger in the catalog names each entry's move. Entries are reverted one at a time, the
last applied first (undoing a drain frees the stamps it filled in the reverse order); an entry whose
move has no open window (never opened, closed by cleanup, already reverted) is skipped with the
reason, and a revert that fails stops nothing else: each is a move of its own, resumable by running
this again or `migrator move revert ID`.
"""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from pathlib import Path

from migrator.catalog import EntryStatus, Phase
from migrator.catalog.plans import Ledger
from migrator.context import Context
from migrator.errors import BadInput, Interrupted, MigratorError
from migrator.move import MoveOptions, revert_move
from migrator.plans.apply import EntryResult, plan_digest
from migrator.progress import Progress


def revert_plan(
    ctx: Context, path: Path, options: MoveOptions, progress: Progress, stop: threading.Event | None = None
) -> list[EntryResult]:
    """Revert each flipped entry of the plan at `path` whose window is open; the results, in plan order."""
    stop = stop or threading.Event()
    ledger = Ledger(ctx.catalog)
    found = ledger.plan(plan_digest(path))
    if found is None:
        raise BadInput(f"plan {path} was never applied: nothing to revert")
    results = []
    for entry in reversed(ledger.entries(found[0])):
        tenants = tuple(entry.tenants)
        skipped = EntryResult(entry.position, tenants, entry.source, entry.target, EntryStatus.SKIPPED)
        if entry.move_id is None or entry.status != EntryStatus.DONE:
            results.append(replace(skipped, reason=f"not applied ({entry.status})"))
            continue
        forward = ctx.catalog.move(entry.move_id)
        pending = any(m.is_open for m in ctx.catalog.reverts_of(forward.id))
        if not (forward.window_open or pending):
            why = "already reverted" if forward.phase == Phase.REVERTED else "no open revert window"
            results.append(replace(skipped, reason=why, move_id=forward.id))
            continue
        if stop.is_set():
            results.append(replace(skipped, reason="stopped before it started"))
            continue
        started = time.monotonic()
        try:
            outcome = revert_move(ctx, forward.id, options, progress, stop)
        except Interrupted:  # Ctrl-C: the revert stopped at a safe point; the command says how to go on
            raise
        except MigratorError as exc:
            failed = EntryResult(entry.position, tenants, entry.target, entry.source, EntryStatus.FAILED, str(exc))
            results.append(failed)
            continue
        assert outcome.move is not None
        seconds = round(time.monotonic() - started, 3)
        results.append(
            EntryResult(
                entry.position, tenants, entry.target, entry.source, EntryStatus.DONE, f"reverted move {forward.id}",
                outcome.move.id, entry.rows, seconds,
            )
        )  # fmt: skip
    return sorted(results, key=lambda r: r.position)
