"""The guard on a source stamp: one row trigger that fences and captures a moving tenant's writes.

For every tenant listed in `_migrator.guarded_tenants` the trigger
- takes a shared transaction-level advisory lock of the move, so a cutover can wait out every
  in-flight write of the tenant by taking the same lock exclusively;
- rejects the write with SQLSTATE `MGF01` once the tenant is fenced, so no application path can
  write rows a move would lose; applications re-read the route and retry on the new stamp;
- while the move captures (online mode), logs the primary keys of the written rows (old and new)
  to `_migrator.changes`, which catch-up replays onto the target.
Tenants not listed pay one index probe. The triggers stay only while some tenant is guarded.

The function runs as its owner (SECURITY DEFINER, with a pinned search_path), so application roles
need no right on `_migrator`: without it every write of every tenant on the stamp would fail with
"permission denied for schema _migrator" while any move is in flight.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any, LiteralString

import psycopg
from psycopg import sql

from migrator.catalog import Cohort
from migrator.db.locks import xact_lock
from migrator.db.retry import LOCK_YIELD
from migrator.sqlstates import FENCED_SQLSTATE
from migrator.stamps.access import DDL_LOCK, SCHEMA, TRIGGER
from migrator.stamps.discovery import Layout, Table
from migrator.stamps.paths import any_path_set, owner_texts

LOCK_CLASS = 0x6D67  # advisory lock namespace (classid) of migrator's per-move locks
# Set only by migrator's own sessions that must write a fenced tenant's rows: cleanup deleting its
# leftovers (transaction-locally), a revert replaying onto the forward move's fenced source.
BYPASS_SETTING = "migrator.cleanup_bypass_fence"

_CHECK_WRITE = sql.SQL(
    """
CREATE OR REPLACE FUNCTION {schema}.check_write(
    tbl text, old_row jsonb, new_row jsonb, old_tenants text[], new_tenants text[],
    old_unknown boolean, new_unknown boolean, pk text[]
) RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    g record;
    f record;
    snapshot_kept boolean := current_setting('transaction_isolation') <> 'read committed';
