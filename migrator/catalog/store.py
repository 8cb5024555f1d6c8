"""The routing catalog: the one shared piece (stamps, tenant routes, moves and their progress).

Every change of a route goes through `flip`, a compare-and-set on (stamp, version), so two
operators racing on one tenant cannot both win. A move's phase lives here too: `move status` and
resume read the same truth.
"""

from __future__ import annotations

import select
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import astuple, dataclass
from dataclasses import fields as dataclass_fields
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import class_row

from migrator.catalog import audit, routes
from migrator.catalog.locks import TenantLock
from migrator.catalog.models import (
    FENCED_OFFLINE,
    FLIPPABLE,
    MOVE_FIELDS,
    TERMINAL,
    Limits,
    Mode,
    Move,
    Phase,
    Route,
    Stamp,
    StampState,
    TableProgress,
    describe_move,
    list_tenants,
)
from migrator.db import dsn as dsnlib
from migrator.db.retry import CATALOG
from migrator.errors import BadInput, LockBusy, MigratorError, RouteConflict

_LIMIT_COLUMNS = ", ".join(f.name for f in dataclass_fields(Limits))
_STAMP_COLUMNS = ", ".join(f.name for f in dataclass_fields(Stamp))  # as the Stamp dataclass lists them


class Catalog:
    """Access to the catalog database; short transactions, retried when the link flaps.

    Each public method is one step under the CATALOG retry policy; the private helpers they share
    take the step's connection and are never retried themselves, so attempts never multiply.
    """

    def __init__(self, url: str, actor: str | None = None) -> None:
        self.url = url
        self.actor = actor or audit.default_actor()  # who the audit trail names (global --actor, else $USER)
        self._local = threading.local()
        self._sessions: list[psycopg.Connection[Any]] = []
        self._sessions_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Catalog({dsnlib.mask(self.url)})"

    @contextmanager
    def transaction(self) -> Iterator[psycopg.Connection[Any]]:
        """One catalog transaction, committed on success, rolled back on error.

        The session is kept per thread: a move makes dozens of short catalog calls, and opening a
        session for each cost more than the calls. A broken session is dropped, so the retry of a
        transient error (catalog restart) reconnects.
        """
        if getattr(self._local, "busy", False):  # nested: a transaction of its own, as before
            with self.connect() as fresh:
                yield fresh
            return
        conn: psycopg.Connection[Any] | None = getattr(self._local, "conn", None)
        if conn is None or conn.closed or conn.broken or _hung_up(conn):
            conn = self._local.conn = self.connect()
            with self._sessions_lock:
                self._sessions = [c for c in self._sessions if not c.closed] + [conn]
        self._local.busy = True
        try:
            yield conn
            conn.commit()
        except BaseException:
            with suppress(psycopg.Error):  # a lost session cannot roll back; the original error says why
                conn.rollback()
            if conn.broken or conn.closed:
                self._local.conn = None
            raise
        finally:
            self._local.busy = False

    def connect(self, *, autocommit: bool = False) -> psycopg.Connection[Any]:
        """A new catalog session of its own; failing that, one line naming the catalog (password masked).

        A refused or lost connection (the catalog restarting) is retried first; wrong credentials
        or a malformed DSN fail at once (`is_transient`). Either way no caller retries the error again.
        """
        try:
            return connect_catalog(self.url, autocommit)
        except psycopg.Error as exc:
            raise MigratorError(
                f"cannot connect to the catalog ({dsnlib.mask(self.url)}): {dsnlib.reason(exc, self.url)}"
            ) from None

    def close(self) -> None:
        """Close the sessions kept for every thread (at the end of a command)."""
        with self._sessions_lock:
            sessions, self._sessions = self._sessions, []
        for conn in sessions:
            conn.close()

    # -- stamps -------------------------------------------------------------------------------

    @CATALOG.wraps
    def add_stamp(
        self,
        name: str,
        dsn: str,
        region: str | None = None,
        capacity_rows: int | None = None,
        capacity_bytes: int | None = None,
        kind: str = "shared",
    ) -> Stamp:
        with self.transaction() as conn:
            try:
                conn.execute(
                    "INSERT INTO stamps (name, dsn, region, capacity_rows, capacity_bytes, kind)"
                    " VALUES (%s, %s, %s, %s, %s, %s)",
                    (name, dsn, region, capacity_rows, capacity_bytes, kind),
                )
            except psycopg.errors.UniqueViolation:
                raise BadInput(f"stamp {name!r} already exists") from None
            return self._stamp(conn, name)

    @CATALOG.wraps
    def register_stamp(self, stamp: Stamp) -> Stamp:
        """Record a provisioned stamp (`stamp create`) with all its attributes, its state and key block
        included, in one transaction: either the whole row is there or nothing is.

        A name or key block another stamp took meanwhile is refused naming which (UNIQUE).
        """
        with self.transaction() as conn:
            try:
                conn.execute(
                    "INSERT INTO stamps (name, dsn, region, capacity_rows, capacity_bytes, state, key_block, kind)"
                    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                    (
                        stamp.name,
                        stamp.dsn,
                        stamp.region,
                        stamp.capacity_rows,
                        stamp.capacity_bytes,
                        stamp.state,
                        stamp.key_block,
                        stamp.kind,
                    ),
                )
            except psycopg.errors.UniqueViolation as exc:
                if "key_block" in (exc.diag.constraint_name or ""):
                    raise BadInput(f"key block {stamp.key_block} was given to another stamp meanwhile") from None
                raise BadInput(f"stamp {stamp.name!r} already exists") from None
            return self._stamp(conn, stamp.name)

    @CATALOG.wraps
    def retire_refusal(self, name: str) -> str | None:
        """Why retiring the stamp would be refused now (`set_stamp_state`'s own check), or None: for a
        plan that names what it cannot do before changing anything."""
        with self.transaction() as conn:
            self._stamp(conn, name)
            try:
                _refuse_retire(conn, name)
            except BadInput as exc:
                return str(exc)
        return None

    @CATALOG.wraps
    def update_stamp(self, name: str, **fields: Any) -> Stamp:
        allowed = {"dsn", "region", "capacity_rows", "capacity_bytes", "state", "kind"}
        changes = {k: v for k, v in fields.items() if k in allowed and v is not None}
        with self.transaction() as conn:
            self._stamp(conn, name)
            if changes:
                assignments = sql.SQL(", ").join(
                    sql.SQL("{} = {}").format(sql.Identifier(k), sql.Placeholder(k)) for k in changes
                )
                conn.execute(
                    sql.SQL("UPDATE stamps SET {} WHERE name = %(name)s").format(assignments), {**changes, "name": name}
                )
            return self._stamp(conn, name)

    @CATALOG.wraps
    def remove_stamp(self, name: str) -> None:
        """Delete a stamp nothing refers to: no route, no move in any phase, no plan entry.

        Checked and deleted in one transaction holding the stamp's row lock, so a route or move
        added meanwhile (its foreign key locks the row) either comes first and refuses, or waits.
        """
        with self.transaction() as conn:
            if conn.execute("SELECT 1 FROM stamps WHERE name = %s FOR UPDATE", (name,)).fetchone() is None:
                raise BadInput(f"unknown stamp {name!r}")
            _refuse_remove(conn, name)
            try:
                conn.execute("DELETE FROM stamps WHERE name = %s", (name,))
            except psycopg.errors.InsufficientPrivilege:
                role = conn.info.user
                raise MigratorError(
                    f"`migrator stamp remove` needs DELETE on stamps, which role {role} lacks; run it as the "
                    f"catalog's owner, or GRANT DELETE ON stamps TO {role}"
                ) from None

    @CATALOG.wraps
    def set_stamp_state(self, name: str, state: StampState) -> Stamp:
        """Mark a stamp active, draining or retired; retiring is refused while a tenant is routed there
        or an unfinished move touches it, checked and changed in one transaction holding the stamp's row."""
        with self.transaction() as conn:
            if conn.execute("SELECT 1 FROM stamps WHERE name = %s FOR UPDATE", (name,)).fetchone() is None:
                raise BadInput(f"unknown stamp {name!r}")
            if state == StampState.RETIRED:
                _refuse_retire(conn, name)
            conn.execute("UPDATE stamps SET state = %s WHERE name = %s", (state, name))
            return self._stamp(conn, name)

    @CATALOG.wraps
    def stamp(self, name: str) -> Stamp:
        """The stamp called `name`, or a clear error naming it."""
        with self.transaction() as conn:
            return self._stamp(conn, name)

    @staticmethod
    def _stamp(conn: psycopg.Connection[Any], name: str) -> Stamp:
        with conn.cursor(row_factory=class_row(Stamp)) as cur:
            cur.execute(f"SELECT {_STAMP_COLUMNS} FROM stamps WHERE name = %s", (name,))
            found = cur.fetchone()
        if found is None:
            raise BadInput(f"unknown stamp {name!r}")
        return found

    @CATALOG.wraps
    def stamps(self) -> list[Stamp]:
        with self.transaction() as conn, conn.cursor(row_factory=class_row(Stamp)) as cur:
            cur.execute(f"SELECT {_STAMP_COLUMNS} FROM stamps ORDER BY name")
            return cur.fetchall()

    @CATALOG.wraps
    def assign_key_blocks(self, names: Sequence[str]) -> list[Stamp]:
        """Give each named stamp that has none the next block of sequence values, in the order given;
        returns every stamp. One transaction: blocks are never shared (UNIQUE) and the stamps' rows
        are locked, so two operators striding at once assign each block once."""
        with self.transaction() as conn:
            conn.execute("SELECT 1 FROM stamps ORDER BY name FOR UPDATE")
            for name in names:
                conn.execute(
                    "UPDATE stamps SET key_block = (SELECT coalesce(max(key_block), 0) + 1 FROM stamps)"
                    " WHERE name = %s AND key_block IS NULL",
                    (name,),
                )
            with conn.cursor(row_factory=class_row(Stamp)) as cur:
                cur.execute(f"SELECT {_STAMP_COLUMNS} FROM stamps ORDER BY name")
                return cur.fetchall()

    # -- the fleet's throttle limits ------------------------------------------------------------

    @CATALOG.wraps
    def limits(self) -> Limits:
        """The fleet's throttle limits (`migrator throttle show`); none set is no limit."""
        with self.transaction() as conn:
            row = conn.execute(f"SELECT {_LIMIT_COLUMNS} FROM throttle").fetchone()
        return Limits(*row) if row else Limits()

    @CATALOG.wraps
    def set_limits(self, limits: Limits) -> Limits:
        """Replace the fleet's throttle limits; running moves read them within seconds."""
        with self.transaction() as conn:
            values = astuple(limits)
            conn.execute(
                f"INSERT INTO throttle AS t ({_LIMIT_COLUMNS}) VALUES ({', '.join(['%s'] * len(values))})"
                f" ON CONFLICT (id) DO UPDATE SET ({_LIMIT_COLUMNS}, updated_at) ="
                f" ({', '.join(f'excluded.{f.name}' for f in dataclass_fields(Limits))}, now())",
                values,
            )
        return limits

    # -- routes -------------------------------------------------------------------------------

    @CATALOG.wraps
    def set_route(self, tenant: str, stamp: str) -> Route:
        """Register a tenant's home (with its audit record); changing an existing route this way is
        refused (use a move)."""
        with self.transaction() as conn:
            self._stamp(conn, stamp)
            current = self._route(conn, tenant)
            if current is not None and current.stamp != stamp:
                raise BadInput(
                    f"tenant {tenant} is already routed to {current.stamp}; use `migrator move` to change it"
                )
            if current is None:
                conn.execute("INSERT INTO routes (tenant, stamp) VALUES (%s, %s)", (tenant, stamp))
                audit.record(conn, self.actor, audit.Event(audit.Action.ROUTE_SET, [tenant], to_stamp=stamp))
            return self._route(conn, tenant)  # type: ignore[return-value]

    @CATALOG.wraps
    def import_routes(
        self, routes: Sequence[tuple[str, str]], residency: Mapping[str, Sequence[str]] | None = None
    ) -> tuple[list[str], list[str]]:
        """Register many (tenant, stamp) routes in one transaction: all of them, or none, with the
        `residency` of the tenants given one (`route import FILE`'s third column).

        Refused (nothing written) naming every unknown stamp, or every tenant already routed to
        another stamp; a tenant already routed to its stamp is left as it is, so a re-run changes
        nothing. Returns the tenants routed now and those that were already there.
        """
        tenants, homes = [tenant for tenant, _ in routes], [stamp for _, stamp in routes]
        with self.transaction() as conn:
            named = sorted(set(homes))
            known = {row[0] for row in conn.execute("SELECT name FROM stamps WHERE name = ANY(%s)", (named,))}
            unknown = [stamp for stamp in named if stamp not in known]
            if unknown:
                raise BadInput(
                    f"unknown stamp(s) {', '.join(unknown)}; nothing imported (register a stamp with "
                    "`migrator stamp add`)"
                )
            inserted = {
                row[0]
                for row in conn.execute(
                    "INSERT INTO routes (tenant, stamp) SELECT * FROM unnest(%s::text[], %s::text[])"
                    " ON CONFLICT (tenant) DO NOTHING RETURNING tenant",
                    (tenants, homes),
                )
            }
            current = dict(
                conn.execute("SELECT tenant, stamp FROM routes WHERE tenant = ANY(%s)", (tenants,)).fetchall()
            )
            elsewhere = [(tenant, stamp) for tenant, stamp in routes if current[tenant] != stamp]
            if elsewhere:
                shown = _some([f"{t} (on {current[t]}, not {s})" for t, s in elsewhere], limit=10)
                raise BadInput(
                    f"{len(elsewhere)} tenant(s) already routed to another stamp: {shown}; nothing imported "
                    "(only `migrator move` changes a route; a moved tenant's leftover rows go with `migrator cleanup`)"
                )
            for home in named:
                arrived = [tenant for tenant, stamp in routes if stamp == home and tenant in inserted]
                if arrived:
                    audit.record(conn, self.actor, audit.Event(audit.Action.ROUTE_IMPORT, arrived, to_stamp=home))
            if residency:
                conn.execute(
                    "INSERT INTO tenants AS t (tenant, residency) SELECT u.tenant, string_to_array(u.regions, '|')"
                    " FROM unnest(%s::text[], %s::text[]) AS u(tenant, regions) ON CONFLICT (tenant)"
                    " DO UPDATE SET residency = EXCLUDED.residency, updated_at = now()",
                    (list(residency), ["|".join(regions) for regions in residency.values()]),
                )
        return [t for t in tenants if t in inserted], [t for t in tenants if t not in inserted]

    @staticmethod
    def _route(conn: psycopg.Connection[Any], tenant: str) -> Route | None:
        with conn.cursor(row_factory=class_row(Route)) as cur:
            cur.execute("SELECT tenant, stamp, version, state, updated_at FROM routes WHERE tenant = %s", (tenant,))
            return cur.fetchone()

    @CATALOG.wraps
    def find_route(self, tenant: str) -> Route | None:
        with self.transaction() as conn:
            return self._route(conn, tenant)

    def route(self, tenant: str) -> Route:
        found = self.find_route(tenant)
        if found is None:
            raise BadInput(
                f"unknown tenant {tenant!r} (no route in the catalog; register it with `migrator route set` "
                "or `migrator route import`)"
            )
        return found

    @CATALOG.wraps
    def routes(self, stamp: str | None = None) -> list[Route]:
        with self.transaction() as conn, conn.cursor(row_factory=class_row(Route)) as cur:
            cur.execute(
                "SELECT tenant, stamp, version, state, updated_at FROM routes"
                " WHERE %(stamp)s::text IS NULL OR stamp = %(stamp)s ORDER BY stamp, length(tenant), tenant",
                {"stamp": stamp},
            )
            return cur.fetchall()

    @CATALOG.wraps
    def set_route_state(self, tenants: Sequence[str], state: str) -> None:
        """Mark routes fenced/active for the router's information; the database fence is the guard."""
        with self.transaction() as conn:
            conn.execute(
                "UPDATE routes SET state = %s, updated_at = now() WHERE tenant = ANY(%s)", (state, list(tenants))
            )

    def announce_cutover(self, move: Move) -> None:
        """Tell routers the move's tenants are about to live on its target (`routes.announce_cutover`)."""
        with self.transaction() as conn:
            routes.announce_cutover(conn, list(move.tenants), move.target)

    def flip(
        self, move: Move, conn: psycopg.Connection[Any], freeze_ms: float | None = None, *, window: bool = False
    ) -> list[Route]:
        """Compare-and-set every route of the move's cohort from its source to its target, mark the
        move flipped (with its revert window open, if `window`: the target captures already) and
        append its audit record: all of it, or none. A revert also ends its forward move, `reverted`.

        One catalog transaction on `conn` (the tenant lock's own session, so no new connection is
        opened while writes are frozen): a crash leaves either the old routes with the move still
        open, or the new routes with the move flipped. A route changed meanwhile (another operator's
        flip) fails the whole transaction, naming it. Never retried: a retry could not replace
        `conn`, so a lost session fails at once and the caller's move stays resumable.
        """
        # One round trip for all of it (a pipeline: this is the write freeze's last step); a route
        # found changed rolls back what was sent after it.
        with conn.pipeline(), conn.transaction():
            return self._flip_in(conn, move, freeze_ms, window)

    def rehearse_flip(self, move: Move, conn: psycopg.Connection[Any], *, window: bool = False) -> None:
        """The flip's statements once on its session before the write freeze, rolled back (and no
        audit record, whose ids have no gaps): a session's first statements on these tables cost
        about 5 ms more, 10 under load (its caches, the notify trigger's compile), which the freeze
        then does not pay. A route changed meanwhile is found here too, before any write is frozen."""
        with conn.pipeline(), conn.transaction(force_rollback=True):
            self._flip_in(conn, move, None, window, audited=False)

    def _flip_in(
        self, conn: psycopg.Connection[Any], move: Move, freeze_ms: float | None, window: bool, *, audited: bool = True
    ) -> list[Route]:
        """`flip`'s statements in the caller's transaction; raises RouteConflict where a route changed."""
        cas = conn.execute(
            "UPDATE routes r SET stamp = %(target)s, version = r.version + 1, state = 'active',"
            " updated_at = now() FROM move_tenants mt WHERE mt.move_id = %(move)s AND r.tenant = mt.tenant"
            " AND r.stamp = %(source)s AND r.version = mt.route_version RETURNING r.tenant",
            {"target": move.target, "source": move.source, "move": move.id},
        )
        conn.execute(
            "UPDATE moves SET phase = %s, updated_at = now(), finished_at = now(), error = NULL,"
            " freeze_ms = coalesce(%s, freeze_ms), window_opened_at = CASE WHEN %s THEN now() END"
            " WHERE id = %s AND phase = ANY(%s)",
            (Phase.FLIPPED, freeze_ms, window, move.id, sorted(FLIPPABLE)),
        )
        conn.execute("UPDATE move_tenants SET open = false WHERE move_id = %s", (move.id,))
        if move.reverts is not None:
            conn.execute(
                "UPDATE moves SET phase = %s, window_closed_at = now(), updated_at = now() WHERE id = %s",
                (Phase.REVERTED, move.reverts),
            )
        if audited:
            action = audit.Action.MOVE if move.reverts is None else audit.Action.REVERT
            audit.record(conn, self.actor, audit.Event(action, move.tenants, move.source, move.target, move.id))
        routes = self._routes_cursor(conn, move.tenants)
        flipped = {row[0] for row in cas.fetchall()}
        changed = [tenant for tenant in move.tenants if tenant not in flipped]
        if changed:
            current = self._route(conn, changed[0])
            where = f"{current.stamp} v{current.version}" if current else "nowhere"
            expected = move.route_versions[move.tenants.index(changed[0])]
            raise RouteConflict(
                f"route of tenant {changed[0]} changed under move {move.id}: expected {move.source} "
                f"v{expected}, found {where}; "
                + ("not flipped" if len(move.tenants) == 1 else f"none of its {len(move.tenants)} routes flipped")
            )
        return routes.fetchall()

    @staticmethod
    def _routes_of(conn: psycopg.Connection[Any], tenants: Sequence[str]) -> list[Route]:
        """The routes of these tenants, in their order."""
        with Catalog._routes_cursor(conn, tenants) as cur:
            return cur.fetchall()

    @staticmethod
    def _routes_cursor(conn: psycopg.Connection[Any], tenants: Sequence[str]) -> psycopg.Cursor[Route]:
        """A cursor reading the routes of these tenants, in their order (fetched when the caller needs them)."""
        cur = conn.cursor(row_factory=class_row(Route))
        cur.execute(
            "SELECT r.tenant, r.stamp, r.version, r.state, r.updated_at FROM unnest(%s::text[])"
            " WITH ORDINALITY AS t(tenant, n) JOIN routes r USING (tenant) ORDER BY t.n",
            (list(tenants),),
        )
        return cur

    @CATALOG.wraps
    def routes_of(self, tenants: Sequence[str]) -> list[Route]:
        """The routes of these tenants (unknown ones are left out)."""
        with self.transaction() as conn:
            return self._routes_of(conn, tenants)

    # -- moves --------------------------------------------------------------------------------

    # Every column of `moves`, then the cohort from `move_tenants`, as the Move dataclass lists them.
    _MOVE_SELECT = sql.SQL(
        "SELECT {},"
        " ARRAY(SELECT mt.tenant FROM move_tenants mt WHERE mt.move_id = moves.id ORDER BY mt.position) AS tenants,"
        " ARRAY(SELECT mt.route_version FROM move_tenants mt WHERE mt.move_id = moves.id ORDER BY mt.position)"
        " AS route_versions FROM moves"
    ).format(
        sql.SQL(", ").join(
            sql.Identifier(f.name) for f in dataclass_fields(Move) if f.name not in ("tenants", "route_versions")
        )
    )

    @classmethod
    def _select_moves(cls, conn: psycopg.Connection[Any], where: str, params: Any) -> list[Move]:
        with conn.cursor(row_factory=class_row(Move)) as cur:
            cur.execute(sql.SQL("{} WHERE {}").format(cls._MOVE_SELECT, sql.SQL(where)), params)  # type: ignore[arg-type]
            return cur.fetchall()

    @CATALOG.wraps
    def create_move(
        self,
        routes: Sequence[Route],
        target: str,
        mode: Mode,
        batch_rows: int,
        schema_revision: str | None = None,
        reverts: int | None = None,
    ) -> Move:
        """Record a new move of the cohort whose current routes are `routes` (all on one source); a
        revert names the flipped move it takes back (`reverts`) and starts `synced`: it has no copy to make.

        Refused, naming the holder, when one of its tenants already has an unfinished move (the
        unique index over open `move_tenants` rows).
        """
        tenants = [r.tenant for r in routes]
        try:
            with self.transaction() as conn:
                row = conn.execute(
                    "INSERT INTO moves (tenant, source, target, mode, phase, route_version, batch_rows,"
                    " schema_revision, reverts) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id",
                    (tenants[0], routes[0].stamp, target, mode, Phase.CREATED if reverts is None else Phase.SYNCED,
                     routes[0].version, batch_rows, schema_revision, reverts),
                ).fetchone()  # fmt: skip
                assert row is not None
                conn.execute(
                    "INSERT INTO move_tenants (move_id, position, tenant, route_version)"
                    " SELECT %s, n - 1, t, v FROM unnest(%s::text[], %s::bigint[]) WITH ORDINALITY AS u(t, v, n)",
                    (row[0], tenants, [r.version for r in routes]),
                )
                return self._select_moves(conn, "id = %s", (row[0],))[0]
        except psycopg.errors.UniqueViolation:
            with self.transaction() as conn:
                holders = self._open_moves(conn, tenants)
            holder = holders[0] if holders else None
            busy = next((t for t in tenants if holder and t in holder.tenants), tenants[0])
            raise LockBusy(
                f"tenant {busy} already has an unfinished {describe_move(holder) if holder else 'move'}; "
                f"see `migrator move status{f' {holder.id}' if holder else ''}`"
            ) from None

    @CATALOG.wraps
    def find_move(self, move_id: int) -> Move | None:
        with self.transaction() as conn:
            found = self._select_moves(conn, "id = %s", (move_id,))
            return found[0] if found else None

    def move(self, move_id: int) -> Move:
        found = self.find_move(move_id)
        if found is None:
            raise BadInput(f"unknown move {move_id}")
        return found

    @CATALOG.wraps
    def open_move(self, tenant: str) -> Move | None:
        """The tenant's unfinished move, if any (there is at most one)."""
        with self.transaction() as conn:
            found = self._open_moves(conn, [tenant])
            return found[0] if found else None

    @CATALOG.wraps
    def open_moves(self, tenants: Sequence[str]) -> list[Move]:
        """The unfinished moves holding any of these tenants, by id."""
        with self.transaction() as conn:
            return self._open_moves(conn, tenants)

    @classmethod
    def _open_moves(cls, conn: psycopg.Connection[Any], tenants: Sequence[str]) -> list[Move]:
        return cls._select_moves(
            conn,
            "id IN (SELECT move_id FROM move_tenants WHERE open AND tenant = ANY(%s)) ORDER BY id",
            (list(tenants),),
        )

    @CATALOG.wraps
    def fenced_moves(self, stamps: Sequence[str]) -> list[Move]:
        """The moves whose source or target is one of `stamps` and that fence it now: in their cutover,
        or offline from their guard to their flip (a schema change there would stall or break them)."""
        with self.transaction() as conn:
            return self._select_moves(
                conn,
                "(phase = %(cutover)s OR (mode = %(offline)s AND phase = ANY(%(fenced)s)))"
                " AND (source = ANY(%(stamps)s) OR target = ANY(%(stamps)s)) ORDER BY id",
                {"cutover": Phase.CUTOVER, "offline": Mode.OFFLINE, "fenced": sorted(FENCED_OFFLINE),
                 "stamps": list(stamps)},
            )  # fmt: skip

    @CATALOG.wraps
    def moves(self, tenant: str | None = None, limit: int = 50) -> list[Move]:
        """The latest moves, of one tenant (alone or in a cohort) if given."""
        with self.transaction() as conn:
            return self._select_moves(
                conn,
                "%(t)s::text IS NULL OR id IN (SELECT move_id FROM move_tenants WHERE tenant = %(t)s)"
                " ORDER BY id DESC LIMIT %(limit)s",
                {"t": tenant, "limit": limit},
            )

    @CATALOG.wraps
    def update_move(self, move_id: int, **fields: Any) -> Move:
        """Record a phase change, counters, checksums or an error on the move.

        A final phase also releases its tenants from the open-move index, in the same transaction.
        """
        unknown = set(fields) - MOVE_FIELDS
        if unknown:
            raise ValueError(f"not a move field: {sorted(unknown)}")
        assignments: list[sql.Composable] = [
            sql.SQL("{} = {}").format(sql.Identifier(k), sql.Placeholder(k)) for k in fields
        ]
        assignments.append(sql.SQL("updated_at = now()"))
        with self.transaction() as conn:
            cur = conn.execute(
                sql.SQL("UPDATE moves SET {} WHERE id = %(id)s").format(sql.SQL(", ").join(assignments)),
                {**fields, "id": move_id},
            )
            if cur.rowcount != 1:
                raise BadInput(f"unknown move {move_id}")
            if fields.get("phase") in TERMINAL:
                conn.execute("UPDATE move_tenants SET open = false WHERE move_id = %s", (move_id,))
            return self._select_moves(conn, "id = %s", (move_id,))[0]

    @CATALOG.wraps
    def open_windows(self, tenants: Sequence[str]) -> list[Move]:
        """The flipped moves holding any of these tenants whose revert window is still open, by id."""
        with self.transaction() as conn:
            return self._select_moves(
                conn,
                "phase = %s AND window_opened_at IS NOT NULL AND window_closed_at IS NULL"
                " AND id IN (SELECT move_id FROM move_tenants WHERE tenant = ANY(%s)) ORDER BY id",
                (Phase.FLIPPED, list(tenants)),
            )

    @CATALOG.wraps
    def reverts_of(self, move_id: int) -> list[Move]:
        """The reverts of a move (an aborted one, then another), by id."""
        with self.transaction() as conn:
            return self._select_moves(conn, "reverts = %s ORDER BY id", (move_id,))

    @CATALOG.wraps
    def close_window(self, move_id: int) -> None:
        """The move's revert window is closed: cleanup dropped the target's capture of its tenants."""
        with self.transaction() as conn:
            conn.execute(
                "UPDATE moves SET window_closed_at = now(), updated_at = now()"
                " WHERE id = %s AND window_opened_at IS NOT NULL AND window_closed_at IS NULL",
                (move_id,),
            )

    @CATALOG.wraps
    def save_tables(self, move_id: int, tables: list[TableProgress]) -> None:
        """Upsert per-table progress (informational: the target holds the authoritative cursor)."""
        with self.transaction() as conn, conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO move_tables (move_id, table_name, position, rows_total, rows_copied, done,"
                " source_checksum, target_checksum) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (move_id, table_name) DO UPDATE SET position = EXCLUDED.position,"
                " rows_total = EXCLUDED.rows_total, rows_copied = EXCLUDED.rows_copied, done = EXCLUDED.done,"
                " source_checksum = EXCLUDED.source_checksum, target_checksum = EXCLUDED.target_checksum",
                [
                    (
                        move_id,
                        t.table_name,
                        t.position,
                        t.rows_total,
                        t.rows_copied,
                        t.done,
                        t.source_checksum,
                        t.target_checksum,
                    )
                    for t in tables
                ],
            )

    @CATALOG.wraps
    def tables(self, move_id: int) -> list[TableProgress]:
        with self.transaction() as conn, conn.cursor(row_factory=class_row(TableProgress)) as cur:
            cur.execute(
                "SELECT move_id, table_name, position, rows_total, rows_copied, done, source_checksum,"
                " target_checksum FROM move_tables WHERE move_id = %s ORDER BY position",
                (move_id,),
            )
            return cur.fetchall()

    # -- access -------------------------------------------------------------------------------

    @CATALOG.wraps
    def grant_reader(self, role: str) -> str:
        """Let an application role read routes, and nothing else: stamps' DSNs hold passwords.

        Grants CONNECT on the catalog database, USAGE on the routes table's schema and SELECT on
        routes; returns the schema-qualified routes table. Run it as the catalog's owner.
        """
        with self.transaction() as conn:
            if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone() is None:
                raise BadInput(f"role {role!r} does not exist; create it first (CREATE ROLE ... LOGIN PASSWORD ...)")
            row = conn.execute(
                "SELECT n.nspname::text, current_database()::text FROM pg_class c"
                " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = to_regclass('routes')"
            ).fetchone()
            if row is None:
                raise BadInput("the catalog has no routes table; run `migrator catalog init` first")
            schema, database = row
            grantee = sql.Identifier(role)
            conn.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(sql.Identifier(database), grantee))
            conn.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(sql.Identifier(schema), grantee))
            conn.execute(sql.SQL("GRANT SELECT ON TABLE {} TO {}").format(sql.Identifier(schema, "routes"), grantee))
        return f"{schema}.routes"

    # -- locks --------------------------------------------------------------------------------

    def lock_tenants(self, tenants: Sequence[str]) -> TenantLock:
        """Take the move lock of every tenant of a cohort, or fail at once naming a holder; see TenantLock."""
        return TenantLock(lambda: self.connect(autocommit=True), tuple(tenants), self.open_move)


