"""Reading many stamps at once within a connection budget: at most `per_server` sessions on one
PostgreSQL server at a time, the stamps taken round-robin across servers so that no thread waits
on a busy server while another server is idle. Used by every fleet survey (schema status, keys)."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from migrator.catalog import Stamp
from migrator.db import dsn as dsnlib

T = TypeVar("T")

MAX_THREADS = 16
PER_SERVER = 4  # a survey's sessions on one server at once, unless the operator says otherwise


def each_stamp(chosen: Sequence[Stamp], look: Callable[[Stamp], T], per_server: int | None = None) -> list[T]:
    """`look(stamp)` for every stamp, in threads; the results in the order of `chosen`.

    `look` opens its own session and should turn a stamp's failure into its result: one unreachable
    stamp must not hide the others.
    """
    if not chosen:
        return []
    by_server: dict[str, list[Stamp]] = {}
    for stamp in chosen:
        by_server.setdefault(dsnlib.server_of(stamp.dsn), []).append(stamp)
    slots = {server: threading.BoundedSemaphore(per_server or len(chosen)) for server in by_server}
    order = [s for batch in itertools.zip_longest(*by_server.values()) for s in batch if s is not None]

    def within_budget(stamp: Stamp) -> tuple[str, T]:
        with slots[dsnlib.server_of(stamp.dsn)]:
            return stamp.name, look(stamp)

    threads = min(MAX_THREADS, len(chosen), (per_server or len(chosen)) * len(by_server))
    with ThreadPoolExecutor(max_workers=threads) as pool:
        found = dict(pool.map(within_budget, order))
    return [found[stamp.name] for stamp in chosen]
