"""A move records how its target writes ran: `replica` (no triggers, no foreign-key checks; migrator
proves the foreign keys itself) or `checked` (the target's own checks), and why.

Revision ID: 0005_move_write_mode
Revises: 0004_route_notify
Create Date: 2026-12-02
"""

from __future__ import annotations

from alembic import op

revision = "0005_move_write_mode"
down_revision = "0004_route_notify"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE moves ADD COLUMN write_mode text, ADD COLUMN write_mode_reason text")


def downgrade() -> None:
    op.execute("ALTER TABLE moves DROP COLUMN write_mode, DROP COLUMN write_mode_reason")
