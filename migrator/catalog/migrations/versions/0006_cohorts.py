"""A move carries a cohort: the tenants it moves together, with the route version each must still
have when the move flips (`move_tenants`). At most one unfinished move per tenant is now the unique
index over the open rows of `move_tenants`.

Revision ID: 0006_cohorts
Revises: 0005_move_write_mode
Create Date: 2026-12-03
"""

from __future__ import annotations

from alembic import op

revision = "0006_cohorts"
down_revision = "0005_move_write_mode"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE move_tenants (
            move_id       bigint NOT NULL REFERENCES moves (id) ON DELETE CASCADE,
            position      integer NOT NULL,
            tenant        text NOT NULL,
            route_version bigint NOT NULL,
            open          boolean NOT NULL DEFAULT true,
            PRIMARY KEY (move_id, tenant),
            UNIQUE (move_id, position)
        );
        -- At most one unfinished move per tenant: a constraint, not a convention.
        CREATE UNIQUE INDEX move_tenants_one_open ON move_tenants (tenant) WHERE open;
        INSERT INTO move_tenants (move_id, position, tenant, route_version, open)
            SELECT id, 0, tenant, route_version, phase NOT IN ('flipped', 'cleaned', 'aborted') FROM moves;
        DROP INDEX moves_one_open_per_tenant;
        """
    )


def downgrade() -> None:
    op.execute(
        """
        DO $$ BEGIN
            IF EXISTS (SELECT 1 FROM move_tenants WHERE position > 0) THEN
                RAISE EXCEPTION 'the catalog records cohort moves, which the previous revision cannot hold';
            END IF;
        END $$;
        DROP TABLE move_tenants;
        CREATE UNIQUE INDEX moves_one_open_per_tenant ON moves (tenant)
            WHERE phase NOT IN ('flipped', 'cleaned', 'aborted');
        """
    )