BEGIN
    FOR g IN SELECT tenant, move_id FROM {schema}.guarded_tenants
             WHERE tenant = ANY(old_tenants || new_tenants) ORDER BY move_id LOOP
        PERFORM pg_advisory_xact_lock_shared({lock_class}, g.move_id::integer);
        -- Read the guard again after the lock: a cutover may have fenced it while this write waited.
        -- READ COMMITTED reads with a new snapshot; a snapshot kept from before cannot see the fence.
        IF snapshot_kept THEN  -- a locking read fails (40001) if the guard changed after the snapshot
            SELECT fenced, capture INTO f FROM {schema}.guarded_tenants x
             WHERE x.tenant = g.tenant AND x.move_id = g.move_id FOR SHARE;
        ELSE
            SELECT fenced, capture INTO f FROM {schema}.guarded_tenants x
             WHERE x.tenant = g.tenant AND x.move_id = g.move_id;
        END IF;
        CONTINUE WHEN NOT FOUND;  -- `unguard` lifted the guard meanwhile
        -- Only migrator's own role may bypass (cleanup): current_user is the owner here (SECURITY DEFINER).
        IF f.fenced AND NOT (coalesce(current_setting({bypass}, true), '') = 'on'
                             AND pg_has_role(session_user, current_user, 'MEMBER')) THEN
            RAISE EXCEPTION USING
                ERRCODE = {state},
                MESSAGE = format('tenant %s is fenced for a move: writes on this stamp are rejected', g.tenant),
                HINT = 'Re-read the tenant''s route and retry against its new stamp.';
        END IF;
        IF f.capture THEN
            -- `moved`: an update that changed the row's tenant, or a delete: its path rows may have
            -- changed tenant without a write of their own (see `capture.expand`)
            INSERT INTO {schema}.changes (move_id, table_name, pk, moved)
            SELECT DISTINCT g.move_id, tbl, k,
                   old_row IS NOT NULL AND (new_row IS NULL OR old_tenants IS DISTINCT FROM new_tenants)
            FROM (VALUES
                (CASE WHEN g.tenant = ANY(old_tenants)
                      THEN ARRAY(SELECT old_row ->> c FROM unnest(pk) WITH ORDINALITY u(c, i) ORDER BY i) END),
                (CASE WHEN g.tenant = ANY(new_tenants)
                      THEN ARRAY(SELECT new_row ->> c FROM unnest(pk) WITH ORDINALITY u(c, i) ORDER BY i) END)
            ) v(k) WHERE k IS NOT NULL;
        END IF;
    END LOOP;
    -- A path table's row whose parent is already gone (a cascaded delete, or a SET NULL after one)
    -- has no tenant to look up: its key goes to every capturing move's log. Replay re-reads the row
    -- and acts only on the move's own tenants' rows, so a key logged for a move it is not of is a
    -- no-op there. Its parent's own write was fenced and took the move's lock.
    IF old_unknown OR new_unknown THEN
        INSERT INTO {schema}.changes (move_id, table_name, pk)
        SELECT DISTINCT x.move_id, tbl, k FROM {schema}.guarded_tenants x, (VALUES
            (CASE WHEN old_unknown
                  THEN ARRAY(SELECT old_row ->> c FROM unnest(pk) WITH ORDINALITY u(c, i) ORDER BY i) END),
            (CASE WHEN new_unknown
                  THEN ARRAY(SELECT new_row ->> c FROM unnest(pk) WITH ORDINALITY u(c, i) ORDER BY i) END)
        ) v(k) WHERE x.capture AND k IS NOT NULL;
    END IF;
    -- REPEATABLE READ and SERIALIZABLE read with the snapshot of their first statement, which may
    -- predate a guard installed or lifted since (a guard fenced since is caught by the locking read
    -- above): guard() and unguard() update guard_state, and this locking read of it then fails. Its
    -- one row is never deleted: not seeing it means it was created after the snapshot.
    IF snapshot_kept THEN
        PERFORM 1 FROM {schema}.guard_state FOR SHARE;
        IF NOT FOUND THEN
            RAISE EXCEPTION USING
                ERRCODE = 'serialization_failure',
                MESSAGE = 'a tenant move guarded this stamp''s writes after this transaction''s snapshot was taken',
                HINT = 'Retry the transaction.';
        END IF;
    END IF;
END
$fn$
"""
)

# The trigger of a table carrying the tenant column: TG_ARGV is the column, then the row key's columns.
_GUARD = sql.SQL(
    """
CREATE OR REPLACE FUNCTION {schema}.guard() RETURNS trigger LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    new_row jsonb := CASE WHEN TG_OP <> 'DELETE' THEN to_jsonb(NEW) END;
    old_row jsonb := CASE WHEN TG_OP <> 'INSERT' THEN to_jsonb(OLD) END;
BEGIN
    PERFORM {schema}.check_write(TG_TABLE_NAME, old_row, new_row, ARRAY[old_row ->> TG_ARGV[0]],
                                 ARRAY[new_row ->> TG_ARGV[0]], false, false, TG_ARGV[1:]);
    RETURN CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
END
$fn$
"""
)

# The trigger of one path table: its tenant is looked up through its foreign keys (static SQL, so
# the plan is cached: one index probe per hop); TG_ARGV is the row key's columns.
_PATH_GUARD = sql.SQL(
    """
CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    old_tenants text[];
    new_tenants text[];
BEGIN
    IF TG_OP <> 'INSERT' THEN
        old_tenants := {old_owners};
    END IF;
    IF TG_OP <> 'DELETE' THEN
        new_tenants := {new_owners};
    END IF;
    PERFORM {schema}.check_write(
        TG_TABLE_NAME,
        CASE WHEN TG_OP <> 'INSERT' THEN to_jsonb(OLD) END,
        CASE WHEN TG_OP <> 'DELETE' THEN to_jsonb(NEW) END,
        old_tenants, new_tenants,
        TG_OP <> 'INSERT' AND array_remove(old_tenants, NULL) = '{{}}' AND {old_set},
        TG_OP <> 'DELETE' AND array_remove(new_tenants, NULL) = '{{}}' AND {new_set},
        TG_ARGV);
    RETURN CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
