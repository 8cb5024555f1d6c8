"""`migrator worker`: run queued plan entries (`apply --queue`) until SIGTERM."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from migrator.cli import render
from migrator.cli.base import METRICS_PORT, cli, context_of, engine_option
from migrator.cli.throttle import throttle_flags

if TYPE_CHECKING:  # the engine is imported when the command runs, which keeps `migrator --help` fast
    from migrator.move.throttle import ThrottleOptions
    from migrator.queue.worker import WorkerOptions


def _worker_defaults() -> WorkerOptions:
    from migrator.queue.worker import WorkerOptions

    return WorkerOptions()


@cli.command("worker")
@click.option(
    "--queue",
    "queues",
    multiple=True,
    metavar="NAME",
    help="Claim work from this queue (repeatable; e.g. the queue of this machine's region). Default: every queue.",
)
@engine_option("--concurrency", lambda: _worker_defaults().concurrency, "Moves at once.", click.IntRange(min=1, max=64))
@engine_option(
    "--stalled-after",
    lambda: _worker_defaults().stalled_after_s,
    "Seconds without a heartbeat after which a worker counts as dead and its moves are queued again.",
    click.FloatRange(min=1),
)
@click.option("--name", default=None, help="This worker's name in logs (default: host and process id).")
@throttle_flags
@METRICS_PORT
@click.pass_context
def worker_cmd(
    ctx: click.Context,
    queues: tuple[str, ...],
    concurrency: int,
    stalled_after: float,
    name: str | None,
    metrics_port: int | None,
    throttle: ThrottleOptions,
) -> None:
    """Run plan moves from the catalog's job queue until SIGTERM (which stops them at a safe point)."""
    import os
    import socket

    from migrator.queue.worker import WorkerOptions, run_worker

    context = context_of(ctx)
    name = name or f"{socket.gethostname()}:{os.getpid()}"
    options = WorkerOptions(queues, concurrency, stalled_after, name, throttle)
    render.say(
        f"worker {name} on {', '.join(queues) if queues else 'every queue'}: {concurrency} move(s) at a time; "
        "SIGTERM stops it at a safe point"
    )
    with context.metrics.serve(metrics_port):
        run_worker(context, options, say=render.say)
    render.say(f"worker {name} stopped")
