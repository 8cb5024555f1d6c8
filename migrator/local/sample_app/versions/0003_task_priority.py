"""Task priority: promote the legacy `meta.priority` key to a real `tasks.priority` column.

Old clients kept a priority number in `tasks.meta`; the rest is derived from labels (`p1` is
urgent, `bug` is high, everything else normal). Steps: add the column nullable (instant), backfill it
in keyset batches of the primary key so no single UPDATE touches the whole table, then set the
default and NOT NULL and a range check. A legacy value outside 1..4 fails the check on purpose:
the revision rolls back (transactional DDL) and the stamp stays at 0002 until the data is fixed,
instead of silently rewriting customers' priorities.

Revision ID: 0003_task_priority
Revises: 0002_collaboration
Create Date: 2026-11-30
"""

from __future__ import annotations

from alembic import op

revision = "0003_task_priority"
down_revision = "0002_collaboration"
branch_labels = None
depends_on = None

# 1 urgent, 2 high, 3 normal (the default), 4 low. migrator.seed applies the same rule to new rows.
DERIVED_PRIORITY = """
    CASE
        WHEN jsonb_typeof(t.meta -> 'priority') = 'number' THEN (t.meta ->> 'priority')::numeric::smallint
        WHEN t.labels @> ARRAY['p1'] THEN 1
        WHEN t.labels @> ARRAY['bug'] THEN 2
        ELSE 3
    END
"""

# One statement, so it also works in offline (`--sql`) mode; each loop turn updates one batch.
BACKFILL = f"""
DO $backfill$
DECLARE
    last_tenant bigint := -9223372036854775808;
    last_id     bigint := -9223372036854775808;
BEGIN
    LOOP
        WITH batch AS (
            SELECT tenant_id, id FROM tasks
            WHERE (tenant_id, id) > (last_tenant, last_id)
            ORDER BY tenant_id, id
            LIMIT 5000
        ), updated AS (
            UPDATE tasks t SET priority = {DERIVED_PRIORITY}
            FROM batch b
            WHERE t.tenant_id = b.tenant_id AND t.id = b.id
            RETURNING t.tenant_id, t.id
        )
        SELECT tenant_id, id INTO last_tenant, last_id FROM updated ORDER BY tenant_id DESC, id DESC LIMIT 1;
        EXIT WHEN NOT FOUND;
    END LOOP;
END
$backfill$
"""


def upgrade() -> None:
    op.execute("ALTER TABLE tasks ADD COLUMN priority smallint")
    op.execute(BACKFILL)
    op.execute("ALTER TABLE tasks ALTER COLUMN priority SET DEFAULT 3, ALTER COLUMN priority SET NOT NULL")
    op.execute("ALTER TABLE tasks ADD CONSTRAINT tasks_priority_range CHECK (priority BETWEEN 1 AND 4)")


def downgrade() -> None:
    op.execute("ALTER TABLE tasks DROP COLUMN priority")
