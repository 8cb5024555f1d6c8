"""Which privileges the connected role lacks on a stamp for moves to and from it (`migrator stamp check`).

A stamp is a move's source one day and its target the next, so one set is checked for both roles:
- on the database: CONNECT (implied by being connected), CREATE (the `_migrator` schema) and
  TEMPORARY (key and staging tables of preflight, catch-up and verify);
- USAGE on the tenant schema;
- on every tenant table, the privileges of its owner: PostgreSQL lets only the owner (or a member
  of the owning role) drop a trigger, and the fence trigger is dropped at cleanup and abort; plus
  SELECT, INSERT, UPDATE, DELETE and TRIGGER, which the owner normally has;
- SELECT and UPDATE on the tables' sequences (`setval` after the copy);
- SELECT on `alembic_version` (both stamps must be at the same revision);
- the privileges of the owner of `_migrator` and of everything in it, when a previous run (maybe by
  another role) left it there;
- SET on `session_replication_role` (PostgreSQL 15+), only where tenant tables have application
  triggers that would fire for migrator's writes: with it those writes run as replica and the
  triggers stay quiet; without it moves are refused (or forced with --allow-triggers). Where no such
  trigger exists it is not needed and not listed;
- BYPASSRLS, only where row-level security on a tenant table applies to the role (forced on the
  owner, or the role is not a member of the owner): it would otherwise read fewer rows;
- pg_monitor, only where the stamp has standbys: the cutover waits for their replay, which only a
  role with pg_read_all_stats can see (and so do the throttle's lag and load limits).
Each missing privilege becomes one `Missing` naming the object and the statement that grants it;
the statements are composed with `psycopg.sql`, so they are quoted exactly as they must be run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from migrator.config import Tenancy
from migrator.db import dsn as dsnlib
from migrator.stamps import checks
from migrator.stamps.access import SCHEMA
from migrator.stamps.discovery import Layout, discover

TABLE_PRIVILEGES = ("SELECT", "INSERT", "UPDATE", "DELETE", "TRIGGER")
SEQUENCE_PRIVILEGES = ("SELECT", "UPDATE")
DATABASE_PRIVILEGES = ("CREATE", "TEMPORARY")


@dataclass(frozen=True)
class Missing:
    """One privilege the role lacks: on what, what for, and the statement an administrator runs."""

    object: str
    privilege: str
    grant: str
    owner: str | None = None  # set when the fix is membership of this owning role

    def line(self) -> str:
        return f"{self.object}: missing {self.privilege} -> {self.grant}"


@dataclass(frozen=True)
class Check:
    """The outcome of checking one role on one stamp's database."""

    role: str
    database: str
    missing: list[Missing]

    @property
    def ok(self) -> bool:
        return not self.missing


def check_stamp(conn: psycopg.Connection[Any], tenancy: Tenancy) -> Check:
    """Check the connected role (read-only: only catalog lookups and has_*_privilege calls)."""
    role, database = _one(conn, "SELECT current_user::text, current_database()::text")
    layout = discover(conn, tenancy)
    missing = [
        *_database(conn, role, database),
        *(missing for schema in tenancy.searched for missing in _schema(conn, role, schema)),
        *(tables := _tables(conn, role, layout)),
        *_sequences(conn, role, layout, owners := {m.owner for m in tables if m.owner}),
        *_alembic_version(conn, role, tenancy.db_schema, owners),
        *_migrator_schema(conn, role),
        *_replication_role(conn, layout),
        *_row_security(conn, role, layout),
        *_monitoring(conn, role),
    ]
    return Check(role, database, missing)


def _one(conn: psycopg.Connection[Any], query: str, params: tuple[Any, ...] = ()) -> tuple[Any, ...]:
    row = conn.execute(query, params).fetchone()
    assert row is not None
    return tuple(row)


def _text(conn: psycopg.Connection[Any], statement: sql.Composable) -> str:
    return f"{statement.as_string(conn)};"


def _privileges(names: list[str]) -> sql.Composable:
    return sql.SQL(", ").join(sql.SQL(name) for name in names)  # keywords from the constants above only


def _database(conn: psycopg.Connection[Any], role: str, database: str) -> list[Missing]:
    lacking = [
        p for p in DATABASE_PRIVILEGES if not _one(conn, "SELECT has_database_privilege(%s, %s)", (database, p))[0]
    ]
    if not lacking:
        return []
    grant = sql.SQL("GRANT {} ON DATABASE {} TO {}").format(
        _privileges(lacking), sql.Identifier(database), sql.Identifier(role)
    )
    return [Missing(f"database {database}", ", ".join(lacking), _text(conn, grant))]


