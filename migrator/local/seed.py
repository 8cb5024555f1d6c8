"""Sample tenants for the stamp schema, generated server-side so a million rows take seconds.

Every table is filled by one `INSERT ... SELECT FROM generate_series`; values vary deterministically
with the series number and cover what a copy must preserve: jsonb, arrays with NULL elements and
quotes, NULLs, numerics with decimals, microsecond timestamps, empty and large bytea, inet/cidr-like
values, multi-line and non-ASCII text. Parent ids are looked up through arrays built once per
statement (an InitPlan), never through per-row joins whose plan depends on stale statistics.
Every 7th task (with its comments and attachments) is deleted afterwards, so ids have gaps.
Stamps at older schema revisions can be seeded too: `tasks.priority` (0003), `task_watchers`
(0005) and `task_checklist_items` (0006, a table reached through tasks only) are filled only where
they exist.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import errors, sql
from psycopg.types.json import Jsonb

from migrator.db import dsn as dsnlib
from migrator.errors import BadInput

# Shares of a tenant's rows per table; tasks dominate as in a real task tracker.
SHARES = {
    "users": 0.05,
    "projects": 0.02,
    "tasks": 0.58,
    "comments": 0.20,
    "attachments": 0.08,
    "watchers": 0.03,
    "checklist": 0.04,
}
GAP_EVERY = 7
PLANS = ("free", "team", "enterprise")
TENANT_TABLES = ("tenants", "users", "projects", "tasks", "comments", "attachments", "task_watchers")
PATH_TABLES = ("task_checklist_items",)  # no tenant_id: their rows reach the tenant through tasks


@dataclass(frozen=True)
class TenantSpec:
    """One tenant to create: its id (assigned by the operator) and roughly how many rows it owns."""

    tenant_id: int
    rows: int
    name: str | None = None


@dataclass(frozen=True)
class _Plan:
    """How many rows to insert per table so that about `rows` remain after the gap-making deletes."""

    users: int
    projects: int
    tasks: int
    comments: int
    attachments: int
    watchers: int
    checklist: int

    @classmethod
    def for_rows(cls, rows: int) -> _Plan:
        refill = GAP_EVERY / (GAP_EVERY - 1)  # tasks, comments and attachments lose 1 in 7
        return cls(
            users=max(1, round(rows * SHARES["users"])),
            projects=max(1, round(rows * SHARES["projects"])),
            tasks=max(1, round(rows * SHARES["tasks"] * refill)),
            comments=round(rows * SHARES["comments"] * refill),
            attachments=round(rows * SHARES["attachments"] * refill),
            watchers=round(rows * SHARES["watchers"]),  # inserted after the gaps: no refill
            checklist=round(rows * SHARES["checklist"]),  # likewise
        )


_USERS = """
INSERT INTO users (tenant_id, email, profile, created_at)
SELECT %(t)s,
       'user' || g || '@t' || %(t)s || (ARRAY['.example.com', '.example.org', '.test'])[1 + mod(g, 3)],
       CASE WHEN mod(g, 9) = 0 THEN NULL ELSE jsonb_build_object(
           'display_name', (ARRAY['Ana María', 'O''Brien', 'Zoë Ünal', '李小龙', 'Back\\slash',
                                  'Tab' || chr(9) || 'Tom', 'Line' || chr(10) || 'Break'])[1 + mod(g, 7)] || ' ' || g,
           'locale', (ARRAY['en-US', 'de-DE', 'fr-FR', 'ja-JP'])[1 + mod(g, 4)],
           'age', 18 + mod(g * 7, 60),
           'score', round(mod(g * 37, 1000) / 7.0, 3),
           'tags', CASE mod(g, 3) WHEN 0 THEN '[]'::jsonb ELSE jsonb_build_array('beta', g, NULL) END,
           'prefs', jsonb_build_object('dark', mod(g, 2) = 0, 'digest', CASE WHEN mod(g, 5) = 0 THEN NULL
                                                                          ELSE 'weekly' END))
       END,
       timestamptz '2024-01-01 00:00:00+00' + g * interval '17 minutes 3.141592 seconds'
