"""The job queue of `migrator worker`: procrastinate's tables and functions, in the catalog's
database (the one shared piece: no broker, no other server); per plan entry the queue it was sent
to, its tenants and how many times a worker failed it; and a `queued` state for a rollout's stamps.

procrastinate's schema is applied from the installed library, whose version pyproject pins to one
minor release: a newer procrastinate comes with a catalog revision that runs its migration files.

Revision ID: 0007_job_queue
Revises: 0006_cohorts
Create Date: 2026-12-03
"""

from __future__ import annotations

from importlib import resources

from alembic import op

revision = "0007_job_queue"
down_revision = "0006_cohorts"
branch_labels = None
depends_on = None


def upgrade() -> None:
    schema = (resources.files("procrastinate.sql") / "schema.sql").read_text(encoding="utf-8")
    # Through the driver, without parameters: the schema's text is sent as it is (no bind markers).
    op.get_bind().connection.driver_connection.execute(schema)  # type: ignore[union-attr]
    op.execute(
        "ALTER TABLE plan_moves ADD COLUMN queue text, ADD COLUMN failures integer NOT NULL DEFAULT 0,"
        " ADD COLUMN tenants text[]"
    )
    # A queued rollout's stamps wait as `queued` until a worker runs them.
    op.execute(
        "ALTER TABLE schema_runs DROP CONSTRAINT schema_runs_result_check, ADD CONSTRAINT schema_runs_result_check"
        " CHECK (result IN ('queued', 'running', 'ok', 'failed', 'skipped', 'dry-run'))"
    )


def downgrade() -> None:
    op.execute(
        "DELETE FROM schema_runs WHERE result = 'queued'; ALTER TABLE schema_runs DROP CONSTRAINT"
        " schema_runs_result_check, ADD CONSTRAINT schema_runs_result_check"
        " CHECK (result IN ('running', 'ok', 'failed', 'skipped', 'dry-run'))"
    )
    op.execute("ALTER TABLE plan_moves DROP COLUMN queue, DROP COLUMN failures, DROP COLUMN tenants")
    op.get_bind().connection.driver_connection.execute(  # type: ignore[union-attr]
        """
        DROP TABLE procrastinate_events, procrastinate_periodic_defers, procrastinate_jobs, procrastinate_workers
            CASCADE;
        DO $$
        DECLARE f regprocedure;
        BEGIN
            FOR f IN SELECT oid::regprocedure FROM pg_proc
                     WHERE proname LIKE 'procrastinate%' AND pronamespace = current_schema()::regnamespace LOOP
                EXECUTE format('DROP FUNCTION %s CASCADE', f);
            END LOOP;
        END $$;
        DROP TYPE procrastinate_job_to_defer_v1, procrastinate_job_event_type, procrastinate_job_status CASCADE;
        """
    )
