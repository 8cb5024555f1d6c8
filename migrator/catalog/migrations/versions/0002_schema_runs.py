"""Fleet schema rollouts: one row per stamp per run of `migrator schema upgrade/downgrade`.

Revision ID: 0002_schema_runs
Revises: 0001_routing_catalog
Create Date: 2026-11-23
"""

from __future__ import annotations

from alembic import op

revision = "0002_schema_runs"
down_revision = "0001_routing_catalog"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE schema_runs (
            id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            run_id        uuid NOT NULL,
            stamp         text NOT NULL,
            direction     text NOT NULL CHECK (direction IN ('upgrade', 'downgrade')),
            from_revision text,
            to_revision   text,
            result        text NOT NULL CHECK (result IN ('running', 'ok', 'failed', 'skipped', 'dry-run')),
            error         text,
            operator      text NOT NULL DEFAULT current_user,
            started_at    timestamptz NOT NULL DEFAULT now(),
            finished_at   timestamptz
        );
        CREATE INDEX schema_runs_by_run ON schema_runs (run_id);
        CREATE INDEX schema_runs_by_stamp ON schema_runs (stamp, started_at DESC);
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE schema_runs;")