FROM generate_series(1, %(n)s::bigint) AS g
"""

_PROJECTS = """
INSERT INTO projects (tenant_id, name, tags, budget, owner_id)
SELECT %(t)s,
       'Project ' || g || CASE WHEN mod(g, 5) = 0 THEN ' — “quoted”, with, commas' ELSE '' END,
       CASE mod(g, 5) WHEN 0 THEN '{}'::text[] WHEN 1 THEN ARRAY['alpha'] WHEN 2 THEN ARRAY['alpha', 'beta', 'gamma']
                      WHEN 3 THEN ARRAY['needs "review"', 'a,b', '{braces}'] ELSE ARRAY['q' || g, NULL] END,
       CASE WHEN mod(g, 4) = 0 THEN NULL ELSE round(mod(g * 7919, 1000000) + mod(g, 100) / 100.0, 2) END,
       CASE WHEN mod(g, 6) = 0 THEN NULL
            ELSE ((SELECT array_agg(id ORDER BY id) FROM users WHERE tenant_id = %(t)s))[1 + mod(g, %(nu)s)] END
FROM generate_series(1, %(n)s::bigint) AS g
"""

_TASK_COLUMNS = "tenant_id, project_id, title, status, estimate_hours, due_at, labels, meta"
_TASK_VALUES = """%(t)s,
       ((SELECT array_agg(id ORDER BY id) FROM projects WHERE tenant_id = %(t)s))[1 + (g - 1) * %(np)s / %(n)s],
       CASE mod(g, 13) WHEN 0 THEN 'Fix "quotes", \\backslashes\\ and ''apostrophes'' #' || g
                       WHEN 1 THEN 'Line one' || chr(10) || 'line two #' || g
                       WHEN 2 THEN 'Ünïcødé ✓ 🚀 #' || g
                       ELSE 'Task ' || g END,
       CASE mod(g, 3) WHEN 0 THEN 'todo'::task_status WHEN 1 THEN 'doing' ELSE 'done' END,
       CASE WHEN mod(g, 5) = 0 THEN NULL ELSE round(mod(g * 31, 4000) / 100.0 + 0.25, 2) END,
       CASE WHEN mod(g, 3) = 0 THEN NULL
            ELSE timestamptz '2025-01-01 00:00:00+00' + g * interval '41 minutes 7.654321 seconds' END,
       CASE mod(g, 6) WHEN 0 THEN NULL WHEN 1 THEN '{}'::text[] WHEN 2 THEN ARRAY['bug']
                      WHEN 3 THEN ARRAY['bug', 'p1', 'frontend'] WHEN 4 THEN ARRAY['with space', 'semi;colon', NULL]
                      ELSE ARRAY['l' || mod(g, 50)] END,
       CASE WHEN mod(g, 4) = 0 THEN NULL ELSE (  -- JSON text: parsing it is cheaper than jsonb_build_object
           '{"points": ' || mod(g, 13) || ', "ratio": ' || round(mod(g * 17, 1000) / 999.0, 4)
           || ', "done": ' || (mod(g, 2) = 0) || ', "reviewer": '
           || CASE WHEN mod(g, 3) = 0 THEN 'null' ELSE '"rev' || mod(g, 40) || '"' END
           || ', "checklist": [{"item": "step 1", "ok": true}, {"item": "naïve café", "ok": '
           || (mod(g, 2) = 1) || '}]}'
       )::jsonb END"""
# Revision 0003's backfill rule on the labels above ('p1' -> 1, 'bug' -> 2, else 3); meta has no priority.
_TASK_PRIORITY = "CASE mod(g, 6) WHEN 3 THEN 1 WHEN 2 THEN 2 ELSE 3 END"


def _tasks_statement(with_priority: bool) -> sql.Composed:
    """The tasks INSERT, filling `priority` when the stamp's schema has it (revision 0003 on)."""
    columns: list[sql.Composable] = [sql.SQL(_TASK_COLUMNS)]
    values: list[sql.Composable] = [sql.SQL(_TASK_VALUES)]
    if with_priority:
        columns.append(sql.Identifier("priority"))
        values.append(sql.SQL(_TASK_PRIORITY))
    return sql.SQL("INSERT INTO tasks ({})\nSELECT {}\nFROM generate_series(1, %(n)s::bigint) AS g").format(
        sql.SQL(", ").join(columns), sql.SQL(",\n       ").join(values)
    )


