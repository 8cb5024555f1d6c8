"""Placement: where a tenant may live (`tenants`: residency, tier, anti-affinity labels), what a stamp
is for (`stamps.kind`), and `audit`, the append-only record of every route change, policy override
and plan apply. migrator's role is granted only SELECT, INSERT on `audit`; the trigger below also
stops its owner from editing or emptying it by accident (dropping the trigger is a deliberate act).

Revision ID: 0010_placement
Revises: 0009_throttle
Create Date: 2026-12-07
"""

from __future__ import annotations

from alembic import op

revision = "0010_placement"
down_revision = "0009_throttle"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        ALTER TABLE stamps ADD COLUMN kind text NOT NULL DEFAULT 'shared' CHECK (kind IN ('shared', 'dedicated'));
        CREATE TABLE tenants (
            tenant        text PRIMARY KEY,
            residency     text[] CHECK (cardinality(residency) > 0),  -- NULL: anywhere
            tier          text NOT NULL DEFAULT 'shared' CHECK (tier IN ('shared', 'dedicated')),
            anti_affinity text[] NOT NULL DEFAULT '{}',
            updated_at    timestamptz NOT NULL DEFAULT now()
        );
        CREATE TABLE audit (
            id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            at          timestamptz NOT NULL DEFAULT now(),
            actor       text NOT NULL,
            db_role     text NOT NULL DEFAULT current_user,
            action      text NOT NULL,
            tenants     text[] NOT NULL DEFAULT '{}',
            from_stamp  text,
            to_stamp    text,
            from_region text,
            to_region   text,
            move_id     bigint,
            reason      text
        );
        CREATE INDEX audit_tenants ON audit USING gin (tenants);
        CREATE INDEX audit_at ON audit (at);
        CREATE FUNCTION audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            RAISE EXCEPTION 'the audit trail is append-only: % refused', TG_OP
                USING ERRCODE = 'insufficient_privilege';
        END $$;
        CREATE TRIGGER audit_append_only BEFORE UPDATE OR DELETE ON audit
            FOR EACH ROW EXECUTE FUNCTION audit_append_only();
        CREATE TRIGGER audit_no_truncate BEFORE TRUNCATE ON audit
            FOR EACH STATEMENT EXECUTE FUNCTION audit_append_only();
        """
    )


def downgrade() -> None:
    op.execute(
        """
        DROP TABLE audit;
        DROP FUNCTION audit_append_only();
        DROP TABLE tenants;
        ALTER TABLE stamps DROP COLUMN kind;
        """
    )
