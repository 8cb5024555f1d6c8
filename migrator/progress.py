"""The one way long work reports progress without knowing about terminals, and the one implementation that says nothing.

A move (and a cleanup or an abort), a plan's apply and a schema rollout all report through
`Progress`: an overall counter (`begin`, `describe`), counters of the parts being worked on at once (a move's
tables, a rollout's wave: `start`, `finish`), each `advance` counting on a part and the overall
counter, and lines (`phase`; `note` for what must be read even without progress). The CLI renders
it with tqdm bars or plain lines (`migrator.cli.render.Bars`); tests, `--json` runs and benchmarks
pass `Silent`. It is called from several threads at once (a move's copy streams, apply's moves).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

TICK_S = 5.0  # while a step counts nothing (a verify, a wait), a line this often: a log never goes quiet long


class Progress(Protocol):
    """Progress of a move, cleanup, abort, plan or rollout, in counted units (rows, stamps)."""

    def begin(self, total: int, unit: str = "rows") -> None:
        """Work of `total` units starts (a move calls it once preflight passed, so refusals print no bar)."""

    def describe(self, text: str) -> None:
        """A new description of the overall counter (a plan's tenants and moves done so far)."""

    def phase(self, message: str) -> None:
        """A phase started or a notable event happened (one line)."""

    def note(self, message: str) -> None:
        """Something to read even where progress is off (an interruption, what a plan waits for)."""

    def start(self, part: str, total: int, done: int = 0, unit: str = "rows") -> None:
        """Work on `part` (a table, a wave) starts, or resumes with `done` units already done."""

    def advance(self, part: str, count: int) -> None:
        """`count` more units of `part` are done (counted on the overall total too; a part never
        started counts on the total alone)."""

    def finish(self, part: str) -> None:
        """Work on `part` is complete."""


class Silent:
    """Progress that goes nowhere: for tests, `--json` runs and benchmarks."""

    def begin(self, total: int, unit: str = "rows") -> None:
        pass

    def describe(self, text: str) -> None:
        pass

    def phase(self, message: str) -> None:
        pass

    def note(self, message: str) -> None:
        pass

    def start(self, part: str, total: int, done: int = 0, unit: str = "rows") -> None:
        pass

    def advance(self, part: str, count: int) -> None:
        pass

    def finish(self, part: str) -> None:
        pass


@contextmanager
def ticking(progress: Progress, what: str, every_s: float = TICK_S) -> Iterator[None]:
    """A line (`what: 12 s`) every `every_s` seconds while the block runs: for steps that count
    nothing (verifying a copy, waiting for standbys), so a terminal or a log never goes quiet for
    long. Nothing is said of a block shorter than `every_s`."""
    done = threading.Event()
    started = time.monotonic()

    def tick() -> None:
        while not done.wait(every_s):
            progress.phase(f"{what}: {time.monotonic() - started:.0f} s")

    thread = threading.Thread(target=tick, name="progress-tick", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