_COMMENTS = """
INSERT INTO comments (tenant_id, task_id, author_id, body, created_at)
SELECT %(t)s,
       ((SELECT array_agg(id ORDER BY id) FROM tasks WHERE tenant_id = %(t)s))[1 + (g - 1) * %(nt)s / %(n)s],
       CASE WHEN mod(g, 11) = 0 THEN NULL
            ELSE ((SELECT array_agg(id ORDER BY id) FROM users WHERE tenant_id = %(t)s))[1 + mod(g * 13, %(nu)s)] END,
       CASE mod(g, 4) WHEN 0 THEN repeat('lorem ipsum dolor ', (1 + mod(g, 60))::int)
                      WHEN 1 THEN 'LGTM 👍'
                      WHEN 2 THEN 'see ' || chr(10) || '  > quoted "reply" \\ #' || g
                      ELSE 'Comment ' || g END,
       timestamptz '2025-03-01 00:00:00+00' + g * interval '3 minutes 59.999999 seconds'
FROM generate_series(1, %(n)s::bigint) AS g
"""

_ATTACHMENTS = """
INSERT INTO attachments (tenant_id, task_id, file_name, content, uploaded_from, uploaded_at)
SELECT %(t)s,
       ((SELECT array_agg(id ORDER BY id) FROM tasks WHERE tenant_id = %(t)s))[1 + (g - 1) * %(nt)s / %(n)s],
       'file-' || g || (ARRAY['.pdf', '.png', '.txt', ' copy (2).docx', '.tar.gz', ''])[1 + mod(g, 6)],
       CASE WHEN mod(g, 10) = 0 THEN ''::bytea
            WHEN mod(g, 97) = 0 THEN decode(repeat(encode(sha256(int8send(g)), 'hex'), 300), 'hex')
            ELSE substring(decode(repeat(encode(sha256(int8send(g)), 'hex'), 8), 'hex')
                           FROM 1 FOR (1 + mod(g * 13, 256))::int)
       END,
       CASE mod(g, 5) WHEN 0 THEN NULL
                      WHEN 1 THEN ('2001:db8::' || to_hex(g / 65536) || ':' || to_hex(mod(g, 65536)))::inet
                      WHEN 2 THEN ('192.168.' || mod(g / 256, 256) || '.0/24')::inet
                      ELSE ('10.' || mod(g / 65536, 256) || '.' || mod(g / 256, 256) || '.' || mod(g, 256))::inet END,
       timestamptz '2025-02-01 00:00:00+00' + g * interval '7 minutes 0.5 seconds'
FROM generate_series(1, %(n)s::bigint) AS g
"""

# After the gaps, so every watched task exists; each watcher row watches a different task.
_WATCHERS = """
INSERT INTO task_watchers (tenant_id, task_id, user_id, created_at)
SELECT %(t)s,
       t.ids[1 + (g - 1) * cardinality(t.ids) / %(n)s],
       u.ids[1 + mod(g * 7, cardinality(u.ids))],
       timestamptz '2025-04-01 00:00:00+00' + g * interval '11 minutes 0.123456 seconds'
FROM (SELECT array_agg(id ORDER BY id) AS ids FROM tasks WHERE tenant_id = %(t)s) AS t,
     (SELECT array_agg(id ORDER BY id) AS ids FROM users WHERE tenant_id = %(t)s) AS u,
     generate_series(1, %(n)s::bigint) AS g
"""

# After the gaps too: items spread over the remaining tasks, several per task where there are more items.
_CHECKLIST = """
INSERT INTO task_checklist_items (id, task_tenant, task_id, position, label, done)
SELECT md5(%(t)s || '/' || g)::uuid, %(t)s, t.ids[1 + mod(g - 1, cardinality(t.ids))], (g - 1) / cardinality(t.ids),
       'step ' || g || (ARRAY['', ' — prüfen', ' "quoted"', E' two\nlines'])[1 + mod(g, 4)], mod(g, 3) = 0
FROM (SELECT array_agg(id ORDER BY id) AS ids FROM tasks WHERE tenant_id = %(t)s) AS t,
     generate_series(1, %(n)s::bigint) AS g
"""

# Children first: a task may only go once nothing references it.
_GAPS = (
    "DELETE FROM comments WHERE tenant_id = %(t)s AND mod(task_id, %(gap)s) = 0",
    "DELETE FROM attachments WHERE tenant_id = %(t)s AND mod(task_id, %(gap)s) = 0",
    "DELETE FROM tasks WHERE tenant_id = %(t)s AND mod(id, %(gap)s) = 0",
)


def _tenant_settings(tenant_id: int) -> dict[str, Any]:
    return {
        "region": ("eu", "us", "apac")[tenant_id % 3],
        "seats": 5 + tenant_id % 95,
        "sso": tenant_id % 2 == 0,
        "features": ["export", "api"][: tenant_id % 3],
        "billing": {"vat_rate": 0.19, "currency": "EUR", "po_number": None},
    }


