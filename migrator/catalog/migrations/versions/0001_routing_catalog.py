"""Routing catalog: stamps, tenant routes, moves and their per-table progress.

Revision ID: 0001_routing_catalog
Revises:
Create Date: 2026-11-23
"""

from __future__ import annotations

from alembic import op

revision = "0001_routing_catalog"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE stamps (
            name           text PRIMARY KEY,
            dsn            text NOT NULL,
            region         text,
            capacity_rows  bigint CHECK (capacity_rows > 0),
            capacity_bytes bigint CHECK (capacity_bytes > 0),
            state          text NOT NULL DEFAULT 'active' CHECK (state IN ('active', 'draining', 'retired')),
            created_at     timestamptz NOT NULL DEFAULT now()
        );
        CREATE TABLE routes (
            tenant     text PRIMARY KEY,
            stamp      text NOT NULL REFERENCES stamps (name),
            version    bigint NOT NULL DEFAULT 1,
            state      text NOT NULL DEFAULT 'active' CHECK (state IN ('active', 'fenced')),
            updated_at timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX routes_stamp ON routes (stamp);
        CREATE TABLE moves (
            id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            tenant          text NOT NULL,
            source          text NOT NULL REFERENCES stamps (name),
            target          text NOT NULL REFERENCES stamps (name),
            mode            text NOT NULL CHECK (mode IN ('offline', 'online')),
            phase           text NOT NULL,
            route_version   bigint NOT NULL,
            schema_revision text,
            batch_rows      integer NOT NULL CHECK (batch_rows > 0),
            rows_total      bigint NOT NULL DEFAULT 0,
            rows_copied     bigint NOT NULL DEFAULT 0,
            source_checksum text,
            target_checksum text,
            freeze_ms       double precision,
            error           text,
            operator        text NOT NULL DEFAULT current_user,
            created_at      timestamptz NOT NULL DEFAULT now(),
            updated_at      timestamptz NOT NULL DEFAULT now(),
            finished_at     timestamptz,
            CHECK (source <> target)
        );
        -- At most one unfinished move per tenant: a constraint, not a convention.
        CREATE UNIQUE INDEX moves_one_open_per_tenant ON moves (tenant)
            WHERE phase NOT IN ('flipped', 'cleaned', 'aborted');
        CREATE TABLE move_tables (
            move_id         bigint NOT NULL REFERENCES moves (id) ON DELETE CASCADE,
            table_name      text NOT NULL,
            position        integer NOT NULL,
            rows_total      bigint NOT NULL DEFAULT 0,
            rows_copied     bigint NOT NULL DEFAULT 0,
            done            boolean NOT NULL DEFAULT false,
            source_checksum text,
            target_checksum text,
            PRIMARY KEY (move_id, table_name)
        );
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE move_tables; DROP TABLE moves; DROP TABLE routes; DROP TABLE stamps;")
