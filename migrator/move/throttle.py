"""Gentle on production: a move's copy and catch-up yield to the stamps' replicas, CDC slots and load.

Before each copy batch and each catch-up round (`Throttle.wait`) the move reads, on the primary of
its source and of its target, how far each streaming standby has replayed (`pg_stat_replication`),
how much WAL each logical slot retains (`pg_replication_slots`) and how many other sessions are
active (`pg_stat_activity`). While one is over its limit (`Limits`: the fleet's, re-read from the
catalog every few seconds, made stricter by the move's flags) it waits, and resumes once the value
is back under 80 % of the limit (a little hysteresis, so it does not flap at the edge). A critical
load stops the move at that safe point, unfenced and resumable.

A standby's lag in seconds is measured without a heartbeat table (gh-ost writes one; a
least-privileged role may not): at every reading the primary's WAL position is noted with the
time, and a standby's lag is how long ago the primary was at the position the standby has replayed
(`LagClock`). A paused or delayed replay thus shows as a lag that keeps growing, even while no new
WAL is written.

The cutover waits for the target's standbys (`wait_for_standbys`): before the fence, until they
replayed the copy, and inside the freeze until they replayed the drain (that wait counts towards
--max-freeze-ms), so an application reading from a replica finds the tenant there when the route
flips.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg

from migrator.catalog import Catalog, Limits, Stamp
from migrator.errors import BadInput, MigratorError, Unreachable
from migrator.metrics import Metrics
from migrator.progress import Progress, Silent
from migrator.stamps.access import connect

log = logging.getLogger(__name__)

RESUME_AT = 0.8  # a paused copy resumes once every value is under this share of its limit
POLL_S = 0.25  # how often a paused copy looks again
CHECK_EVERY_S = 0.25  # readings are at most this often while not paused (one per batch otherwise)
LIMITS_EVERY_S = 2.0  # how often the fleet's limits are re-read from the catalog
HISTORY_S = 3600.0  # how far back the WAL positions of `LagClock` are kept

_READ = """
SELECT pg_current_wal_lsn() - '0/0'::pg_lsn,
  (SELECT coalesce(json_agg(json_build_array(application_name, state, replay_lsn - '0/0'::pg_lsn,
                                               extract(epoch FROM replay_lag))), '[]')
   FROM pg_stat_replication),
  (SELECT coalesce(json_agg(json_build_array(slot_name, slot_type, active, pg_current_wal_lsn() - restart_lsn)), '[]')
   FROM pg_replication_slots WHERE slot_type = 'physical' OR database = current_database()),
  (SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND state = 'active'
   AND backend_type = 'client backend' AND pid <> pg_backend_pid() AND application_name <> 'migrator'),
  (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) OR pg_has_role('pg_read_all_stats', 'MEMBER')