@dataclass(frozen=True)
class _Uses:
    """What in the catalog still refers to a stamp: the one check behind `stamp remove` and retiring."""

    routed: list[str]  # tenants routed to it, in tenant order
    moves: list[Move]  # every move from or to it, any phase, by id
    entries: int  # plan entries from or to it

    @property
    def open_moves(self) -> list[Move]:
        return [m for m in self.moves if m.is_open]


def _uses(conn: psycopg.Connection[Any], name: str) -> _Uses:
    routed = [row[0] for row in conn.execute("SELECT tenant FROM routes WHERE stamp = %s", (name,))]
    routed.sort(key=lambda t: (len(t), t))
    moves = Catalog._select_moves(conn, "source = %(s)s OR target = %(s)s ORDER BY id", {"s": name})
    row = conn.execute("SELECT count(*) FROM plan_moves WHERE source = %s OR target = %s", (name, name)).fetchone()
    return _Uses(routed, moves, int(row[0]) if row else 0)


def _refuse_remove(conn: psycopg.Connection[Any], name: str) -> None:
    """Name what still refers to the stamp, and what to do instead of removing it."""
    uses = _uses(conn, name)
    routed, moves, entries = uses.routed, [str(m.id) for m in uses.moves], uses.entries
    found = [
        *([f"{len(routed)} tenant(s) routed to it ({_some(routed)})"] if routed else []),
        *([f"{len(moves)} move(s) from or to it (ids {_some(moves)})"] if moves else []),
        *([f"{entries} plan entr{'y' if entries == 1 else 'ies'} from or to it"] if entries else []),
    ]
    if not found:
        return
    todo = (
        f"move its tenants away first (`migrator plan drain {name}`, then `migrator apply`)"
        if routed
        else f"the catalog keeps that history; retire the stamp instead (`migrator stamp set-state {name} retired`)"
    )
    raise BadInput(f"stamp {name} is not removed: {'; '.join(found)}; {todo}")


