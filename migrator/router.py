"""The application's side of a move: route by the catalog, ride through the cutover.

    from migrator.router import Router, TenantFenced, UnknownTenant

    with Router(catalog_url, stamps={"stamp-1": "postgresql://app@host1/db"}) as router:
        router.stamp_of(tenant)                          # cached
        with router.connection(tenant) as conn: ...      # pooled connection to the tenant's stamp
        router.run(tenant, fn, deadline_s=10.0)          # fn(conn) in a transaction, retried on MGF01

The cache is kept fresh by the catalog's pushed notifications (channel `migrator_routes`, sent by a
trigger on `routes` when a change commits): one listening connection per router, so a flip reaches
every router within milliseconds instead of a TTL. A route's version guards the cache: an answer
read before a flip can never overwrite the newer entry a notification brought. When the listening
connection is lost, every entry is marked stale (re-read on next use) until it is back; the TTL
remains the fallback for anything missed.

`run` retries a transaction that failed because the tenant is fenced (SQLSTATE `MGF01`) or because
the connection to the stamp was lost before the commit was sent, after re-resolving the tenant; it
never retries other errors, nor a commit whose outcome is unknown.

Only psycopg and psycopg's pool are needed: no Click, Alembic or SQLAlchemy is imported here. The
catalog connection needs only what `migrator catalog grant-reader ROLE` grants (SELECT on routes).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any, TypeVar

import psycopg
from psycopg import sql
from psycopg_pool import ConnectionPool

from migrator.catalog.routes import CUTOVER_CHANNEL, route_of
from migrator.db.dsn import mask, normalize
from migrator.sqlstates import FENCED_SQLSTATE

__all__ = ["RouteChange", "Router", "RouterStats", "TenantFenced", "UnknownTenant", "watch_routes"]

log = logging.getLogger("migrator.router")

CHANNEL = "migrator_routes"  # see the catalog revision 0004_route_notify
APPLICATION_NAME = "migrator-router"
CATALOG_TIMEOUT_S = 2.0  # longest wait for a catalog session when re-reading a route

T = TypeVar("T")


class UnknownTenant(LookupError):
    """The catalog has no route for the tenant."""


class TenantFenced(RuntimeError):
    """The tenant stayed fenced (or its stamp unreachable) until `run`'s deadline passed."""


@dataclass(frozen=True)
class RouteChange:
    """One change of a route, as the catalog's trigger announced it."""

    tenant: str
    stamp: str
    version: int
    state: str
    op: str  # insert, update or delete

    @classmethod
    def parse(cls, payload: str) -> RouteChange:
        data = json.loads(payload)
        return cls(str(data["tenant"]), str(data["stamp"]), int(data["version"]), str(data["state"]), str(data["op"]))


@dataclass
class RouterStats:
    """Counters for an application's dashboards (and the tests): how the cache was kept."""

    lookups: int = 0  # catalog reads of a route
    notifications: int = 0  # route changes received
    fenced_retries: int = 0  # transactions retried because the tenant was fenced
    lost_connections: int = 0  # transactions retried because the stamp's connection was lost
    listener_reconnects: int = 0


@dataclass(frozen=True)
class _Entry:
    stamp: str
    version: int
    expires: float  # monotonic; 0 = stale, re-read on next use (the version still guards)
    updated: float  # monotonic time this version was first cached: how fast a flip arrived


