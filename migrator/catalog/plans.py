"""The catalog's record of plans (`plans`, `plan_moves`): each entry's status, failures and move.

A plan is keyed by the sha256 digest of its file's bytes, so running the same file again finds its
record. Local applies and workers write it through `Ledger`; `plan status` and `plan wait` read it.
It takes plain values (digests, positions, tenants), so the catalog knows nothing of the planners.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from psycopg.rows import class_row

from migrator.catalog import audit
from migrator.catalog.models import EntryStatus, PlanStatus
from migrator.catalog.store import Catalog


@dataclass(frozen=True)
class PlanFile:
    """A plan file's identity: the path it was read from (for messages) and the sha256 of its bytes, the key
    of its record, so a re-run of the same bytes finds its record wherever the file now lies."""

    path: str
    digest: str

    @classmethod
    def of(cls, path: Path, content: bytes) -> PlanFile:
        return cls(str(path), hashlib.sha256(content).hexdigest())


@dataclass(frozen=True)
class PlanRecord:
    """A plan file as the catalog records it (`plans`): its identity and its entries."""

    file: PlanFile
    kind: str
    entries: tuple[EntryRecord, ...]


@dataclass(frozen=True)
class EntryIdentity:
    """Which entry of a plan: its position in the file, its tenants, and the stamps they move from and to."""

    position: int
    tenants: tuple[str, ...]
    source: str
    target: str


@dataclass(frozen=True)
class EntryRecord(EntryIdentity):
    """A plan entry to record (`plan_moves`); `done` marks one found finished before this run."""

    rows: int
    bytes: int
    queue: str | None  # the entry's own `queue:` in the file
    done: bool = False


@dataclass(frozen=True)
class LedgerEntry:
    """An entry as the catalog records it (`plan_moves`): what workers run and `plan status` shows."""

    position: int
    tenants: list[str]
    source: str
    target: str
    rows: int
    status: EntryStatus
    move_id: int | None
    queue: str | None
    failures: int
    error: str | None


class Ledger:
    """A plan's progress in the catalog, keyed by the sha256 digest of the plan file's bytes."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    def statuses(self, digest: str) -> dict[int, EntryStatus]:
        with self.catalog.transaction() as conn:
            rows = conn.execute(
                "SELECT m.position, m.status FROM plan_moves m JOIN plans p ON p.id = m.plan_id WHERE p.digest = %s",
                (digest,),
            ).fetchall()
        return {int(position): EntryStatus(status) for position, status in rows}

    def open(self, plan: PlanRecord, queue: str | None = None) -> int:
        """Record the plan and its entries (once; a re-run keeps their status) and mark it running, with
        the apply's audit record.

        With `queue` (`apply --queue`), each entry records the workers' queue it is sent to: its own
        `queue:` from the file, else `queue`.
        """
        with self.catalog.transaction() as conn:
            row = conn.execute(
                "INSERT INTO plans (digest, path, kind) VALUES (%s, %s, %s) ON CONFLICT (digest)"
                " DO UPDATE SET status = %s, path = EXCLUDED.path, updated_at = now() RETURNING id",
                (plan.file.digest, plan.file.path, plan.kind, PlanStatus.RUNNING),
            ).fetchone()
            assert row is not None
            plan_id = int(row[0])
            with conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO plan_moves (plan_id, position, tenant, tenants, source, target, size_rows,"
                    " size_bytes, queue) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (plan_id, position)"
                    " DO UPDATE SET tenants = EXCLUDED.tenants, queue = EXCLUDED.queue",
                    [
                        (plan_id, e.position, e.tenants[0], list(e.tenants), e.source, e.target, e.rows, e.bytes,
                         queue and (e.queue or queue))
                        for e in plan.entries
                    ],
                )  # fmt: skip
            for entry in plan.entries:
                if entry.done:
                    conn.execute(
                        "UPDATE plan_moves SET status = %(done)s, error = NULL, updated_at = now()"
                        " WHERE plan_id = %(plan)s AND position = %(position)s AND status <> %(done)s",
                        {"done": EntryStatus.DONE, "plan": plan_id, "position": entry.position},
                    )
            todo = [e for e in plan.entries if not e.done]
            reason = f"{plan.kind} plan {plan.file.path}: {len(todo)} of {len(plan.entries)} moves to run" + (
                f", queued on {queue}" if queue else ""
            )
            tenants = [t for e in todo for t in e.tenants]
            audit.record(conn, self.catalog.actor, audit.Event(audit.Action.PLAN_APPLY, tenants, reason=reason))
        return plan_id

    def mark(
        self, plan_id: int, position: int, status: EntryStatus, move_id: int | None = None, error: str | None = None
    ) -> None:
        with self.catalog.transaction() as conn:
            conn.execute(
                "UPDATE plan_moves SET status = %s, move_id = coalesce(%s, move_id), error = %s, updated_at = now()"
                " WHERE plan_id = %s AND position = %s",
                (status, move_id, None if error is None else error[:2000], plan_id, position),
            )

    def close(self, plan_id: int, status: PlanStatus) -> None:
        with self.catalog.transaction() as conn:
            conn.execute("UPDATE plans SET status = %s, updated_at = now() WHERE id = %s", (status, plan_id))

    def entries(self, plan_id: int, position: int | None = None) -> list[LedgerEntry]:
        """The recorded entries of a plan (or one of them), as workers and `plan status` read them."""
        with self.catalog.transaction() as conn, conn.cursor(row_factory=class_row(LedgerEntry)) as cur:
            cur.execute(
                "SELECT position, coalesce(tenants, ARRAY[tenant]) AS tenants, source, target, size_rows AS rows,"
                " status, move_id, queue, failures, error FROM plan_moves"
                " WHERE plan_id = %s AND (%s::integer IS NULL OR position = %s) ORDER BY position",
                (plan_id, position, position),
            )
            return cur.fetchall()

    def plan(self, digest: str) -> tuple[int, PlanStatus] | None:
        with self.catalog.transaction() as conn:
            row = conn.execute("SELECT id, status FROM plans WHERE digest = %s", (digest,)).fetchone()
        return None if row is None else (int(row[0]), PlanStatus(row[1]))

    def failed_attempt(self, plan_id: int, position: int, error: str) -> int:
        """A worker's run of the entry failed and may be retried: back to pending; returns failures so far."""
        with self.catalog.transaction() as conn:
            row = conn.execute(
                "UPDATE plan_moves SET status = %s, failures = failures + 1, error = %s, updated_at = now()"
                " WHERE plan_id = %s AND position = %s RETURNING failures",
                (EntryStatus.PENDING, error[:2000], plan_id, position),
            ).fetchone()
        assert row is not None
        return int(row[0])

    def settle(self, plan_id: int) -> PlanStatus | None:
        """Once no entry is pending or running, the plan is done or failed (workers end plans this way)."""
        with self.catalog.transaction() as conn:
            row = conn.execute(
                "UPDATE plans p SET status = CASE WHEN EXISTS (SELECT 1 FROM plan_moves m WHERE m.plan_id = p.id"
                " AND m.status = %(failed)s) THEN %(failed)s ELSE %(done)s END, updated_at = now()"
                " WHERE p.id = %(plan)s AND NOT EXISTS (SELECT 1 FROM plan_moves m WHERE m.plan_id = p.id"
                " AND m.status IN (%(pending)s, %(running)s)) RETURNING p.status",
                {
                    "failed": EntryStatus.FAILED,
                    "done": EntryStatus.DONE,
                    "pending": EntryStatus.PENDING,
                    "running": EntryStatus.RUNNING,
                    "plan": plan_id,
                },
            ).fetchone()
        return None if row is None else PlanStatus(row[0])