def _refuse_retire(conn: psycopg.Connection[Any], name: str) -> None:
    """A stamp is retired only when no tenant is routed to it and no unfinished move touches it."""
    uses = _uses(conn, name)
    if uses.routed:
        raise BadInput(
            f"stamp {name} still has {len(uses.routed)} tenant(s) routed to it ({_some(uses.routed)}); drain it "
            f"first (`migrator plan drain {name}`, then `migrator apply`)"
        )
    moves = uses.open_moves
    if moves:
        listed = ", ".join(f"move {m.id} ({list_tenants(m.tenants)})" for m in moves[:5])
        raise BadInput(f"stamp {name} is touched by {len(moves)} unfinished move(s): {listed}; finish or abort them")


def _some(items: Sequence[str], limit: int = 5) -> str:
    """The first few items of a list for a one-line message."""
    return ", ".join(items[:limit]) + (", ..." if len(items) > limit else "")


@CATALOG.wraps
def connect_catalog(url: str, autocommit: bool) -> psycopg.Connection[Any]:
    """A catalog session, retried while the catalog is unreachable for a moment (restart, failover).

    The connect is its own step under CATALOG: a public method retried after its session broke
    reconnects through here, and a catalog that stays away ends as one MigratorError naming it,
    which no outer policy retries again."""
    return dsnlib.connect(url, autocommit=autocommit)


def _hung_up(conn: psycopg.Connection[Any]) -> bool:
    """An idle session whose socket is readable was ended by the server (terminated, restarted).

    Checked without a round trip before reusing a kept session, so a catalog restart between two
    calls costs a reconnect, not a failed call.
    """
    readable, _, _ = select.select([conn.fileno()], [], [], 0)
    if readable:
        conn.close()
    return bool(readable)