def watch_routes(
    catalog_url: str,
    stop: threading.Event | None = None,
    on_listening: Callable[[], None] | None = None,
    on_lost: Callable[[BaseException], None] | None = None,
    poll_s: float = 0.5,
    on_cutover: Callable[[str, str], None] | None = None,
) -> Iterator[RouteChange]:
    """Every route change as it commits, until `stop` is set; reconnects when the connection drops.

    `on_listening` runs each time LISTEN is in place (after a reconnect too: changes made while it
    was away were not seen, so a cache must re-read); `on_lost` when the connection was lost;
    `on_cutover(tenant, stamp)` (listened to only if given) when a move is about to flip a tenant to `stamp`.
    """
    stop = stop or threading.Event()
    backoff = 0.05
    while not stop.is_set():
        try:
            with psycopg.connect(
                normalize(catalog_url),
                autocommit=True,
                connect_timeout=10,
                application_name=f"{APPLICATION_NAME}-listen",
            ) as conn:
                conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(CHANNEL)))
                if on_cutover is not None:
                    conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(CUTOVER_CHANNEL)))
                backoff = 0.05
                if on_listening is not None:
                    on_listening()
                yield from _notified(conn, stop, poll_s, on_cutover)
        except psycopg.Error as exc:
            if on_lost is not None:
                on_lost(exc)
            log.warning("route notifications lost (%s); reconnecting", (str(exc).strip() or repr(exc)).splitlines()[0])
            stop.wait(backoff)
            backoff = min(2.0, backoff * 2)


def _notified(
    conn: psycopg.Connection[Any], stop: threading.Event, poll_s: float, cutover: Callable[[str, str], None] | None
) -> Iterator[RouteChange]:
    """The route changes notified on a listening connection, until `stop` is set or it is lost (raises);
    announced cutovers go to `cutover`."""
    while not stop.is_set():
        for notify in conn.notifies(timeout=poll_s):
            if notify.channel == CUTOVER_CHANNEL:
                if cutover is not None:
                    data = json.loads(notify.payload)
                    cutover(str(data["tenant"]), str(data["stamp"]))
                continue
            yield RouteChange.parse(notify.payload)
        conn.execute("SELECT 1")  # notice a connection the server ended while we were idle


