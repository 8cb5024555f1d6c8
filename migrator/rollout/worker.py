"""One stamp's schema change: take the stamp's lock, run Alembic on it, report where it ended up.

`run_stamp_step` (`run_job`, its result in the one wording every record uses) is what a rollout
runs per stamp: inline for a wave of one (the canary), in a worker process otherwise, and inline in
a `migrator worker` for a queued step. Processes, not threads: Alembic's `op` and `context` are module-level proxies,
so two `command.upgrade` calls running at once in one interpreter overwrite each other's migration
context and can run DDL on the wrong connection. In-process calls are still serialised by
`ALEMBIC_IN_PROCESS` for callers that use the engine from several threads.

The stamp's env.py is the user's own and may connect either way `migrator.db.alembic.alembic_config`
offers; whatever it raises becomes one line naming the stamp, with the traceback kept for `--verbose`.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import threading
import traceback
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from multiprocessing import forkserver
from types import TracebackType
from typing import Any

import psycopg
from alembic import command
from alembic.runtime.migration import RevisionStep
from alembic.util import CommandError
from sqlalchemy import create_engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import StaticPool

from migrator import stamps
from migrator.catalog import Stamp, StepResult
from migrator.config import Tenancy
from migrator.context import Context
from migrator.db import alembic as migrations
from migrator.db import dsn as dsnlib
from migrator.db.alembic import read_revision
from migrator.db.locks import lock_key, try_lock
from migrator.errors import LockBusy, MigratorError
from migrator.stamps import keyspace

LOCK_KEY = lock_key("migrator.schema")
# Reentrant: a queued step takes it before its server slot (a step waiting for another's Alembic
# then holds no slot and no session), and `run_job` takes it again inside.
ALEMBIC_IN_PROCESS = threading.RLock()
# Imported once by the fork server, so each forked worker starts with them loaded.
PRELOAD = ["migrator.rollout.worker", "sqlalchemy.dialects.postgresql.psycopg"]


@dataclass(frozen=True)
class Job:
    """Move one stamp to `target` (a revision id; "base" for a downgrade to nothing).

    On a strided stamp (`stamp.key_block`), an upgrade then puts the sequences its revisions created
    into the stamp's block: `tenancy` finds them, `known_blocks` are the fleet's blocks (see
    `migrator.stamps.keyspace.place_sequences`).
    """

    stamp: Stamp
    script_location: str
    direction: str  # "upgrade" or "downgrade"
    target: str
    tenancy: Tenancy | None = None
    known_blocks: frozenset[int] = frozenset()

    @classmethod
    def of(cls, ctx: Context, stamp: Stamp, script_location: str, direction: str, target: str) -> Job:
        return cls(
            stamp, script_location, direction, target, ctx.config.tenancy, keyspace.known_blocks(ctx.catalog.stamps())
        )


@dataclass(frozen=True)
class JobResult:
    """Where the stamp was and is; `failed_in_migration` tells a revision's error from a lock/connect one.

    `failed_step` is the step Alembic was running when it failed ("upgrade REV"), `detail` the
    traceback of an unexpected error (password-free), logged for `--verbose` by the rollout.
    """

    stamp: str
    from_revision: str | None
    at_revision: str | None
    error: str | None
    failed_in_migration: bool
    started_at: datetime
    finished_at: datetime
    failed_step: str | None = None
    detail: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class SchemaLock:
    """A session advisory lock on the stamp's own database, held while its schema changes.

    It lives on the stamp (not in the catalog) so it also excludes runs pointed at another catalog,
    and the server drops it with the holder's session, so a killed run never blocks the next one.
    A second run fails at once naming the stamp instead of queueing behind the first.
    """

    def __init__(self, stamp: Stamp) -> None:
        self.stamp = stamp
        self.conn: psycopg.Connection[Any] | None = None
        self._stack = ExitStack()

    def __enter__(self) -> SchemaLock:
        conn = self._stack.enter_context(stamps.connect(self.stamp))
        if not try_lock(conn, LOCK_KEY):
            holder = _holder(conn)
            self._stack.close()
            raise LockBusy(f"stamp {self.stamp.name} is being migrated by another migrator run{holder}")
        self.conn = conn
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        try:
            if self.conn is not None and not self.conn.closed:
                self.conn.execute("SELECT pg_advisory_unlock(%s)", (LOCK_KEY,))
        except psycopg.Error:
            pass  # closing the session below releases it anyway
        finally:
            self.conn = None
            self._stack.close()


def _holder(conn: psycopg.Connection[Any]) -> str:
    """' (backend pid N, since T)' for the session holding the lock, when it is visible to us."""
    unsigned = LOCK_KEY & 0xFFFFFFFFFFFFFFFF
    row = conn.execute(
        "SELECT l.pid, a.backend_start FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid"
        " WHERE l.locktype = 'advisory' AND l.granted AND l.classid = %s::oid AND l.objid = %s::oid"
        " AND l.objsubid = 1 AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        (unsigned >> 32, unsigned & 0xFFFFFFFF),
    ).fetchone()
    if row is None:
        return ""
    since = f", since {row[1]:%Y-%m-%d %H:%M:%S} UTC" if row[1] else ""
    return f" (backend pid {row[0]}{since})"


def run_job(job: Job) -> JobResult:
    """Never raises: every failure becomes the result's one-line, password-free error."""
    started = datetime.now(UTC)
    before: str | None = None
    after: str | None = None
    error: str | None = None
    detail: str | None = None
    in_migration = False
    steps = StepWatch()
    try:
        with SchemaLock(job.stamp) as lock:
            assert lock.conn is not None
            before = after = read_revision(lock.conn)
            try:
                in_migration = True
                _alembic(job, lock.conn, steps)
                in_migration = False
            finally:
                after = _revision_after(lock.conn)
            _place_sequences(job, lock.conn)
    except MigratorError as exc:
        error = str(exc)
    except Exception as exc:  # a worker reports, it never takes the rollout down
        error, detail = reason(exc, job.stamp.dsn), trace(exc, job.stamp.dsn)
    step = steps.step if in_migration else None
    return JobResult(job.stamp.name, before, after, error, in_migration, started, datetime.now(UTC), step, detail)


