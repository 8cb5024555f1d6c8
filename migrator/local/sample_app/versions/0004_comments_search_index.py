"""Full-text search over comment bodies: a GIN index built without blocking writers.

`CREATE INDEX CONCURRENTLY` cannot run inside a transaction, so it runs in Alembic's autocommit
block. A concurrent build that fails (or is killed) leaves an INVALID index behind; since this
revision is not recorded until the build succeeds, any index of that name found here is such a
leftover, and it is dropped first so re-running the upgrade repairs it.

The downgrade drops the index with a plain, transactional `DROP INDEX`: dropping is a catalog-only
change (instant once its lock is granted), and staying transactional lets a downgrade run inside a
caller's transaction.

Revision ID: 0004_comments_search_index
Revises: 0003_task_priority
Create Date: 2026-11-30
"""

from __future__ import annotations

from alembic import op

revision = "0004_comments_search_index"
down_revision = "0003_task_priority"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.get_context().autocommit_block():
        op.execute("DROP INDEX CONCURRENTLY IF EXISTS comments_body_search")
        op.execute(
            "CREATE INDEX CONCURRENTLY comments_body_search ON comments"
            " USING gin (to_tsvector('simple'::regconfig, body))"
        )


def downgrade() -> None:
    op.execute("DROP INDEX IF EXISTS comments_body_search")