class Router:
    """Tenant -> stamp routing for applications, with pushed invalidation and fence-aware retries.

    Thread-safe: one cache, one listening connection, one pool per stamp (and one for the catalog).
    `stamps` maps a stamp name to the application's own DSN for it (its role, its credentials), or
    is a callable doing the same.
    """

    def __init__(
        self,
        catalog_url: str,
        stamps: Mapping[str, str] | Callable[[str], str],
        *,
        ttl_s: float = 30.0,
        pool_size: int = 4,
        listen: bool = True,
    ) -> None:
        self._catalog_url = catalog_url
        self._stamp_dsn: Callable[[str], str] = stamps if callable(stamps) else dict(stamps).__getitem__
        self._ttl_s = ttl_s
        self._pool_size = pool_size
        self._cache: dict[str, _Entry] = {}
        self._epoch = 0  # bumped whenever every entry is marked stale (notifications were lost)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # notified whenever a route's version changes
        self._pools: dict[str, ConnectionPool[psycopg.Connection[Any]]] = {}
        self._closed = threading.Event()
        self._listening = threading.Event()
        self.stats = RouterStats()
        self._catalog = ConnectionPool(
            normalize(catalog_url),
            min_size=1,
            max_size=2,
            kwargs={"autocommit": True, "application_name": APPLICATION_NAME},
            name="migrator-router-catalog",
            open=True,
        )
        self._listener: threading.Thread | None = None
        if listen:
            self._listener = threading.Thread(target=self._listen, name="migrator-router-listen", daemon=True)
            self._listener.start()
            self._listening.wait(5)

    def __repr__(self) -> str:
        return f"Router({mask(self._catalog_url)})"

    # -- routing ------------------------------------------------------------------------------

    def stamp_of(self, tenant: str) -> str:
        """The tenant's stamp: from the cache while it is fresh, else read from the catalog."""
        tenant = str(tenant)
        entry = self._cache.get(tenant)
        if entry is not None and entry.expires > time.monotonic():
            return entry.stamp
        return self._lookup(tenant)

    def version_of(self, tenant: str) -> int | None:
        """The version of the cached route (None when not cached): what the cache believes now."""
        entry = self._cache.get(str(tenant))
        return entry.version if entry else None

    def updated_at(self, tenant: str) -> float | None:
        """When (time.monotonic) the cached route's current version was first cached."""
        entry = self._cache.get(str(tenant))
        return entry.updated if entry else None

    def _lookup(self, tenant: str) -> str:
        epoch = self._epoch
        try:
            with self._catalog.connection(timeout=CATALOG_TIMEOUT_S) as conn:
                row = route_of(conn, tenant)
        except psycopg.OperationalError:
            entry = self._cache.get(tenant)
            if entry is None:
                raise
            return entry.stamp  # the catalog is away: the last route known, as any cache would answer
        self._count("lookups")
        if row is None:
            raise UnknownTenant(f"unknown tenant {tenant!r} (no route in the catalog)")
        self._before_store(tenant)
        # Read while notifications were (or went) missing: keep it, but re-read it on next use.
        fresh = epoch == self._epoch and (self._listener is None or self._listening.is_set())
        return self._store(tenant, row[0], row[1], fresh=fresh)

    def _before_store(self, tenant: str) -> None:
        """Between reading a route and caching it; a test hook to widen the race with a flip."""

    def _store(self, tenant: str, stamp: str, version: int, *, fresh: bool = True) -> str:
        """Cache a route unless a newer version is cached already; returns what is cached now."""
        now = time.monotonic()
        with self._lock:
            current = self._cache.get(tenant)
            if current is not None and current.version > version:
                return current.stamp
            changed = now if current is None or current.version != version else current.updated
            self._cache[tenant] = _Entry(stamp, version, now + self._ttl_s if fresh else 0.0, changed)
            if changed == now:
                self._changed.notify_all()
            return stamp

    def _stale(self, tenant: str | None = None) -> None:
        """Mark one entry (or all) to be re-read on next use; versions stay, to guard against stale reads."""
        with self._lock:
            keys = [tenant] if tenant is not None else list(self._cache)
            for key in keys:
                entry = self._cache.get(key)
                if entry is not None:
                    self._cache[key] = _Entry(entry.stamp, entry.version, 0.0, entry.updated)
            if tenant is None:
                self._epoch += 1

    def _count(self, counter: str) -> None:
        with self._lock:
            setattr(self.stats, counter, getattr(self.stats, counter) + 1)

    def _listen(self) -> None:
        first = True

        def listening() -> None:
            nonlocal first
            if not first:
                self._count("listener_reconnects")
            first = False
            self._stale()  # whatever changed while nobody listened is re-read
            self._listening.set()

        def lost(exc: BaseException) -> None:
            self._listening.clear()
            self._stale()

        for change in watch_routes(self._catalog_url, self._closed, listening, lost, on_cutover=self._warm_up):
            self._count("notifications")
            if change.op == "delete":
                with self._lock:
                    self._cache.pop(change.tenant, None)
            else:
                self._store(change.tenant, change.stamp, change.version, fresh=True)

    # -- connections --------------------------------------------------------------------------

    def _warm_up(self, tenant: str, stamp: str) -> None:
        """A tenant this application uses is about to flip to `stamp`: open as many connections there as
        it holds on its current stamp, in the background, so the first writes after the flip do not
        wait for new connections (they were most of the pause beyond the freeze)."""
        entry = self._cache.get(tenant)
        if entry is None or entry.stamp == stamp:
            return
        with self._lock:
            current = self._pools.get(entry.stamp)
        wanted = max(1, current.get_stats().get("pool_size", 1)) if current is not None else 1
        threading.Thread(target=self._open, args=(stamp, wanted), name="migrator-router-warm", daemon=True).start()

    def _open(self, stamp: str, count: int) -> None:
        """Open `count` connections of the stamp's pool and leave them idle in it (best effort)."""
        try:
            pool = self._pool(stamp)
            held = [pool.getconn(timeout=CATALOG_TIMEOUT_S) for _ in range(min(count, self._pool_size))]
        except (KeyError, psycopg.Error) as exc:  # a stamp this application has no DSN for, or unreachable
            log.info("no connections opened ahead of a cutover to %s: %s", stamp, exc)
            return
        for conn in held:
            pool.putconn(conn)

    def _pool(self, stamp: str) -> ConnectionPool[psycopg.Connection[Any]]:
        with self._lock:
            pool = self._pools.get(stamp)
            if pool is None:
                pool = ConnectionPool(
                    normalize(self._stamp_dsn(stamp)),
                    min_size=0,
                    max_size=self._pool_size,
                    kwargs={"application_name": APPLICATION_NAME},
                    name=f"migrator-router-{stamp}",
                    open=True,
                )
                self._pools[stamp] = pool
            return pool

    @contextmanager
    def connection(self, tenant: str) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection to the tenant's stamp; the transaction commits at the end of the block."""
        with self._pool(self.stamp_of(tenant)).connection() as conn:
            yield conn

    def run(self, tenant: str, fn: Callable[[psycopg.Connection[Any]], T], *, deadline_s: float = 10.0) -> T:
        """`fn(conn)` in one transaction on the tenant's stamp, committed; retried while the tenant is fenced.

        A fenced write (`MGF01`), a connection lost before the commit was sent, or a stamp or catalog
        that cannot be reached means nothing was committed: the tenant is re-resolved and `fn` runs
        again after a short back-off, until `deadline_s` passes (then `TenantFenced`). Every other
        error is raised at once, and so is a failed commit, whose outcome the server alone knows.
        """
        tenant = str(tenant)
        deadline = time.monotonic() + deadline_s
        pause = 0.005
        while True:
            try:
                pool = self._pool(self.stamp_of(tenant))
                conn = pool.getconn(timeout=max(0.05, deadline - time.monotonic()))
            except psycopg.OperationalError as exc:  # unreachable (PoolTimeout included): nothing was sent
                last: psycopg.Error = exc
            else:
                try:
                    result = fn(conn)
                except psycopg.Error as exc:
                    with suppress(psycopg.Error):
                        conn.rollback()
                    pool.putconn(conn)
                    if not self._retryable(exc, conn):
                        raise
                    last = exc
                except BaseException:  # the application's own error: the connection goes back all the same
                    with suppress(psycopg.Error):
                        conn.rollback()
                    pool.putconn(conn)
                    raise
                else:
                    try:
                        conn.commit()
                    finally:
                        pool.putconn(conn)
                    return result
            if time.monotonic() + pause > deadline:
                what = "fenced" if last.sqlstate == FENCED_SQLSTATE else "unreachable"
                raise TenantFenced(
                    f"tenant {tenant} stayed {what} for {deadline_s:.1f} s: {str(last).strip().splitlines()[0]}"
                ) from last
            if not (last.sqlstate == FENCED_SQLSTATE and self._wait_for_change(tenant, pause)):
                self._stale(tenant)  # no flip announced in time (or the stamp was lost): re-read the catalog
            pause = min(0.05, pause * 2)

    def _wait_for_change(self, tenant: str, timeout: float) -> bool:
        """Wait up to `timeout` for the tenant's route to change; True if it did.

        A fenced tenant is moving: its flip's notification wakes the retry within milliseconds of
        the commit, instead of whenever a back-off sleep happens to end.
        """
        with self._changed:
            seen = self._cache.get(tenant)
            return self._changed.wait_for(lambda: self._cache.get(tenant) is not seen, timeout=timeout)

    def _retryable(self, exc: psycopg.Error, conn: psycopg.Connection[Any]) -> bool:
        if exc.sqlstate == FENCED_SQLSTATE:
            self._count("fenced_retries")
            return True
        if conn.broken:  # lost before the commit was sent: the server rolled the transaction back
            self._count("lost_connections")
            return True
        return False

    # -- lifetime -----------------------------------------------------------------------------

    def close(self) -> None:
        """Stop listening and close every pool."""
        self._closed.set()
        if self._listener is not None:
            self._listener.join(timeout=5)
        with self._lock:
            pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            pool.close()
        self._catalog.close()

    def __enter__(self) -> Router:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
