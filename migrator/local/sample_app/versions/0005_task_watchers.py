"""Task watchers: users who follow a task's updates (a new tenant table).

The primary key leads with (tenant_id, task_id), so it also serves the foreign key to tasks;
`user_id` gets its own index so deleting a user (or a tenant's users after a move) never scans the
table. Watchers go with their task (ON DELETE CASCADE).

Revision ID: 0005_task_watchers
Revises: 0004_comments_search_index
Create Date: 2026-11-30
"""

from __future__ import annotations

from alembic import op

revision = "0005_task_watchers"
down_revision = "0004_comments_search_index"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE task_watchers (
            tenant_id  bigint NOT NULL,
            task_id    bigint NOT NULL,
            user_id    uuid NOT NULL REFERENCES users,
            created_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (tenant_id, task_id, user_id),
            FOREIGN KEY (tenant_id, task_id) REFERENCES tasks ON DELETE CASCADE
        )
        """
    )
    op.execute("CREATE INDEX task_watchers_user_id ON task_watchers (user_id)")


def downgrade() -> None:
    op.execute("DROP TABLE task_watchers")
