"""Watching a streaming standby from the outside, for the throttle's tests and `scripts/bench throttle`.

`LagSampler` samples a standby's replay lag every 0.1 s, by hand and independently of
`migrator.move.throttle`: the primary's WAL position is noted with its time, and the lag is how long
ago the primary first wrote past the standby's replay position. With a `count` it also records the
rows the copy has committed on the target, so that lags can be told apart while copying.
`FlipWatch` counts a tenant's rows on the target's standby at the moment its route flips.
"""

from __future__ import annotations

import json
import select
import threading
import time
from collections.abc import Callable
from types import TracebackType

from migrator.db import dsn as dsnlib


class LagSampler:
    """The lag of standby `name` of the server at `primary_dsn`, every 0.1 s while inside the block."""

    def __init__(self, primary_dsn: str, name: str, count: Callable[[], int] | None = None) -> None:
        self.primary_dsn, self.name, self.count = primary_dsn, name, count
        self.samples: list[tuple[float, float, int]] = []  # time, lag, `count()` (0 without one)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> LagSampler:
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join(10)

    @property
    def peak(self) -> float:
        return max((lag for _, lag, _ in self.samples), default=0.0)

    def copying(self) -> list[tuple[float, float, int]]:
        """The samples from just before the copy's first committed batch to its last."""
        changed = [i for i in range(1, len(self.samples)) if self.samples[i][2] != self.samples[i - 1][2]]
        return self.samples[changed[0] - 1 : changed[-1] + 1] if changed else []

    def lag_at_batches(self) -> list[float]:
        """For each batch committed between two samples, the lower lag of the two: the lag when it
        could have started at the latest."""
        return [
            min(self.samples[i - 1][1], self.samples[i][1])
            for i in range(1, len(self.samples))
            if self.samples[i][2] != self.samples[i - 1][2]
        ]

    def _run(self) -> None:
        timeline: list[tuple[float, int]] = []
        with dsnlib.connect(self.primary_dsn, autocommit=True) as conn:
            while not self._stop.is_set():
                row = conn.execute(
                    "SELECT pg_current_wal_lsn() - '0/0', (SELECT replay_lsn - '0/0' FROM pg_stat_replication"
                    " WHERE application_name = %s)",
                    (self.name,),
                ).fetchone()
                copied = self.count() if self.count else 0
                assert row is not None
                now, lsn, replay = time.monotonic(), int(row[0]), row[1]
                if not timeline or lsn > timeline[-1][1]:
                    timeline.append((now, lsn))
                behind = [t for t, at in timeline if replay is None or at > replay]
                self.samples.append((now, now - behind[0] if behind else 0.0, copied))
                time.sleep(0.1)


class FlipWatch:
    """Listens for `tenant`'s route to flip to `target`; then runs `counts()` at once (the rows on the
    target's standby and primary, say) and keeps what it returned in `seen`."""

    def __init__(self, catalog_url: str, tenant: str, target: str, counts: Callable[[], dict[str, int]]) -> None:
        self.catalog_url, self.tenant, self.target, self.counts = catalog_url, tenant, target, counts
        self.seen: dict[str, int] = {}
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> FlipWatch:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._thread.join(30)

    def _run(self) -> None:
        with dsnlib.connect(self.catalog_url, autocommit=True) as conn:
            conn.execute("LISTEN migrator_routes")
            self._ready.set()
            deadline = time.monotonic() + 3600
            while time.monotonic() < deadline:
                select.select([conn.fileno()], [], [], 1)
                for note in conn.notifies(timeout=0, stop_after=1):
                    route = json.loads(note.payload)
                    if route["tenant"] == self.tenant and route["stamp"] == self.target:
                        self.seen = self.counts()
                        return