def seed_tenant(conn: psycopg.Connection[Any], spec: TenantSpec) -> int:
    """Create the tenant and its rows atomically; returns the exact number of rows now stored for it.

    Runs in its own transaction (or a savepoint when the caller already has one open).
    """
    if spec.rows < 1:
        raise BadInput(f"tenant {spec.tenant_id}: rows must be at least 1, got {spec.rows}")
    plan = _Plan.for_rows(spec.rows)
    try:
        with conn.transaction():
            return _insert_tenant(conn, spec, plan)
    except errors.UniqueViolation as exc:
        if exc.diag.table_name == "tenants":
            raise BadInput(f"tenant {spec.tenant_id} already exists on this stamp") from None
        raise


def _has(conn: psycopg.Connection[Any], table: str, column: str | None = None) -> bool:
    """Whether the stamp's schema has this table (or column): seeding works at any revision from 0002."""
    row = conn.execute(
        "SELECT count(*) FROM information_schema.columns WHERE table_schema = current_schema()"
        " AND table_name = %s AND (%s::text IS NULL OR column_name = %s)",
        (table, column, column),
    ).fetchone()
    return bool(row and row[0])


def _insert_tenant(conn: psycopg.Connection[Any], spec: TenantSpec, plan: _Plan) -> int:
    params: dict[str, Any] = {"t": spec.tenant_id}
    total = conn.execute(
        "INSERT INTO tenants (id, name, plan_code, created_at, settings) VALUES (%(t)s, %(name)s, %(plan)s,"
        " timestamptz '2023-01-01 00:00:00+00' + %(t)s * interval '1 day 3 hours 7.25 seconds', %(settings)s)",
        {
            **params,
            "name": spec.name or f"Tenant {spec.tenant_id}",
            "plan": PLANS[spec.tenant_id % len(PLANS)],
            "settings": Jsonb(_tenant_settings(spec.tenant_id)),
        },
    ).rowcount
    nu = conn.execute(_USERS, {**params, "n": plan.users}).rowcount
    np = conn.execute(_PROJECTS, {**params, "n": plan.projects, "nu": nu}).rowcount
    nt = conn.execute(_tasks_statement(_has(conn, "tasks", "priority")), {**params, "n": plan.tasks, "np": np}).rowcount
    total += nu + np + nt
    if plan.comments:
        total += conn.execute(_COMMENTS, {**params, "n": plan.comments, "nt": nt, "nu": nu}).rowcount
    if plan.attachments:
        total += conn.execute(_ATTACHMENTS, {**params, "n": plan.attachments, "nt": nt}).rowcount
    removed = [conn.execute(statement, {**params, "gap": GAP_EVERY}).rowcount for statement in _GAPS]
    total -= sum(removed)
    watchers = min(plan.watchers, nt - removed[-1])  # at most one watcher per remaining task
    if watchers > 0 and _has(conn, "task_watchers"):
        total += conn.execute(_WATCHERS, {**params, "n": watchers}).rowcount
    if plan.checklist > 0 and _has(conn, "task_checklist_items"):
        total += conn.execute(_CHECKLIST, {**params, "n": plan.checklist}).rowcount
    return total


def seed_fleet_stamp(dsn: str, tenants: Sequence[TenantSpec]) -> dict[int, int]:
    """Seed several tenants on one stamp, one transaction each; returns tenant id -> row count."""
    counts: dict[int, int] = {}
    with dsnlib.connect(dsn, autocommit=True) as conn:
        for spec in tenants:
            counts[spec.tenant_id] = seed_tenant(conn, spec)
        # Fresh statistics, so the first move's queries are planned for the real table sizes.
        tables = [table for table in (*TENANT_TABLES, *PATH_TABLES) if _has(conn, table)]
        conn.execute(sql.SQL("ANALYZE {}").format(sql.SQL(", ").join(map(sql.Identifier, tables))))
    return counts


def demo_tenants(heavy_rows: int = 1_000_000, small: int = 30, first_id: int = 1) -> list[TenantSpec]:
    """One heavy tenant (`first_id`) and `small` tenants of 200-3,000 rows; the same every time."""
    rng = random.Random(first_id * 1_000_003 + small)
    specs = [TenantSpec(first_id, heavy_rows, f"Heavy Tenant {first_id}")] if heavy_rows > 0 else []
    for tenant_id in range(first_id + 1, first_id + small + 1):
        specs.append(TenantSpec(tenant_id, rng.randint(200, 3_000), f"Tenant {tenant_id}"))
    return specs
