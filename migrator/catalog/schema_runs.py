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

from migrator.catalog.models import UNFINISHED_STEPS, StepResult
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


def runs(catalog: Catalog, stamp: str | None = None, limit: int = 50) -> list[SchemaRun]:
    """Recorded per-stamp runs, newest first (`migrator schema log`)."""
    if stamp is not None:
        catalog.stamp(stamp)
    with catalog.transaction() as conn, conn.cursor(row_factory=class_row(SchemaRun)) as cur:
        cur.execute(
            "SELECT id, run_id::text AS run_id, stamp, direction, from_revision, to_revision, result, error, operator,"
            " started_at, finished_at FROM schema_runs WHERE %(stamp)s::text IS NULL OR stamp = %(stamp)s"
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

    def start(self, stamps: Sequence[tuple[str, str | None]]) -> dict[str, int]:
        """Rows `running` for a wave's (stamp name, revision before the run): stamp name -> row id."""
        return self._insert(stamps, StepResult.RUNNING)

    def queue(self, stamps: Sequence[tuple[str, str | None]]) -> None:
        """Rows `queued` for a queued rollout's stamps (stamp name, revision now): workers run them."""
        self._insert(stamps, StepResult.QUEUED)

    def _insert(self, stamps: Sequence[tuple[str, str | None]], result: StepResult) -> dict[str, int]:
        found = self._execute(
            "INSERT INTO schema_runs (run_id, stamp, direction, from_revision, to_revision, result)"
            " SELECT %s, u.stamp, %s, u.from_revision, %s, %s"
            " FROM unnest(%s::text[], %s::text[]) AS u(stamp, from_revision) RETURNING stamp, id",
            (
                self.run_id,
                self.direction,
                self.target,
                result,
                [stamp for stamp, _ in stamps],
                [revision for _, revision in stamps],
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
            (StepResult.RUNNING, self.run_id, stamp, sorted(UNFINISHED_STEPS)),
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

    def skip_queued(self, stamps: Sequence[str], why: str) -> None:
        """Queued stamps that will not run (the canary or an earlier stamp failed)."""
        self._execute(
            "UPDATE schema_runs SET result = %s, error = %s, finished_at = now() WHERE run_id = %s"
            " AND stamp = ANY(%s) AND result = %s",
            (StepResult.SKIPPED, why, self.run_id, list(stamps), StepResult.QUEUED),
        )

    def add(self, stamp: str, from_revision: str | None, result: StepResult, error: str | None) -> None:
        """A stamp that was not run (skipped, dry run, refused): recorded as finished at once."""
        self._execute(
            "INSERT INTO schema_runs (run_id, stamp, direction, from_revision, to_revision, result, error,"
            " finished_at) VALUES (%s, %s, %s, %s, %s, %s, %s, now())",
            (self.run_id, stamp, self.direction, from_revision, self.target, result, error),
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
