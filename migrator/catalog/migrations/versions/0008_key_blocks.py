"""Each stamp's block of sequence values (`migrator keys stride`): stamp N's bigint sequences hand
out ids from N * 2^48 on, so ids written on different stamps never collide. NULL: not strided yet.

Revision ID: 0008_key_blocks
Revises: 0007_job_queue
Create Date: 2026-12-07
"""

from __future__ import annotations

from alembic import op

revision = "0008_key_blocks"
down_revision = "0007_job_queue"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE stamps ADD COLUMN key_block integer UNIQUE CHECK (key_block >= 1)")


def downgrade() -> None:
    op.execute("ALTER TABLE stamps DROP COLUMN key_block")
