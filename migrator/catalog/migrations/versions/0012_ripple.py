"""Rollouts that ripple: each stamp's wave in `schema_runs`, and a `waiting` state for a queued
rollout's stamps held back until the wave before theirs has ended and its gate (--bake, --check)
passed.

Revision ID: 0012_ripple
Revises: 0011_revert_window
Create Date: 2026-12-07
"""

from __future__ import annotations

from alembic import op

revision = "0012_ripple"
down_revision = "0011_revert_window"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        "ALTER TABLE schema_runs ADD COLUMN wave integer, DROP CONSTRAINT schema_runs_result_check,"
        " ADD CONSTRAINT schema_runs_result_check"
        " CHECK (result IN ('waiting', 'queued', 'running', 'ok', 'failed', 'skipped', 'dry-run'))"
    )
    op.execute("CREATE INDEX schema_runs_by_wave ON schema_runs (run_id, wave)")


def downgrade() -> None:
    op.execute("DROP INDEX schema_runs_by_wave")
    op.execute(
        "UPDATE schema_runs SET result = 'skipped', error = 'not tried: the catalog was downgraded',"
        " finished_at = now() WHERE result = 'waiting';"
        " ALTER TABLE schema_runs DROP COLUMN wave, DROP CONSTRAINT schema_runs_result_check,"
        " ADD CONSTRAINT schema_runs_result_check"
        " CHECK (result IN ('queued', 'running', 'ok', 'failed', 'skipped', 'dry-run'))"
    )