END
$fn$
"""
)
JSON_TEXT = sql.SQL("to_jsonb({}) #>> '{{}}'")  # a value's text as `to_jsonb(NEW) ->> column` reads it


def path_guard_function(table: Table) -> sql.Identifier:
    """The guard function of one path table, named by a digest of the table's name (63 bytes at most)."""
    digest = hashlib.sha256(f"{table.schema}.{table.name}".encode()).hexdigest()[:20]
    return sql.Identifier(SCHEMA, f"guard_path_{digest}")


def _path_guard(table: Table) -> sql.Composed:
    old, new = sql.SQL("OLD"), sql.SQL("NEW")
    return _PATH_GUARD.format(
        function=path_guard_function(table),
        schema=sql.Identifier(SCHEMA),
        old_owners=owner_texts(table.paths, old, JSON_TEXT),
        new_owners=owner_texts(table.paths, new, JSON_TEXT),
        old_set=any_path_set(table.paths, old),
        new_set=any_path_set(table.paths, new),
    )


def _lock_stamp_ddl(conn: psycopg.Connection[Any]) -> None:
    """Serialise migrator's own DDL on one stamp (two moves installing triggers at once)."""
    xact_lock(conn, DDL_LOCK)


def ensure_schema(conn: psycopg.Connection[Any]) -> None:
    """Create `_migrator` with its bookkeeping tables; idempotent, inside the caller's transaction.

    A stamp that already has all of it is left alone without any DDL: `CREATE INDEX IF NOT EXISTS`
    takes a SHARE lock on its table before it finds the index, which would stop every captured write.
    """
    if _schema_current(conn):
        return
    _lock_stamp_ddl(conn)
    schema = sql.Identifier(SCHEMA)
    for statement in (
        "CREATE SCHEMA IF NOT EXISTS {}",
        "CREATE TABLE IF NOT EXISTS {}.guarded_tenants (tenant text PRIMARY KEY, move_id bigint NOT NULL,"
        " fenced boolean NOT NULL, capture boolean NOT NULL, since timestamptz NOT NULL DEFAULT now())",
        "CREATE TABLE IF NOT EXISTS {}.changes (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
        " move_id bigint NOT NULL, xid xid8 NOT NULL DEFAULT pg_current_xact_id(), table_name text NOT NULL,"
        " pk text[] NOT NULL, applied boolean NOT NULL DEFAULT false, verified boolean NOT NULL DEFAULT false)",
        "CREATE INDEX IF NOT EXISTS changes_pending ON {}.changes (move_id, id) WHERE NOT applied",
        "CREATE INDEX IF NOT EXISTS changes_unverified ON {}.changes (move_id) WHERE NOT verified",
        # Changes of rows whose tenant changed, until their path rows are logged too (`capture.expand`).
        "ALTER TABLE {}.changes ADD COLUMN IF NOT EXISTS moved boolean NOT NULL DEFAULT false,"
        " ADD COLUMN IF NOT EXISTS expanded boolean NOT NULL DEFAULT false",
        "CREATE INDEX IF NOT EXISTS changes_moved ON {}.changes (move_id) WHERE moved AND NOT expanded",
        # One row per key range (`part`) of a table's copy; see `copy.Part`.
        "CREATE TABLE IF NOT EXISTS {}.copy_progress (move_id bigint NOT NULL, table_name text NOT NULL,"
        " part integer NOT NULL DEFAULT 0, cursor text[], upto text[], rows_copied bigint NOT NULL DEFAULT 0,"
        " done boolean NOT NULL DEFAULT false, PRIMARY KEY (move_id, table_name, part))",
        # One row per committed copy batch: its transaction and both sides' checksums (`proof`).
        "CREATE TABLE IF NOT EXISTS {}.copy_batches (move_id bigint NOT NULL, table_name text NOT NULL,"
        " xid xid8 NOT NULL DEFAULT pg_current_xact_id(), rows bigint NOT NULL, proven boolean NOT NULL,"
        " source_sum numeric[] NOT NULL, PRIMARY KEY (move_id, table_name, xid))",
        # One row, updated whenever the set of guarded tenants changes (see the trigger's locking read).
        "CREATE TABLE IF NOT EXISTS {}.guard_state (one boolean PRIMARY KEY DEFAULT true CHECK (one),"
        " changed_at timestamptz NOT NULL DEFAULT now())",
        "INSERT INTO {}.guard_state DEFAULT VALUES ON CONFLICT DO NOTHING",
    ):
        conn.execute(sql.SQL(statement).format(schema))
    _add_copy_parts(conn)


