"""Moving tenants between stamps, one or a cohort per move, step by step: `preflight` (every check
before the first write,
with `shapes` for schema shapes and `migrator.stamps.checks` for triggers and row-level security),
`fence` (the guard trigger: capture and the database-enforced fence), `copy` (keyset batches over
binary COPY), `streams` (which tables and key ranges copy at once, --jobs), `keys` (rows by
captured key), `capture` (catch-up by key), `verify` (checksums), `integrity` (foreign keys the
target did not check), `cutover` (the short fenced flip), `tree` (self-referencing tables),
`cleanup`, `revert` (the revert window: a flipped move taken back), `run` (a move's options and
context), and `machine`, the resumable state machine that
runs them.

The entry points below are what the command line and the plans call.
"""

from migrator.move.cleanup import CleanupOptions, cleanup_move, cleanup_tenants, leftovers
from migrator.move.machine import MoveOutcome, abort_move, move_tenants, resume_move, revert_move
from migrator.move.run import CutoverOptions, MoveOptions
from migrator.move.verify import Report, verify_between

__all__ = [
    "CleanupOptions", "CutoverOptions", "MoveOptions", "MoveOutcome", "Report", "abort_move", "cleanup_move",
    "cleanup_tenants", "leftovers", "move_tenants", "resume_move", "revert_move", "verify_between",
]  # fmt: skip
