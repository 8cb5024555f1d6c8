"""Ctrl-C (SIGINT) and SIGTERM during a long command: stop at the next safe point, then say where it stands.

A signal sets the run's stop event instead of raising wherever the interpreter happens to be (inside
a catalog write, or the cutover's freeze). The engine looks at the event at its safe points (between
copy batches, steps and catch-up rounds: the mechanism a worker's SIGTERM uses) and ends with
`Interrupted`. The command then raises `Stopped`: one line naming what stopped, what is left in
place and the commands that resume or abort it, with exit status 128 + the signal's number (130
for Ctrl-C, 143 for SIGTERM), as a shell reports a process a signal ended.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import FrameType

from migrator.errors import MigratorError

SIGNALS = (signal.SIGINT, signal.SIGTERM)


@dataclass
class Stop:
    """The stop a signal asked for: `event` is what the engine's safe points read."""

    event: threading.Event = field(default_factory=threading.Event)
    signum: int | None = None  # the first signal received

    @property
    def asked(self) -> bool:
        return self.event.is_set()

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "a stop"

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum or signal.SIGINT)


class Stopped(MigratorError):
    """A command stopped at a safe point because a signal asked it to (exit 128 + the signal)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@contextlib.contextmanager
def stop_on_signals() -> Iterator[Stop]:
    """SIGINT and SIGTERM set `Stop.event` for the block; the first one also says that it was heard.

    Outside the main thread (a library caller's thread) no handler can be installed: the caller stops
    the run through the event itself.
    """
    stop = Stop()

    def asked(signum: int, frame: FrameType | None) -> None:
        if stop.signum is None:
            stop.signum = signum
            print(f"\n{stop.name}: stopping at the next safe point...", file=sys.stderr, flush=True)
        stop.event.set()

    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = {signum: signal.signal(signum, asked) for signum in SIGNALS}
    try:
        yield stop
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def prompting() -> Iterator[None]:
    """Ctrl-C at a question (`schema upgrade` asks inside its stop block) answers no, as it does elsewhere,
    instead of setting a stop nobody reads while the prompt waits."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