def _schema(conn: psycopg.Connection[Any], role: str, schema: str) -> list[Missing]:
    row = conn.execute(
        "SELECT has_schema_privilege(n.oid, 'USAGE') FROM pg_namespace n WHERE n.nspname = %s", (schema,)
    ).fetchone()
    if row is None or row[0]:
        return []
    grant = sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(sql.Identifier(schema), sql.Identifier(role))
    return [Missing(f"schema {schema}", "USAGE", _text(conn, grant))]


def _owner_grant(conn: psycopg.Connection[Any], role: str, owner: str, owner_is_superuser: bool) -> str:
    """Membership in the owning role; a superuser owner must first hand the objects to a plain role."""
    if owner_is_superuser:
        return (
            f"the owner {owner} is a superuser: make a non-superuser application role own the tables "
            "(ALTER TABLE ... OWNER TO app_owner), then "
            + _text(conn, sql.SQL("GRANT {} TO {}").format(sql.Identifier("app_owner"), sql.Identifier(role)))
        )
    return _text(conn, sql.SQL("GRANT {} TO {}").format(sql.Identifier(owner), sql.Identifier(role)))


def _tables(conn: psycopg.Connection[Any], role: str, layout: Layout) -> list[Missing]:
    missing = []
    for table in layout.tables:
        qualified = sql.Identifier(table.schema, table.name).as_string(conn)
        owner, owner_super, is_owner, *granted = _one(
            conn,
            "SELECT r.rolname::text, r.rolsuper, pg_has_role(c.relowner, 'USAGE'),"
            + ", ".join("has_table_privilege(c.oid, %s)" for _ in TABLE_PRIVILEGES)
            + " FROM pg_class c JOIN pg_roles r ON r.oid = c.relowner WHERE c.oid = %s::regclass",
            (*TABLE_PRIVILEGES, qualified),
        )
        if not is_owner:
            missing.append(
                Missing(
                    f"table {table.label}",
                    f"the privileges of its owner {owner} (only the owner may drop the fence trigger)",
                    _owner_grant(conn, role, owner, owner_super),
                    owner,
                )
            )
            continue  # the membership grants the table privileges too: one statement, not two
        lacking = [p for p, ok in zip(TABLE_PRIVILEGES, granted, strict=True) if not ok]
        if lacking:  # a member of the owner, but the owner revoked some of its own privileges
            grant = sql.SQL("GRANT {} ON TABLE {} TO {}").format(
                _privileges(lacking), sql.Identifier(table.schema, table.name), sql.Identifier(role)
            )
            missing.append(Missing(f"table {table.label}", ", ".join(lacking), _text(conn, grant)))
    return missing


def _sequences(conn: psycopg.Connection[Any], role: str, layout: Layout, table_owners: set[str]) -> list[Missing]:
    missing = []
    for sequence in sorted({c.sequence for t in layout.tables for c in t.columns if c.sequence}):
        schema, name, is_owner, owner = _one(
            conn,
            "SELECT n.nspname::text, c.relname::text, pg_has_role(c.relowner, 'USAGE'), r.rolname::text"
            " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace JOIN pg_roles r ON r.oid = c.relowner"
            " WHERE c.oid = %s::regclass",
            (sequence,),
        )
        if not is_owner and owner in table_owners:
            continue  # reported with its table: membership of that owner covers the sequence
        lacking = [
            p for p in SEQUENCE_PRIVILEGES if not _one(conn, "SELECT has_sequence_privilege(%s, %s)", (sequence, p))[0]
        ]
        if lacking:
            grant = sql.SQL("GRANT {} ON SEQUENCE {} TO {}").format(
                _privileges(lacking), sql.Identifier(schema, name), sql.Identifier(role)
            )
            missing.append(Missing(f"sequence {schema}.{name}", ", ".join(lacking), _text(conn, grant)))
    return missing


def _alembic_version(conn: psycopg.Connection[Any], role: str, schema: str, table_owners: set[str]) -> list[Missing]:
    row = conn.execute(
        "SELECT has_table_privilege(c.oid, 'SELECT'), r.rolname::text FROM pg_class c"
        " JOIN pg_namespace n ON n.oid = c.relnamespace JOIN pg_roles r ON r.oid = c.relowner"
        " WHERE n.nspname = %s AND c.relname = 'alembic_version'",
        (schema,),
    ).fetchone()
    if row is None or row[0] or row[1] in table_owners:  # membership of the tables' owner covers it
        return []
    grant = sql.SQL("GRANT SELECT ON TABLE {} TO {}").format(
        sql.Identifier(schema, "alembic_version"), sql.Identifier(role)
    )
    return [Missing(f"table {schema}.alembic_version", "SELECT", _text(conn, grant))]