def _schema_current(conn: psycopg.Connection[Any]) -> bool:
    """Every object `ensure_schema` creates is there, in its latest shape (copy parts)."""
    names = [
        f"{SCHEMA}.{n}"
        for n in (
            "guarded_tenants",
            "guard_state",
            "changes_pending",
            "changes_unverified",
            "changes_moved",
            "copy_batches",
        )
    ]
    row = conn.execute(
        "SELECT bool_and(to_regclass(n) IS NOT NULL) AND EXISTS (SELECT 1 FROM pg_attribute"
        " WHERE attrelid = to_regclass(%s) AND attname = 'part' AND NOT attisdropped) FROM unnest(%s::text[]) AS n",
        (f"{SCHEMA}.copy_progress", names),
    ).fetchone()
    return bool(row and row[0])


def _add_copy_parts(conn: psycopg.Connection[Any]) -> None:
    """A stamp set up by an earlier migrator keeps one copy cursor per table: give it key ranges.

    Its cursors become part 0, unbounded, of their tables: an unfinished copy resumes where it stood.
    """
    found = conn.execute(
        "SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass(%s) AND attname = 'part' AND NOT attisdropped",
        (f"{SCHEMA}.copy_progress",),
    ).fetchone()
    if found is None:
        conn.execute(
            sql.SQL(
                "ALTER TABLE {}.copy_progress ADD COLUMN part integer NOT NULL DEFAULT 0, ADD COLUMN upto text[],"
                " DROP CONSTRAINT copy_progress_pkey, ADD PRIMARY KEY (move_id, table_name, part)"
            ).format(sql.Identifier(SCHEMA))
        )


def guard(
    conn: psycopg.Connection[Any], layout: Layout, tenants: Cohort, move_id: int, *, fenced: bool, capture: bool
) -> None:
    """Install the triggers and set the guard of each tenant of the cohort; commits what `conn` has open.

    `_migrator` is made sure of first, in a transaction of its own. The triggers then go in one
    transaction that yields to application writers (and to other moves' DDL) on lock conflicts
    (`_yielding_to_writers`) and holds nothing between its attempts: a lock kept across them would
    block the writers, and another move's steps, that the next attempt waits for. Creating a
    trigger waits for in-flight writers of the table, so every write committed after this returns
    is fenced or captured.
    """
    ensure_schema(conn)
    conn.commit()

    def install() -> None:
        _lock_stamp_ddl(conn)  # serialised with other moves' DDL on this stamp, under the lock_timeout
        _install(conn, layout, tenants, move_id, fenced=fenced, capture=capture)

    _yielding_to_writers(conn, install)  # a transaction of its own: its SET LOCAL lock_timeout ends with it


@LOCK_YIELD.wraps
def _yielding_to_writers(conn: psycopg.Connection[Any], ddl: Callable[[], None]) -> None:
    """Run DDL on the application's tables in a (sub)transaction that gives way on lock conflicts.

    Locking table after table can deadlock with an application transaction that holds one of them
    and needs another. A lock_timeout below deadlock_timeout (1 s by default) makes this side roll
    back (releasing its locks) and retry after a pause (policy LOCK_YIELD), so PostgreSQL never
    picks the application.
    """
    with conn.transaction():
        conn.execute("SET LOCAL lock_timeout = '200ms'")
        ddl()


