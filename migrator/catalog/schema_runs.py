"""The catalog's record of schema rollouts (`schema_runs`): written per stamp as a rollout goes, read by `schema log`.

Every stamp of every run gets a row: `running` while it migrates, then ok / failed, or skipped /
dry-run when it was not migrated, with its from/to revisions and the error, so `migrator schema
log` answers who changed which stamp when, and how it ended.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import class_row

from migrator.catalog.models import CLAIMABLE_STEPS, StepResult
from migrator.catalog.store import Catalog
from migrator.db import dsn as dsnlib
from migrator.db.retry import CATALOG


@dataclass(frozen=True)
class SchemaRun:
    """A row of `schema_runs`: who ran what on which stamp, and how it ended."""

    id: int
    run_id: str
    stamp: str
    direction: str
    from_revision: str | None
    to_revision: str | None
    result: str
    error: str | None
    operator: str
    started_at: datetime
    finished_at: datetime | None
    wave: int | None = None  # the rollout's wave (0: the canary, when it had one); None: not run


def runs(catalog: Catalog, stamp: str | None = None, limit: int = 50) -> list[SchemaRun]:
    """Recorded per-stamp runs, newest first (`migrator schema log`)."""
    if stamp is not None:
        catalog.stamp(stamp)
    with catalog.transaction() as conn, conn.cursor(row_factory=class_row(SchemaRun)) as cur:
        cur.execute(
            "SELECT id, run_id::text AS run_id, stamp, direction, from_revision, to_revision, result, error, operator,"
            " started_at, finished_at, wave FROM schema_runs WHERE %(stamp)s::text IS NULL OR stamp = %(stamp)s"
            " ORDER BY started_at DESC, id DESC LIMIT %(limit)s",
            {"stamp": stamp, "limit": limit},
        )
        return cur.fetchall()


class RunLog:
    """The rollout's rows in the catalog's `schema_runs`, one per stamp, `running` until it ends.

    One catalog connection for the whole rollout (reopened if it drops: policy CATALOG), one INSERT per
    wave, so recording stays cheap next to the migrations themselves. It takes plain values (stamp
    names, revisions, results), so the catalog knows nothing of the rollout that writes it.
    """

    def __init__(self, catalog: Catalog, run_id: str, direction: str, target: str | None) -> None:
        self.catalog, self.run_id, self.direction, self.target = catalog, run_id, direction, target
        self._conn: psycopg.Connection[Any] | None = None

    @CATALOG.wraps
    def _execute(self, query: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        """One autocommit statement; a failed one drops the connection, so the retry reconnects."""
        try:
            if self._conn is None or self._conn.closed:
                self._conn = dsnlib.connect(self.catalog.url, autocommit=True)
            cursor = self._conn.execute(query, params)
            return cursor.fetchall() if cursor.description else []
        except psycopg.Error:
            self.close()
            raise

    def start(self, stamps: Sequence[tuple[str, str | None]], wave: int) -> dict[str, int]:
        """Rows `running` for a wave's (stamp name, revision before the run): stamp name -> row id."""
        return self._insert([(name, revision, wave) for name, revision in stamps], StepResult.RUNNING)

    def queue(self, stamps: Sequence[tuple[str, str | None, int]], result: StepResult) -> None:
        """Rows of a queued rollout's (stamp name, revision now, wave): `queued` for workers to run now,
        `waiting` for a later wave (see `release`)."""
        self._insert(stamps, result)

    def _insert(self, stamps: Sequence[tuple[str, str | None, int]], result: StepResult) -> dict[str, int]:
        found = self._execute(
            "INSERT INTO schema_runs (run_id, stamp, direction, from_revision, to_revision, result, wave)"
            " SELECT %s, u.stamp, %s, u.from_revision, %s, %s, u.wave"
            " FROM unnest(%s::text[], %s::text[], %s::int[]) AS u(stamp, from_revision, wave) RETURNING stamp, id",
            (
                self.run_id,
                self.direction,
                self.target,
                result,
                [stamp for stamp, _, _ in stamps],
                [revision for _, revision, _ in stamps],
                [wave for _, _, wave in stamps],
            ),
        )
        return {stamp: int(row_id) for stamp, row_id in found}

    def claim(self, stamp: str) -> int | None:
        """A worker takes a stamp of this run, `running` from now; None once it has ended.

        A `running` stamp is taken again: its worker died (its job came back to the queue); the
        stamp's own schema lock still keeps two live runs apart.
        """
        found = self._execute(
            "UPDATE schema_runs SET result = %s, started_at = now() WHERE run_id = %s AND stamp = %s"
            " AND result = ANY(%s) RETURNING id",
            (StepResult.RUNNING, self.run_id, stamp, sorted(CLAIMABLE_STEPS)),
        )
        return int(found[0][0]) if found else None

    def rows(self) -> list[tuple[str, StepResult, str | None]]:
        """This run's stamps: (stamp, result, error), in the order they were recorded."""
        return [
            (str(s), StepResult(r), e)
            for s, r, e in self._execute(
                "SELECT stamp, result, error FROM schema_runs WHERE run_id = %s ORDER BY id", (self.run_id,)
            )
        ]

    def skip_queued(self, stamps: Sequence[str] | None, why: str) -> list[str]:
        """Queued or waiting stamps (`None`: all of the run's) that will not run (the canary, an earlier
        stamp or a wave's check failed); returns those skipped now."""
        found = self._execute(
            "UPDATE schema_runs SET result = %s, error = %s, finished_at = now() WHERE run_id = %s"
            " AND (%s::text[] IS NULL OR stamp = ANY(%s::text[])) AND result = ANY(%s) RETURNING stamp",
            (
                StepResult.SKIPPED,
                why,
                self.run_id,
                None if stamps is None else list(stamps),
                None if stamps is None else list(stamps),
                [StepResult.QUEUED, StepResult.WAITING],
            ),
        )
        return [str(row[0]) for row in found]

    def wave(self, number: int) -> list[tuple[str, StepResult]]:
        """A queued rollout's wave: (stamp, result) of its stamps, by name."""
        return [
            (str(stamp), StepResult(result))
            for stamp, result in self._execute(
                "SELECT stamp, result FROM schema_runs WHERE run_id = %s AND wave = %s ORDER BY stamp",
                (self.run_id, number),
            )
        ]

    def wave_of(self, stamp: str) -> int | None:
        """The wave a stamp of this run belongs to (None: not in a wave)."""
        found = self._execute(
            "SELECT wave FROM schema_runs WHERE run_id = %s AND stamp = %s ORDER BY id DESC LIMIT 1",
            (self.run_id, stamp),
        )
        return None if not found or found[0][0] is None else int(found[0][0])

    def release(self, wave: int) -> list[str]:
        """The `waiting` stamps of `wave`, now `queued`: exactly one caller gets them (the others none)."""
        found = self._execute(
            "UPDATE schema_runs SET result = %s WHERE run_id = %s AND wave = %s AND result = %s RETURNING stamp",
            (StepResult.QUEUED, self.run_id, wave, StepResult.WAITING),
        )
        return sorted(str(row[0]) for row in found)

    def add(
        self, stamp: str, from_revision: str | None, result: StepResult, error: str | None, wave: int | None = None
    ) -> None:
        """A stamp that was not run (skipped, dry run, refused): recorded as finished at once."""
        self._execute(
            "INSERT INTO schema_runs (run_id, stamp, direction, from_revision, to_revision, result, error,"
            " finished_at, wave) VALUES (%s, %s, %s, %s, %s, %s, %s, now(), %s)",
            (self.run_id, stamp, self.direction, from_revision, self.target, result, error, wave),
        )

    def finish(self, row_id: int, from_revision: str | None, result: StepResult, error: str | None) -> None:
        """A stamp's run ended: its result and error, and the revision it was really at before."""
        self._execute(
            "UPDATE schema_runs SET result = %s, error = %s, from_revision = %s, finished_at = now() WHERE id = %s",
            (result, error, from_revision, row_id),
        )

    def target_of(self) -> str | None:
        """The revision this run goes to, as its rows recorded it (None: no row, or a downgrade to base)."""
        found = self._execute("SELECT to_revision FROM schema_runs WHERE run_id = %s LIMIT 1", (self.run_id,))
        return str(found[0][0]) if found and found[0][0] is not None else None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
