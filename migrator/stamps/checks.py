"""Preflight checks of what a schema does besides storing rows: application triggers and row-level security.

Rows a move copies, replays or cleans up are copies, not business events. Where the role may set
`session_replication_role`, migrator's write sessions run as `replica` (`dsn.write_as_copies`), so
the application's ordinary triggers do not fire for them; triggers that would still fire (all of
them without that privilege, those enabled ALWAYS or REPLICA with it) are refused by name unless the
operator passes `--allow-triggers`. Row-level security that applies to migrator's role would filter
what it reads or reject its COPY: every session sets `row_security = off`, so that is an error,
never a smaller copy, and preflight refuses it here first. Kept apart from preflight's checks of
the tenant and its keys so each can change on its own.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from migrator.db import dsn as dsnlib
from migrator.errors import PreflightError
from migrator.stamps.access import SCHEMA, TRIGGER
from migrator.stamps.discovery import Layout

log = logging.getLogger("migrator.preflight")

# pg_trigger.tgtype bits of the events migrator's own writes raise.
_EVENTS = {"INSERT": 4, "DELETE": 8, "UPDATE": 16}
TARGET_WRITES = ("INSERT", "UPDATE", "DELETE")  # copy (COPY), catch-up (upserts, deletes), abort (deletes)
DELETES = ("DELETE",)  # cleanup on a source and abort on a target only delete
# Which triggers fire in a session, by its session_replication_role (pg_trigger.tgenabled).
_FIRING = {False: ("O", "A"), True: ("A", "R")}

# Catalog lookups only (no regproc casts): they need no privilege on `_migrator`, which another role may own.
_TRIGGERS = """
SELECT u.label, t.tgname::text, t.tgenabled::text, t.tgtype::int
FROM unnest(%(schemas)s::text[], %(names)s::text[], %(labels)s::text[]) AS u(schema, name, label)
JOIN pg_namespace n ON n.nspname = u.schema
JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = u.name
JOIN pg_trigger t ON t.tgrelid = c.oid
WHERE NOT t.tgisinternal AND t.tgenabled = ANY(%(firing)s::"char"[]) AND t.tgtype & %(events)s <> 0
  AND NOT (t.tgname = %(guard)s AND t.tgfoid IN (SELECT p.oid FROM pg_proc p
      JOIN pg_namespace pn ON pn.oid = p.pronamespace WHERE pn.nspname = %(schema)s
      AND (p.proname = 'guard' OR starts_with(p.proname, 'guard_path_'))))
