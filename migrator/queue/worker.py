"""`migrator worker`: a procrastinate worker running plan entries until SIGTERM.

SIGTERM (or Ctrl-C) claims nothing new and asks the running moves to stop at their next safe
point (between copy batches, catch-up rounds and steps; never inside a freeze). Each goes back to
the queue where it stood and the worker exits 0; another worker resumes it from the catalog.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from procrastinate.worker import Worker

from migrator.context import Context
from migrator.move.throttle import ThrottleOptions
from migrator.queue.app import HOUSEKEEPING_QUEUE, WorkerState
from migrator.queue.tasks import make_app

log = logging.getLogger("migrator.queue")


@dataclass(frozen=True)
class WorkerOptions:
    """Flags of `migrator worker`."""

    queues: tuple[str, ...] = ()  # none: every queue
    concurrency: int = 2  # entries (moves) at once in this process
    stalled_after_s: float = 30.0  # a worker silent this long is dead: its jobs are queued again
    name: str | None = None
    throttle: ThrottleOptions = field(default_factory=ThrottleOptions)  # each of its moves' (and the fleet's)


def run_worker(
    ctx: Context,
    options: WorkerOptions,
    stop: threading.Event | None = None,
    say: Callable[[str], None] = lambda line: None,
) -> None:
    """Run until SIGTERM/SIGINT (or `stop`); returns once the running entries reached a safe point.

    `say` gets a line as each entry starts and ends (the CLI prints them).
    """
    asyncio.run(_run(ctx, options, stop or threading.Event(), say))


async def _run(ctx: Context, options: WorkerOptions, stop: threading.Event, say: Callable[[str], None]) -> None:
    # One catalog connection per running entry's job bookkeeping, one for LISTEN, one for heartbeats.
    app = make_app(ctx.catalog.url, min_size=1, max_size=options.concurrency + 3)
    state = WorkerState(ctx, stop, options.stalled_after_s, say, options.throttle)
    queues: Sequence[str] | None = [*options.queues, HOUSEKEEPING_QUEUE] if options.queues else None
    async with app.open_async():
        worker = Worker(
            app,
            queues=queues,
            name=options.name,
            concurrency=options.concurrency,
            additional_context={"migrator": state},
            install_signal_handlers=False,
            update_heartbeat_interval=max(0.5, options.stalled_after_s / 4),
            stalled_worker_timeout=options.stalled_after_s,
            fetch_job_polling_interval=2.0,
            # The catalog keeps each entry's record; the queue keeps only failed jobs, so the
            # housekeeping job every few seconds does not grow its table without bound.
            delete_jobs="successful",
        )
        loop = asyncio.get_running_loop()

        def stopping() -> None:
            if not stop.is_set():
                log.warning("stopping: claiming no more work, running moves stop at their next safe point")
            stop.set()
            worker.stop()

        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stopping)
        watcher = asyncio.create_task(_watch(stop, stopping))
        try:
            await worker.run()
        finally:
            watcher.cancel()


async def _watch(stop: threading.Event, stopping: Callable[[], None]) -> None:
    """`stop` set from another thread (tests, an embedding program) stops the worker like SIGTERM."""
    while not stop.is_set():
        await asyncio.sleep(0.2)
    stopping()