@dataclass(frozen=True)
class StepDone:
    """How one stamp's step ended, as every record of it says so (the rollout's report, `schema_runs`).

    A step that failed inside a migration names the revision that failed and where the stamp was
    left; one that never read the stamp (lock or connection) keeps the revision the plan saw.
    """

    stamp: str
    result: StepResult  # OK or FAILED
    from_revision: str | None
    at_revision: str | None
    error: str | None
    started_at: datetime
    finished_at: datetime
    detail: str | None = None  # the traceback of an unexpected error, for `--verbose`


def run_stamp_step(job: Job, current: str | None) -> StepDone:
    """One stamp's step of a rollout, whoever schedules it: a local wave (inline or in a worker
    process, see `Workers`) or a queued step on a `migrator worker`. `current` is the revision the
    rollout's plan read on the stamp. Never raises."""
    return step_done(run_job(job), job.direction, current)


def step_done(result: JobResult, direction: str, current: str | None) -> StepDone:
    """A job's result in the one wording of a step's outcome (see `StepDone`)."""
    error = result.error
    if error and result.failed_in_migration:
        step = result.failed_step or direction  # None: env.py failed before any revision ran
        error = f"{step} failed, stamp left at {result.at_revision or 'base'}: {error}"
    read = result.from_revision is not None or result.failed_in_migration or result.ok  # else: lock or connect
    return StepDone(
        result.stamp,
        StepResult.OK if result.ok else StepResult.FAILED,
        result.from_revision if read else current,
        result.at_revision if read else current,
        error,
        result.started_at,
        result.finished_at,
        result.detail,
    )


def _place_sequences(job: Job, conn: psycopg.Connection[Any]) -> None:
    """After an upgrade of a strided stamp: the sequences of tables its revisions created start in the
    stamp's block (a failure is the step's: the stamp is upgraded, its new ids not yet apart)."""
    if job.direction != "upgrade" or job.tenancy is None or job.stamp.key_block is None:
        return
    try:
        keyspace.place_sequences(conn, job.tenancy, job.stamp, job.known_blocks)
    except (MigratorError, psycopg.Error) as exc:
        raise MigratorError(
            f"stamp {job.stamp.name} is upgraded, but its sequences are not in its block {job.stamp.key_block}: "
            f"{reason(exc, job.stamp.dsn) if isinstance(exc, psycopg.Error) else exc}"
        ) from None


def _revision_after(conn: psycopg.Connection[Any]) -> str | None:
    """Re-read after the run; None (unknown) if the lock's session died as well."""
    try:
        return read_revision(conn)
    except psycopg.Error:
        return None


def _alembic(job: Job, conn: psycopg.Connection[Any], steps: StepWatch) -> None:
    """Alembic with the lock's own session offered to env.py, and the stamp's URL for one that connects itself.

    An env.py that takes `config.attributes["connection"]` migrates on the lock's session (one
    connection per stamp; the lock dies with the migration). One that builds its engine from
    `sqlalchemy.url` (the stock `alembic init` env.py) opens its own connection; the session lock
    stays held on the lock's session until Alembic returns, so it excludes other runs all the same.
    StaticPool hands SQLAlchemy the lock's connection without ever closing it; the lock closes it.
    """
    conn.autocommit = False  # Alembic runs each revision in its own transaction
    engine = create_engine("postgresql+psycopg://", creator=lambda: conn, poolclass=StaticPool)
    try:
        with ALEMBIC_IN_PROCESS, steps, engine.connect() as sa_conn:
            url = dsnlib.sqlalchemy_url(job.stamp.dsn)
            config = migrations.alembic_config(job.script_location, sa_conn, url)
            if job.direction == "upgrade":
                command.upgrade(config, job.target)
            else:
                command.downgrade(config, job.target)
    finally:
        if not conn.closed and not conn.broken:
            conn.rollback()
            conn.autocommit = True