ORDER BY u.label, t.tgname
"""

_RLS = """
SELECT u.label, c.relforcerowsecurity, pg_has_role(c.relowner, 'USAGE')
FROM unnest(%(schemas)s::text[], %(names)s::text[], %(labels)s::text[]) AS u(schema, name, label)
JOIN pg_namespace n ON n.nspname = u.schema
JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = u.name
WHERE c.relrowsecurity AND row_security_active(c.oid)
ORDER BY u.label
"""


@dataclass(frozen=True)
class Trigger:
    """An application trigger on a tenant table that would fire for the rows migrator writes."""

    table: str
    name: str
    enabled: str  # pg_trigger.tgenabled: O (origin, the default), A (always), R (replica)
    events: tuple[str, ...]


@dataclass(frozen=True)
class Protected:
    """A tenant table whose row-level security applies to the connected role."""

    table: str
    forced: bool  # FORCE ROW LEVEL SECURITY: even the owner's members are subject to it
    owner_member: bool


def _tables(layout: Layout) -> dict[str, list[str]]:
    return {
        "schemas": [t.schema for t in layout.tables],
        "names": [t.name for t in layout.tables],
        "labels": [t.label for t in layout.tables],
    }


def firing_triggers(
    conn: psycopg.Connection[Any], layout: Layout, writes: tuple[str, ...], *, replica: bool
) -> list[Trigger]:
    """Enabled non-internal triggers (not migrator's guard) on tenant tables that fire for the given
    events in a session of this replication role: ordinary (and ALWAYS) ones in `origin`, those enabled
    ALWAYS or REPLICA in `replica`."""
    bits = sum(_EVENTS[w] for w in writes)
    rows = conn.execute(
        _TRIGGERS,
        {**_tables(layout), "firing": list(_FIRING[replica]), "events": bits, "guard": TRIGGER, "schema": SCHEMA},
    ).fetchall()
    return [
        Trigger(label, name, enabled, tuple(e for e, bit in _EVENTS.items() if tgtype & bit))
        for label, name, enabled, tgtype in rows
    ]


def rls_tables(conn: psycopg.Connection[Any], layout: Layout) -> list[Protected]:
    """Tenant tables whose row-level security applies to the connected role (PostgreSQL's own answer:
    not a superuser or BYPASSRLS, and either the policy is forced or the role does not have its
    owner's privileges; an inherited membership of the owner counts as the owner)."""
    return [Protected(*row) for row in conn.execute(_RLS, _tables(layout)).fetchall()]


def _role(conn: psycopg.Connection[Any]) -> sql.Identifier:
    row = conn.execute("SELECT current_user::text").fetchone()
    assert row is not None
    return sql.Identifier(row[0])


def replica_grant(conn: psycopg.Connection[Any]) -> str:
    """The statement that lets the connected role run its writes as replica (PostgreSQL 15+)."""
    return sql.SQL("GRANT SET ON PARAMETER session_replication_role TO {};").format(_role(conn)).as_string(conn)


def bypass_grant(conn: psycopg.Connection[Any]) -> str:
    return sql.SQL("ALTER ROLE {} BYPASSRLS;").format(_role(conn)).as_string(conn)


def trigger_problems(
    conn: psycopg.Connection[Any], layout: Layout, stamp: str, writes: tuple[str, ...], allow: bool
) -> list[str]:
    """One line per trigger that would fire for migrator's writes on this stamp, saying what to do.

    With `allow` (--allow-triggers) they are logged instead: the operator knows them to be harmless.
    """
    replica = dsnlib.may_skip_triggers(conn)
    problems = []
    for trigger in firing_triggers(conn, layout, writes, replica=replica):
        what = (
            f"table {trigger.table} on {stamp}: trigger {trigger.name} ({' OR '.join(trigger.events)}) "
            "would fire for every row the move writes there"
        )
        if allow:
            log.warning("%s (--allow-triggers)", what)
            continue
        if replica:
            mode = "ALWAYS" if trigger.enabled == "A" else "REPLICA"
            fix = (
                f"it is enabled {mode}, so it fires even in replica mode; make it an ordinary trigger "
                f"(ALTER TABLE ... ENABLE TRIGGER {trigger.name}) or pass --allow-triggers if it is harmless"
            )
        else:
            fix = (
                f"let migrator write as replica, where application triggers do not fire: "
                f"{replica_grant(conn)} (run by a superuser), or pass --allow-triggers if it is harmless"
            )
        problems.append(f"{what}; {fix}")
    return problems


def rls_problems(conn: psycopg.Connection[Any], layout: Layout, stamp: str) -> list[str]:
    """One line per tenant table whose row-level security applies to migrator's role on this stamp."""
    problems = []
    for table in rls_tables(conn, layout):
        if not table.owner_member:
            why, alternative = (
                "row-level security and migrator's role is not a member of its owner",
                ("or make it a member of the table's owner, which is exempt unless the policy is forced"),
            )
        else:  # a member of the owner is exempt unless the table forces its policies on the owner too
            why, alternative = (
                "forced row-level security",
                (f"or ALTER TABLE {table.table} NO FORCE ROW LEVEL SECURITY (its owner's members are then exempt)"),
            )
        problems.append(
            f"table {table.table} on {stamp} has {why}: migrator would read only the rows its policies show "
            f"and cannot COPY into it; {bypass_grant(conn)} (only a superuser may grant it; on managed "
            f"PostgreSQL, ask whether its admin role may) {alternative}"
        )
    return problems


def stamp_problems(
    conn: psycopg.Connection[Any], layout: Layout, stamp: str, writes: tuple[str, ...], allow_triggers: bool
) -> list[str]:
    """Every trigger and row-level security problem of one stamp for the given writes (read-only)."""
    return [*trigger_problems(conn, layout, stamp, writes, allow_triggers), *rls_problems(conn, layout, stamp)]


class Problems:
    """Preflight's findings, gathered so one run reports every problem instead of one per attempt."""

    def __init__(self) -> None:
        self.found: list[str] = []

    @contextmanager
    def check(self) -> Iterator[None]:
        """Record a check's PreflightError and go on with the next check."""
        try:
            yield
        except PreflightError as exc:
            self.found.append(str(exc))

    def add(self, problems: list[str]) -> None:
        self.found.extend(problems)

    def raise_any(self, what: str) -> None:
        """Raise one PreflightError (exit 2) holding every problem, still one line: one problem as is,
        several numbered."""
        if len(self.found) == 1:
            raise PreflightError(self.found[0])
        if self.found:
            listed = "; ".join(f"({n}) {problem}" for n, problem in enumerate(self.found, 1))
            raise PreflightError(f"{what}, {len(self.found)} problems: {listed}")