def _install(
    conn: psycopg.Connection[Any], layout: Layout, tenants: Cohort, move_id: int, *, fenced: bool, capture: bool
) -> None:
    schema = sql.Identifier(SCHEMA)
    conn.execute(
        _CHECK_WRITE.format(
            schema=schema,
            bypass=sql.Literal(BYPASS_SETTING),
            state=sql.Literal(FENCED_SQLSTATE),
            lock_class=sql.Literal(LOCK_CLASS),
        )
    )
    conn.execute(_GUARD.format(schema=schema))
    for table in layout.tables:
        if table.key is None:
            conn.execute(_path_guard(table))
            function = path_guard_function(table)
            args = sql.SQL(", ").join(sql.Literal(c) for c in table.primary_key)
        else:
            function = sql.Identifier(SCHEMA, "guard")
            args = sql.SQL(", ").join(sql.Literal(c) for c in (table.key, *table.primary_key))
        conn.execute(
            sql.SQL(
                "CREATE OR REPLACE TRIGGER {trigger} BEFORE INSERT OR UPDATE OR DELETE ON {table}"
                " FOR EACH ROW EXECUTE FUNCTION {function}({args})"
            ).format(trigger=sql.Identifier(TRIGGER), table=table.ident, function=function, args=args)
        )
    conn.execute(
        sql.SQL(
            "INSERT INTO {}.guarded_tenants (tenant, move_id, fenced, capture)"
            " SELECT t, %s, %s, %s FROM unnest(%s::text[]) AS t"
            " ON CONFLICT (tenant) DO UPDATE SET move_id = EXCLUDED.move_id, fenced = EXCLUDED.fenced,"
            " capture = EXCLUDED.capture"
        ).format(schema),
        (move_id, fenced, capture, list(tenants)),
    )
    _guards_changed(conn)


def _guards_changed(conn: psycopg.Connection[Any]) -> None:
    """Mark a change of the guarded set: a transaction whose snapshot predates it can no longer write."""
    conn.execute(sql.SQL("UPDATE {}.guard_state SET changed_at = now()").format(sql.Identifier(SCHEMA)))


def fence(conn: psycopg.Connection[Any], layout: Layout, tenants: Cohort, move_id: int) -> None:
    """Reject the tenants' writes on this stamp (offline mode: for the whole copy; no capture)."""
    guard(conn, layout, tenants, move_id, fenced=True, capture=False)


def set_fenced(conn: psycopg.Connection[Any], tenants: Cohort, fenced: bool, timeout_ms: int | None = None) -> None:
    """Raise or lower the installed guards' fence of these tenants, keeping their capture as it is.

    A REPEATABLE READ or SERIALIZABLE writer of the tenant holds the guard's row (see the trigger)
    until it ends; `timeout_ms` bounds the wait for it (in the caller's transaction).
    """
    if timeout_ms is not None:
        conn.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(f"{max(1, timeout_ms)}ms")))
    conn.execute(
        sql.SQL("UPDATE {}.guarded_tenants SET fenced = %s WHERE tenant = ANY(%s)").format(sql.Identifier(SCHEMA)),
        (fenced, list(tenants)),
    )


def set_capture(conn: psycopg.Connection[Any], tenants: Cohort, capture: bool) -> None:
    """Start or stop logging the tenants' writes under their installed guards, keeping the fence as it
    is (a revert window's capture starts in the freeze, just before the flip; in the caller's transaction)."""
    conn.execute(
        sql.SQL("UPDATE {}.guarded_tenants SET capture = %s WHERE tenant = ANY(%s)").format(sql.Identifier(SCHEMA)),
        (capture, list(tenants)),
    )


def forget_changes(conn: psycopg.Connection[Any], move_id: int) -> None:
    """Delete the move's captured changes on this stamp (in the caller's transaction)."""
    conn.execute(sql.SQL("DELETE FROM {}.changes WHERE move_id = %s").format(sql.Identifier(SCHEMA)), (move_id,))


