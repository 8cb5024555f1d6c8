"""Route changes are pushed: every insert, update or delete of a route notifies `migrator_routes`.

The payload is the route's JSON (tenant, stamp, version, state, op); PostgreSQL delivers it when
the changing transaction commits, so a listener (`migrator.router`, `migrator route watch`) learns
of a flip as soon as it is visible and never of one that rolled back. LISTEN needs no privilege:
the reader role of `migrator catalog grant-reader` is enough.

Revision ID: 0004_route_notify
Revises: 0003_plans
Create Date: 2026-12-02
"""

from __future__ import annotations

from alembic import op

revision = "0004_route_notify"
down_revision = "0003_plans"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE FUNCTION routes_notify() RETURNS trigger LANGUAGE plpgsql AS $$
        DECLARE
            r routes;
        BEGIN
            IF TG_OP = 'DELETE' THEN r := OLD; ELSE r := NEW; END IF;
            PERFORM pg_notify('migrator_routes', json_build_object(
                'tenant', r.tenant, 'stamp', r.stamp, 'version', r.version, 'state', r.state, 'op', lower(TG_OP)
            )::text);
            RETURN NULL;
        END
        $$;
        CREATE TRIGGER routes_notify AFTER INSERT OR UPDATE OR DELETE ON routes
            FOR EACH ROW EXECUTE FUNCTION routes_notify();
        """
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER routes_notify ON routes; DROP FUNCTION routes_notify();")
