"""Task checklists: items under a task, without a tenant_id column of their own (a path table).

An item reaches its tenant only through its task's key `(task_tenant, task_id)`, the shape of a
table added by an application that did not put the tenant key in every table; migrator finds its
rows through that foreign key. Items are keyed by uuid (unique on every stamp), follow their task
when its id changes (ON UPDATE CASCADE) and go with it (ON DELETE CASCADE).

Revision ID: 0006_task_checklists
Revises: 0005_task_watchers
Create Date: 2026-12-07
"""

from __future__ import annotations

from alembic import op

revision = "0006_task_checklists"
down_revision = "0005_task_watchers"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE task_checklist_items (
            id          uuid PRIMARY KEY,
            task_tenant bigint NOT NULL,
            task_id     bigint NOT NULL,
            position    integer NOT NULL,
            label       text NOT NULL,
            done        boolean NOT NULL DEFAULT false,
            FOREIGN KEY (task_tenant, task_id) REFERENCES tasks (tenant_id, id) ON DELETE CASCADE ON UPDATE CASCADE
        )
        """
    )
    op.execute("CREATE INDEX task_checklist_items_task ON task_checklist_items (task_tenant, task_id)")


def downgrade() -> None:
    op.execute("DROP TABLE task_checklist_items")