"""


@dataclass(frozen=True)
class ThrottleOptions:
    """Flags --max-replica-lag, --max-slot-lag, --max-active-sessions, --critical-load (the move's own
    `limits`: the fleet's still apply) and --replica-wait / --no-replica-wait (None)."""

    limits: Limits = field(default_factory=Limits)
    replica_wait_s: float | None = 60.0  # None: flip without waiting for the target's standbys

    @property
    def replica_wait(self) -> bool:
        return self.replica_wait_s is not None


class ThrottleStop(MigratorError):
    """A critical load: the move stopped at a safe point, unfenced, and resumes where it stood."""


class StandbyBehind(MigratorError):
    """A standby did not replay the copy in time (or is down): the move stops unflipped, naming it."""


@dataclass(frozen=True)
class Standby:
    """A standby of a stamp's primary: streaming (`replay` its replayed WAL position) or only a slot."""

    name: str
    streaming: bool
    replay: int | None
    reported_lag: float | None = None  # pg_stat_replication.replay_lag: the server's own measure, if any


@dataclass(frozen=True)
class Reading:
    """One look at a stamp's primary."""

    lsn: int
    standbys: dict[str, Standby]
    logical_slots: dict[str, int]  # slot -> retained WAL bytes
    active: int
    privileged: bool  # sees other roles' sessions and the standbys' positions


class LagClock:
    """The primary's WAL position over time, to tell how many seconds behind a standby's replay is."""

    def __init__(self) -> None:
        self._times: deque[float] = deque()
        self._lsns: deque[int] = deque()

    def note(self, now: float, lsn: int) -> None:
        if not self._lsns or lsn > self._lsns[-1]:
            self._times.append(now)
            self._lsns.append(lsn)
        while self._times and now - self._times[0] > HISTORY_S and len(self._times) > 1:
            self._times.popleft()
            self._lsns.popleft()

    def lag(self, now: float, replayed: int | None, reported: float | None = None) -> float:
        """Seconds since the primary first wrote past `replayed` (0 when the standby has replayed all).

        Before the first noted position the time is unknown: there the server's own `replay_lag`
        (`reported`, from the standby's last reply; it does not grow while replay is paused) is the
        floor, so a standby already behind when the move starts counts as behind.
        """
        if replayed is None:
            return float("inf")
        if not self._lsns or replayed >= self._lsns[-1]:
            return 0.0
        first_past = bisect.bisect_right(list(self._lsns), replayed)
        return max(now - self._times[first_past], reported or 0.0)


@dataclass
class _Watched:
    stamp: Stamp
    clock: LagClock = field(default_factory=LagClock)
    seen: set[str] = field(default_factory=set)  # standbys seen streaming during the move
    conn: psycopg.Connection[Any] | None = None


@dataclass(frozen=True)
class Over:
    """A value over its limit on a stamp: why the copy waits (or stops)."""

    stamp: str
    reason: str  # replica_lag, slot_lag, load, critical_load
    text: str


class Throttle:
    """Waits at the move's safe points while its stamps' replicas, slots or load are over the limits."""

    def __init__(
        self,
        catalog: Catalog,
        stamps: tuple[Stamp, ...],
        own: Limits,
        progress: Progress,
        metrics: Metrics,
        fleet_limits: Callable[[], Limits] | None = None,
    ) -> None:
        self._own = own
        self._fleet_limits = fleet_limits or catalog.limits
        self._watched = {s.name: _Watched(s) for s in stamps}
        self._progress, self._metrics = progress, metrics
        self._lock = threading.Lock()
        self._limits = own
        self._limits_at = float("-inf")
        self._checked_at = float("-inf")
        self._paused: tuple[Over, ...] = ()
        self.throttled_s = 0.0
        self.standby_wait_s = 0.0

    # -- limits -----------------------------------------------------------------------------------

    def limits(self) -> Limits:
        """The move's flags made stricter by the fleet's limits, re-read every LIMITS_EVERY_S."""
        now = time.monotonic()
        if now - self._limits_at >= LIMITS_EVERY_S:
            try:
                self._limits = self._own.stricter(self._fleet_limits())
            except MigratorError as exc:  # the catalog away for a moment: keep the last limits
                log.warning("throttle: cannot read the fleet's limits (%s); keeping the last ones", exc)
            self._limits_at = now
        return self._limits

    # -- readings ---------------------------------------------------------------------------------

    def read(self, name: str) -> Reading:
        """Look at one stamp's primary now (its session kept open between readings)."""
        watched = self._watched[name]
        for attempt in (1, 2):
            try:
                if watched.conn is None or watched.conn.closed or watched.conn.broken:
                    watched.conn = connect(watched.stamp, autocommit=True)
                row = watched.conn.execute(_READ).fetchone()
                break
            except (psycopg.OperationalError, Unreachable):
                watched.conn = None
                if attempt == 2:
                    raise
        assert row is not None
        lsn, senders, slots, active, privileged = row
        standbys = {
            n: Standby(n, state == "streaming", None if at is None else int(at), lag) for n, state, at, lag in senders
        }
        for slot, kind, live, _retained in slots:
            if kind == "physical" and slot not in standbys:
                standbys[slot] = Standby(slot, bool(live), None)
        logical = {slot: int(retained or 0) for slot, kind, _live, retained in slots if kind == "logical"}
        now = time.monotonic()
        watched.clock.note(now, int(lsn))
        watched.seen.update(n for n, s in standbys.items() if s.streaming)
        for n, standby in standbys.items():
            if standby.replay is not None:
                lag = watched.clock.lag(now, standby.replay, standby.reported_lag)
                self._metrics.replica_lag.labels(name, n).set(min(lag, 1e9))
        return Reading(int(lsn), standbys, logical, int(active), bool(privileged))

    def lag(self, name: str, standby: Standby) -> float:
        return self._watched[name].clock.lag(time.monotonic(), standby.replay, standby.reported_lag)

    def over(self, limits: Limits, factor: float = 1.0) -> list[Over]:
        """What is over `factor` times its limit on each stamp now."""
        found = []
        for name in self._watched:
            reading = self.read(name)
            if limits.critical_load is not None and reading.active >= limits.critical_load:
                text = f"critical load: {reading.active} active sessions >= {limits.critical_load} ({name})"
                found.append(Over(name, "critical_load", text))
            if limits.max_active_sessions is not None and reading.active > limits.max_active_sessions * factor:
                text = f"load: {reading.active} active sessions > {limits.max_active_sessions} ({name})"
                found.append(Over(name, "load", text))
            if limits.max_replica_lag_s is not None:
                for standby in reading.standbys.values():
                    if standby.replay is None:
                        continue  # a standby that is not streaming holds no copy back; the cutover waits for it
                    lag = self.lag(name, standby)
                    if lag > limits.max_replica_lag_s * factor:
                        text = (
                            f"replica lag {lag:.1f} s > {limits.max_replica_lag_s:g} s ({name}, standby {standby.name})"
                        )
                        found.append(Over(name, "replica_lag", text))
            if limits.max_slot_lag_bytes is not None:
                for slot, retained in reading.logical_slots.items():
                    if retained > limits.max_slot_lag_bytes * factor:
                        text = f"slot lag {retained:,} bytes > {limits.max_slot_lag_bytes:,} ({name}, slot {slot})"
                        found.append(Over(name, "slot_lag", text))
        return found

    # -- the safe points --------------------------------------------------------------------------

    def wait(self, move_id: int) -> None:
        """Before a batch or a catch-up round: return once nothing is over its limit; raise
        ThrottleStop at a critical load. Several copy streams share one throttle: one looks, the
        others wait for its verdict."""
        with self._lock:
            limits = self.limits()
            if not limits.any:
                self._resume()
                return
            if not self._paused and time.monotonic() - self._checked_at < CHECK_EVERY_S:
                return
            started = time.monotonic()
            while True:
                factor = RESUME_AT if self._paused else 1.0
                found = self.over(limits, factor)
                self._checked_at = time.monotonic()
                critical = [o for o in found if o.reason == "critical_load"]
                if critical:
                    self._resume()
                    raise ThrottleStop(
                        f"move {move_id}: stopped at {critical[0].text}; nothing is fenced, resume it with "
                        f"`migrator move --move {move_id}` once the load is down"
                    )
                waiting = tuple(o for o in found if o.reason != "critical_load")
                if not waiting:
                    self._resume()
                    return
                self._pause(waiting)
                time.sleep(POLL_S)
                spent = time.monotonic() - started
                started += spent
                self.throttled_s += spent
                for over in {(o.stamp, o.reason) for o in waiting}:
                    self._metrics.throttled.labels(*over).inc(spent)
                limits = self.limits()
                if not limits.any:
                    self._resume()
                    return

    def _pause(self, waiting: tuple[Over, ...]) -> None:
        if {(o.stamp, o.reason) for o in waiting} != {(o.stamp, o.reason) for o in self._paused}:
            text = "throttled: " + "; ".join(o.text for o in waiting)
            self._progress.phase(text)
            log.info("%s", text)
        self._paused = waiting

    def _resume(self) -> None:
        if self._paused:
            self._progress.phase("throttle lifted: copying again")
            log.info("throttle lifted")
        self._paused = ()

    # -- the cutover ------------------------------------------------------------------------------

    def wait_for_standbys(self, name: str, timeout_s: float, what: str = "the move") -> None:
        """Wait until every standby of stamp `name` (streaming now, or seen streaming during the move,
        or holding a physical slot) replayed all that was written on it when this was called (the first
        reading's WAL position: one query, where there is no standby to wait for, inside a write freeze);
        the seconds waited add to `standby_wait_s`. Raises StandbyBehind naming those that did not
        within `timeout_s`."""
        started = time.monotonic()
        watched = self._watched[name]
        announced = False
        lsn: int | None = None
        while True:
            reading = self.read(name)
            lsn = reading.lsn if lsn is None else lsn
            if watched.seen or reading.standbys:
                self._refuse_blind(name, reading)
            behind = {n: s for n, s in reading.standbys.items() if s.replay is None or s.replay < lsn} | {
                n: Standby(n, False, None) for n in watched.seen if n not in reading.standbys
            }
            waited = time.monotonic() - started
            if not behind:
                self.standby_wait_s += waited
                return
            if not announced:
                self._progress.phase(
                    f"waiting for the standbys of {name} to replay {what}: {', '.join(sorted(behind))}"
                )
                announced = True
            if waited >= timeout_s:
                self.standby_wait_s += waited
                named = ", ".join(
                    f"{n} ({'down' if not s.streaming else f'{self.lag(name, s):.1f} s behind'})"
                    for n, s in sorted(behind.items())
                )
                raise StandbyBehind(
                    f"the standbys of {name} did not replay {what} within {timeout_s:g} s: {named}; "
                    "not flipped (the tenant stays writable on its source); re-run the move, or pass "
                    "--no-replica-wait to flip without them"
                )
            time.sleep(min(POLL_S / 5, max(0.0, timeout_s - waited)))

    @staticmethod
    def _refuse_blind(name: str, reading: Reading) -> None:
        if not reading.privileged and any(s.replay is None and s.streaming for s in reading.standbys.values()):
            raise BadInput(
                f"stamp {name} has standbys whose replay this role cannot see; GRANT pg_monitor (or "
                "pg_read_all_stats) to migrator's role, or pass --no-replica-wait"
            )

    def refuse_blind(self, limits: Limits, replica_wait: bool) -> None:
        """Before the move starts: refuse limits (or a replica wait) this role cannot see, naming the GRANT."""
        for name in self._watched:
            reading = self.read(name)
            if limits.reads_activity and not reading.privileged:
                raise BadInput(
                    f"throttling by replica lag or load needs to see other sessions on stamp {name}: "
                    "GRANT pg_monitor (or pg_read_all_stats) TO migrator's role; nothing was changed"
                )
            if replica_wait:
                self._refuse_blind(name, reading)

    def close(self) -> None:
        for watched in self._watched.values():
            if watched.conn is not None:
                with contextlib.suppress(psycopg.Error):
                    watched.conn.close()
                watched.conn = None


def check_visible(catalog: Catalog, stamps: tuple[Stamp, ...], options: ThrottleOptions) -> None:
    """Before a move starts: refuse limits (or a replica wait) that migrator's role cannot see on these
    stamps, naming the GRANT; nothing is changed."""
    throttle = Throttle(catalog, stamps, options.limits, Silent(), Metrics())
    try:
        throttle.refuse_blind(throttle.limits(), options.replica_wait)
    finally:
        throttle.close()


def describe(limits: Limits) -> list[tuple[str, str]]:
    """The limits as `throttle show` prints them."""
    return [
        ("max replica lag", "-" if limits.max_replica_lag_s is None else f"{limits.max_replica_lag_s:g} s"),
        ("max slot lag", "-" if limits.max_slot_lag_bytes is None else f"{limits.max_slot_lag_bytes:,} bytes"),
        ("max active sessions", "-" if limits.max_active_sessions is None else str(limits.max_active_sessions)),
        ("critical load", "-" if limits.critical_load is None else str(limits.critical_load)),
    ]