def stop_capture(conn: psycopg.Connection[Any], tenants: Cohort, *, forget: bool = True) -> None:
    """After the flip: keep the fence, stop logging changes and (unless not `forget`) forget the log."""
    schema = sql.Identifier(SCHEMA)
    moves = conn.execute(
        sql.SQL("UPDATE {}.guarded_tenants SET capture = false WHERE tenant = ANY(%s) RETURNING move_id").format(
            schema
        ),
        (list(tenants),),
    ).fetchall()
    if forget:
        conn.execute(sql.SQL("DELETE FROM {}.changes WHERE move_id = ANY(%s)").format(schema), ([m for (m,) in moves],))


def wait_for_writers(conn: psycopg.Connection[Any], move_id: int, timeout_ms: int) -> None:
    """Wait until every in-flight write of the move's tenant has ended (in the caller's transaction).

    Writers hold the move's advisory lock shared; taking it exclusively returns once they have
    committed or rolled back. New writers see the fence first and fail, so this returns quickly.
    """
    conn.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(f"{timeout_ms}ms")))
    conn.execute("SELECT pg_advisory_xact_lock(%s, %s::integer)", (LOCK_CLASS, move_id))


def unguard(conn: psycopg.Connection[Any], layout: Layout, tenants: Cohort) -> None:
    """Lift the tenants' guards and their captured changes; drop the triggers when no tenant is guarded.

    Three short transactions of its own (what the caller has open is committed first): a write in
    flight may still log a change after the guard is gone, so the log is deleted only once such
    writes are over, and without holding the move's lock while dropping triggers (a writer waiting
    for that lock while holding its table would deadlock with the DROP).
    """
    if not has_schema(conn):
        return
    conn.commit()
    schema = sql.Identifier(SCHEMA)
    with conn.transaction():
        _lock_stamp_ddl(conn)
        moves = conn.execute(
            sql.SQL("DELETE FROM {}.guarded_tenants WHERE tenant = ANY(%s) RETURNING move_id").format(schema),
            (list(tenants),),
        ).fetchall()
        _guards_changed(conn)
    with conn.transaction():
        for move_id in sorted({m for (m,) in moves}):  # wait out writes past the guard's lock; later ones
            conn.execute("SELECT pg_advisory_xact_lock(%s, %s::integer)", (LOCK_CLASS, move_id))  # re-check it
        conn.execute(
            sql.SQL(
                "DELETE FROM {s}.changes c WHERE NOT EXISTS (SELECT 1 FROM {s}.guarded_tenants g"
                " WHERE g.move_id = c.move_id)"
            ).format(s=schema)
        )
    _drop_triggers_if_unused(conn, layout)


def _drop_triggers_if_unused(conn: psycopg.Connection[Any], layout: Layout) -> None:
    """Drop the triggers once no tenant is guarded, yielding to the application on lock conflicts.

    DROP TRIGGER locks each table in turn (a child row's foreign-key check holds its parent while
    the writer holds the child), hence `_yielding_to_writers`.
    """

    def drop() -> None:
        _lock_stamp_ddl(conn)
        remaining = conn.execute(sql.SQL("SELECT count(*) FROM {}.guarded_tenants").format(sql.Identifier(SCHEMA)))
        if remaining.fetchone() == (0,):
            for table in layout.tables:
                conn.execute(sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(sql.Identifier(TRIGGER), table.ident))
                if table.key is None:
                    conn.execute(sql.SQL("DROP FUNCTION IF EXISTS {}()").format(path_guard_function(table)))

    _yielding_to_writers(conn, drop)


def bypass_for_cleanup(conn: psycopg.Connection[Any]) -> None:
    """Let this transaction delete a fenced tenant's leftovers (the fence stays for everyone else).

    The trigger honours the setting only for sessions of the role that owns it (migrator's), so an
    application setting it still gets the fence.
    """
    conn.execute("SELECT set_config(%s, 'on', true)", (BYPASS_SETTING,))


