"""The revert window: a flipped move keeps capturing its tenants' writes on the target until cleanup,
so `migrator move revert` can take it back without a copy.

`window_opened_at` is set in the flip's own transaction when the move opened a window (the target's
guard captures from before the flip); `window_closed_at` when cleanup dropped that capture, or a
revert used it. A revert is a move of its own, from the forward move's target back to its source,
with `reverts` naming the forward move (whose capture log it replays); the forward move ends in
phase `reverted` when the revert flips.

Revision ID: 0011_revert_window
Revises: 0010_placement
Create Date: 2026-12-07
"""

from __future__ import annotations

from alembic import op

revision = "0011_revert_window"
down_revision = "0010_placement"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        ALTER TABLE moves
            ADD COLUMN reverts bigint REFERENCES moves (id),
            ADD COLUMN window_opened_at timestamptz,
            ADD COLUMN window_closed_at timestamptz;
        """
    )


def downgrade() -> None:
    op.execute(
        """
        DO $$ BEGIN
            IF EXISTS (SELECT 1 FROM moves WHERE reverts IS NOT NULL OR phase = 'reverted') THEN
                RAISE EXCEPTION 'the catalog records reverted moves, which the previous revision cannot hold';
            END IF;
        END $$;
        ALTER TABLE moves DROP COLUMN reverts, DROP COLUMN window_opened_at, DROP COLUMN window_closed_at;
        """
    )
