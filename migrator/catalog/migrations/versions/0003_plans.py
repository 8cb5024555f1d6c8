"""Plans applied by `migrator apply`: each plan file's moves and how far they got.

Revision ID: 0003_plans
Revises: 0002_schema_runs
Create Date: 2026-11-23
"""

from __future__ import annotations

from alembic import op

revision = "0003_plans"
down_revision = "0002_schema_runs"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE plans (
            id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            digest     text NOT NULL UNIQUE,
            path       text NOT NULL,
            kind       text NOT NULL,
            status     text NOT NULL DEFAULT 'running' CHECK (status IN ('running', 'done', 'failed', 'stopped')),
            created_at timestamptz NOT NULL DEFAULT now(),
            updated_at timestamptz NOT NULL DEFAULT now()
        );
        CREATE TABLE plan_moves (
            plan_id    bigint NOT NULL REFERENCES plans (id) ON DELETE CASCADE,
            position   integer NOT NULL,
            tenant     text NOT NULL,
            source     text NOT NULL,
            target     text NOT NULL,
            size_rows  bigint NOT NULL DEFAULT 0,
            size_bytes bigint NOT NULL DEFAULT 0,
            status     text NOT NULL DEFAULT 'pending'
                       CHECK (status IN ('pending', 'running', 'done', 'failed', 'skipped')),
            move_id    bigint REFERENCES moves (id),
            error      text,
            updated_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (plan_id, position)
        );
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE plan_moves; DROP TABLE plans;")