class StepWatch(logging.Handler):
    """Notes the revision Alembic is running, from the step its migration logger announces at INFO.

    So a failure names the revision that failed even when env.py runs every revision in one
    transaction (the stock env.py does), where the stamp's revision afterwards tells nothing.
    Used as a context manager around one Alembic command; the logger's level is restored after.
    """

    LOGGER = "alembic.runtime.migration"

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.step: str | None = None
        self._level = logging.NOTSET

    def emit(self, record: logging.LogRecord) -> None:
        for arg in record.args if isinstance(record.args, tuple) else ():
            if isinstance(arg, RevisionStep):
                self.step = f"{'upgrade' if arg.is_upgrade else 'downgrade'} {arg.revision.revision}"

    def __enter__(self) -> StepWatch:
        logger = logging.getLogger(self.LOGGER)
        self._level = logger.level
        if logger.getEffectiveLevel() > logging.INFO:
            logger.setLevel(logging.INFO)
        logger.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logger = logging.getLogger(self.LOGGER)
        logger.removeHandler(self)
        logger.setLevel(self._level)


def reason(exc: BaseException, *dsns: str) -> str:
    """One line: the database's own words (first line and DETAIL), not SQLAlchemy's wrapping, minus any password."""
    original = getattr(exc, "orig", None) if isinstance(exc, SQLAlchemyError) else None
    if isinstance(original, BaseException):
        exc = original
    lines = str(exc).strip().splitlines()
    if isinstance(exc, CommandError | psycopg.Error):
        lines = lines or [type(exc).__name__]
        text = "; ".join([lines[0], *(line.strip() for line in lines[1:] if line.startswith("DETAIL:"))])
    else:
        text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return dsnlib.scrub(text, *dsns)


def trace(exc: BaseException, *dsns: str) -> str:
    """The full traceback, minus any password: what `migrator -v` shows after the one-line error."""
    return dsnlib.scrub("".join(traceback.format_exception(exc)), *dsns).rstrip()


class Workers:
    """Runs a wave's jobs: a wave of one (or every wave when `size` is 1) inline, wider waves in up to `size`
    worker processes.

    Workers fork from a fork server that imported `PRELOAD` once (fast, and no connection of this
    process is inherited). They are started in the background before the canary runs, so their
    start-up overlaps with it instead of delaying the first wide wave.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._pool: ProcessPoolExecutor | None = None
        self._starter: threading.Thread | None = None
        if size > 1:
            warm_up()
            self._pool = ProcessPoolExecutor(max_workers=size, mp_context=_context(), initializer=_ignore_stop_signals)
            # Each submit starts a process while none is idle; in a thread, so it overlaps the canary.
            self._starter = threading.Thread(target=self._start_all, name="schema-workers", daemon=True)
            self._starter.start()

    def _start_all(self) -> None:
        assert self._pool is not None
        for _ in range(self.size):
            self._pool.submit(_started)

    def run(self, steps: list[tuple[Job, str | None]]) -> Iterator[StepDone]:
        """`run_stamp_step` of each (job, revision the plan read); results in the order they finish. Inline,
        one after the other, for a wave of one or without worker processes (`size` 1: --parallel 1 with
        --waves wider than one)."""
        if len(steps) == 1 or self._pool is None:
            for step in steps:
                yield run_stamp_step(*step)
            return
        futures = {self._pool.submit(run_stamp_step, *step): step for step in steps}
        for future in as_completed(futures):
            try:
                yield future.result()
            except BrokenProcessPool as exc:
                job, current = futures[future]
                now = datetime.now(UTC)
                died = JobResult(job.stamp.name, None, None, f"worker process died: {exc}", False, now, now)
                yield step_done(died, job.direction, current)

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._starter is not None:
            self._starter.join()  # never shut the pool down under a submit
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


def _started() -> int:
    return 0


def _ignore_stop_signals() -> None:
    """A worker process runs its stamp's step to the end: Ctrl-C and SIGTERM reach the whole process group,
    and the main process decides what stops (it starts no more waves)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def warm_up() -> None:
    """Start the fork server now (it imports in the background); idempotent."""
    if _context().get_start_method() == "forkserver":
        forkserver.ensure_running()


def _context() -> Any:
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(PRELOAD)
        return context
    return multiprocessing.get_context("spawn")