def _migrator_schema(conn: psycopg.Connection[Any], role: str) -> list[Missing]:
    """migrator replaces its function and writes its tables: it needs their owner's privileges."""
    rows = conn.execute(
        "SELECT 'SCHEMA', NULL::text, NULL::text, r.rolname::text, r.rolsuper, pg_has_role(n.nspowner, 'USAGE')"
        " FROM pg_namespace n JOIN pg_roles r ON r.oid = n.nspowner WHERE n.nspname = %(s)s"
        " UNION ALL SELECT 'TABLE', c.relname::text, NULL, r.rolname::text, r.rolsuper,"
        " pg_has_role(c.relowner, 'USAGE') FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " JOIN pg_roles r ON r.oid = c.relowner WHERE n.nspname = %(s)s AND c.relkind IN ('r', 'p')"
        " UNION ALL SELECT 'FUNCTION', p.proname::text, pg_get_function_identity_arguments(p.oid), r.rolname::text,"
        " r.rolsuper, pg_has_role(p.proowner, 'USAGE') FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
        " JOIN pg_roles r ON r.oid = p.proowner WHERE n.nspname = %(s)s ORDER BY 1, 2",
        {"s": SCHEMA},
    ).fetchall()
    missing = []
    for kind, name, args, owner, owner_super, has in rows:
        if has:
            continue
        ident = sql.Identifier(SCHEMA) if name is None else sql.Identifier(SCHEMA, name)
        label = f"{kind.lower()} {SCHEMA}" + (f".{name}" if name else "") + (f"({args})" if kind == "FUNCTION" else "")
        if owner_super:  # a superuser ran migrator before: hand its objects to this role
            target = sql.SQL("{}({})").format(ident, sql.SQL(args)) if kind == "FUNCTION" else ident
            grant = _text(conn, sql.SQL("ALTER {} {} OWNER TO {}").format(sql.SQL(kind), target, sql.Identifier(role)))
        else:
            grant = _owner_grant(conn, role, owner, False)
        missing.append(Missing(label, f"the privileges of its owner {owner} (left by an earlier run)", grant))
    return missing


def _replication_role(conn: psycopg.Connection[Any], layout: Layout) -> list[Missing]:
    """SET on session_replication_role, needed only where application triggers would fire for migrator's writes."""
    if dsnlib.may_skip_triggers(conn):
        return []
    triggers = checks.firing_triggers(conn, layout, checks.TARGET_WRITES, replica=False)
    if not triggers:
        return []
    names = ", ".join(f"{t.name} on {t.table}" for t in triggers)
    return [
        Missing(
            "parameter session_replication_role",
            f"SET (application triggers {names} would fire for copied rows; or move with --allow-triggers)",
            checks.replica_grant(conn),
        )
    ]


def _monitoring(conn: psycopg.Connection[Any], role: str) -> list[Missing]:
    """pg_monitor, only where the stamp has standbys: the cutover waits for them to replay the move, and
    the throttle limits read their lag and other roles' sessions, which an ordinary role cannot see."""
    sees, standbys = _one(
        conn,
        "SELECT (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) OR pg_has_role('pg_read_all_stats',"
        " 'MEMBER'), (SELECT count(*) FROM pg_stat_replication) + (SELECT count(*) FROM pg_replication_slots"
        " WHERE slot_type = 'physical')",
    )
    if sees or not standbys:
        return []
    grant = sql.SQL("GRANT pg_monitor TO {}").format(sql.Identifier(role))
    why = "pg_monitor (the cutover waits for this stamp's standbys; --max-replica-lag and the load limits read them)"
    return [Missing(f"role {role}", why, _text(conn, grant))]


def _row_security(conn: psycopg.Connection[Any], role: str, layout: Layout) -> list[Missing]:
    """BYPASSRLS, needed only where a tenant table's row-level security applies to the role."""
    tables = checks.rls_tables(conn, layout)
    if not tables:
        return []
    names = ", ".join(t.table for t in tables)
    return [
        Missing(
            f"role {role}",
            f"BYPASSRLS (row-level security applies to it on {names}; only a superuser may grant it)",
            checks.bypass_grant(conn),
        )
    ]
