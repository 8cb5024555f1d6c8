"""The fleet's throttle limits (`migrator throttle set`): one row that running moves and workers
re-read every few seconds, so an operator can slow the whole fleet down without restarting anything.
A NULL limit is no limit; a move's own flags can only make a limit stricter.

Revision ID: 0009_throttle
Revises: 0008_key_blocks
Create Date: 2026-12-07
"""

from __future__ import annotations

from alembic import op

revision = "0009_throttle"
down_revision = "0008_key_blocks"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE throttle (
            id                  boolean PRIMARY KEY DEFAULT true CHECK (id),
            max_replica_lag_s   double precision CHECK (max_replica_lag_s > 0),
            max_slot_lag_bytes  bigint CHECK (max_slot_lag_bytes > 0),
            max_active_sessions integer CHECK (max_active_sessions > 0),
            critical_load       integer CHECK (critical_load > 0),
            updated_at          timestamptz NOT NULL DEFAULT now()
        )
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE throttle")