def bypass_for_replay(conn: psycopg.Connection[Any]) -> None:
    """Let this session's replay write a fenced tenant's rows: a revert replays onto the forward move's
    source, which stays fenced against the application until the revert flips (see bypass_for_cleanup)."""
    with conn.transaction():  # committed: a session setting
        conn.execute("SELECT set_config(%s, 'on', false)", (BYPASS_SETTING,))


def guarded(conn: psycopg.Connection[Any]) -> set[str]:
    """The tenants with a guard (fence or capture) on this stamp."""
    return {tenant for (tenant,) in own_rows(conn, "guarded_tenants", "SELECT tenant FROM {}")}


def capturing(conn: psycopg.Connection[Any], move_id: int) -> set[str]:
    """The tenants whose writes this stamp logs under `move_id` (a revert window's target)."""
    rows = own_rows(conn, "guarded_tenants", "SELECT tenant FROM {} WHERE move_id = %s AND capture", (move_id,))
    return {tenant for (tenant,) in rows}


def has_schema(conn: psycopg.Connection[Any]) -> bool:
    row = conn.execute("SELECT to_regnamespace(%s) IS NOT NULL", (SCHEMA,)).fetchone()
    return bool(row and row[0])


def has_table(conn: psycopg.Connection[Any], name: str) -> bool:
    """Whether `_migrator.<name>` exists: a stamp prepared by an older migrator lacks the newer ones."""
    row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (f"{SCHEMA}.{name}",)).fetchone()
    return bool(row and row[0])


def own_rows(
    conn: psycopg.Connection[Any], name: str, query: LiteralString, params: tuple[Any, ...] | None = None
) -> list[tuple[Any, ...]]:
    """The rows `query` reads from migrator's own table `_migrator.<name>` (its `{}`) on a stamp; none
    where the stamp lacks the table (no move ever prepared it, or an older migrator did)."""
    if not has_table(conn, name):
        return []
    return conn.execute(sql.SQL(query).format(sql.Identifier(SCHEMA, name)), params).fetchall()


def guards_of(conn: psycopg.Connection[Any], move_id: int) -> tuple[int, int]:
    """How many of the move's tenants this stamp fences, and how many it captures (an interrupted move's line)."""
    rows = own_rows(
        conn,
        "guarded_tenants",
        "SELECT count(*) FILTER (WHERE fenced), count(*) FILTER (WHERE capture) FROM {} WHERE move_id = %s",
        (move_id,),
    )
    return (int(rows[0][0]), int(rows[0][1])) if rows else (0, 0)


def leftovers(conn: psycopg.Connection[Any]) -> list[str]:
    """migrator's objects still on a stamp: guards, triggers, change logs, copy cursors (`doctor`)."""
    found = [
        f"trigger {schema}.{table}.{name}"
        for schema, table, name in conn.execute(
            "SELECT n.nspname, c.relname, t.tgname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid"
            " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE t.tgname = %s ORDER BY 1, 2",
            (TRIGGER,),
        ).fetchall()
    ]
    guards = "SELECT tenant, move_id, fenced, capture FROM {} ORDER BY tenant"
    for tenant, move_id, fenced, capture in own_rows(conn, "guarded_tenants", guards):
        what = " and ".join(w for w, on in (("fence", fenced), ("capture", capture)) if on) or "guard"
        found.append(f"{what} on tenant {tenant} (move {move_id})")
    for move_id, count in own_rows(conn, "changes", "SELECT move_id, count(*) FROM {} GROUP BY 1 ORDER BY 1"):
        found.append(f"{count} captured changes of move {move_id}")
    cursors = "SELECT DISTINCT move_id, table_name FROM {} ORDER BY 1, 2"
    for move_id, table in own_rows(conn, "copy_progress", cursors):
        found.append(f"copy progress of move {move_id} for {table}")
    for move_id, count in own_rows(conn, "copy_batches", "SELECT move_id, count(*) FROM {} GROUP BY 1 ORDER BY 1"):
        found.append(f"{count} copy batch proofs of move {move_id}")
    return found
