"""Prometheus metrics of one `migrator move` or `apply` process, served by `--metrics-port`.

Each process (each `Context`) has its own registry, so tests and several runs in one process never
share counters. Names follow Prometheus conventions: base units (seconds, rows, changes),
`_total` on counters. Labels are stamp names and phases, never tenant ids (unbounded cardinality;
the catalog and `move status` say which tenant is where).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from functools import partial

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from migrator.db import retry
from migrator.errors import BadInput
from migrator.progress import Progress

FREEZE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0)


class Metrics:
    """What a move reports as it goes: rows, phases, backlog, freezes, mismatches, retries."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        # Every metric is migrator's (the `migrator_` prefix) and this process's alone (its registry).
        counter = partial(Counter, namespace="migrator", registry=self.registry)
        gauge = partial(Gauge, namespace="migrator", registry=self.registry)
        self.rows_copied = counter("rows_copied", "Rows committed on a target by the bulk copy", ["source", "target"])
        self.moves = gauge("moves", "Moves (cohorts) this process is running, by phase", ["phase"])
        self.move_tenants = gauge("move_tenants", "Tenants of the moves this process is running, by phase", ["phase"])
        self.tenants_moved = counter("tenants_moved", "Tenants whose route a move of this process flipped")
        self.moves_ended = counter("moves_ended", "Moves this process ran to their end, by outcome", ["outcome"])
        self.catchup_backlog = gauge(
            "catchup_backlog_changes",
            "Captured changes not yet replayed on the target, at the last catch-up round",
            ["source"],
        )
        self.freeze = Histogram(
            "freeze_duration_seconds",
            "Writes frozen by a cutover, from the fence to the flip's commit or the fence's release",
            ["outcome"],
            buckets=FREEZE_BUCKETS,
            namespace="migrator",
            registry=self.registry,
        )
        self.verify_mismatches = counter("verify_mismatches", "Verifications that found a tenant's rows unequal")
        self.retries = counter("transient_retries", "Transient errors retried, by the retried step", ["step"])
        self.throttled = counter(
            "throttled_seconds",
            "Seconds copies and catch-up rounds waited for a stamp's replicas, slots or load",
            ["stamp", "reason"],
        )
        self.replica_lag = gauge(
            "replica_lag_seconds",
            "A standby's replay lag behind its stamp's primary, at the throttle's last reading",
            ["stamp", "standby"],
        )
        self._phases: dict[int, tuple[str, int]] = {}  # move id -> (phase, tenants)
        self._lock = threading.Lock()

    def phase(self, move_id: int, phase: str | None, tenants: int = 1) -> None:
        """Move `move_id`, of `tenants` tenants, is now at `phase` (None: this process no longer runs it)."""
        with self._lock:
            before = self._phases.pop(move_id, None)
            if before is not None:
                self.moves.labels(before[0]).dec()
                self.move_tenants.labels(before[0]).dec(before[1])
            if phase is not None:
                self._phases[move_id] = (phase, tenants)
                self.moves.labels(phase).inc()
                self.move_tenants.labels(phase).inc(tenants)

    def ended(self, move_id: int, outcome: str, tenants: int = 1) -> None:
        self.phase(move_id, None)
        self.moves_ended.labels(outcome).inc()
        if outcome == "flipped":
            self.tenants_moved.inc(tenants)

    def counting_copy(self, progress: Progress, source: str, target: str) -> Progress:
        """`progress` that also counts the copy's committed rows (what its `advance` reports)."""
        return _CountedCopy(progress, self.rows_copied.labels(source, target))

    @contextlib.contextmanager
    def serve(self, port: int | None) -> Iterator[None]:
        """Serve the metrics on `port` (all interfaces) while the block runs; nothing when None.

        Counts the transient retries of every step meanwhile (`retry.observe`).
        """
        if port is None:
            yield
            return
        try:
            server, thread = start_http_server(port, registry=self.registry)
        except OSError as exc:
            raise BadInput(f"--metrics-port {port}: {exc.strerror or exc}") from None
        try:
            with retry.observe(lambda step: self.retries.labels(step).inc()):
                yield
        finally:
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)


class _CountedCopy:
    """A copy's progress, forwarded, with each committed batch's rows added to a counter."""

    def __init__(self, progress: Progress, rows: Counter) -> None:
        self._progress, self._rows = progress, rows

    def begin(self, total: int, unit: str = "rows") -> None:
        self._progress.begin(total, unit)

    def describe(self, text: str) -> None:
        self._progress.describe(text)

    def phase(self, message: str) -> None:
        self._progress.phase(message)

    def note(self, message: str) -> None:
        self._progress.note(message)

    def start(self, part: str, total: int, done: int = 0, unit: str = "rows") -> None:
        self._progress.start(part, total, done, unit)

    def advance(self, part: str, count: int) -> None:
        self._rows.inc(count)
        self._progress.advance(part, count)

    def finish(self, part: str) -> None:
        self._progress.finish(part)
