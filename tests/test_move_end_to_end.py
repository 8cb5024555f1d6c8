"""A move flips the route only after an exact copy, and cleanup leaves nothing behind."""

from __future__ import annotations

import json

from conftest import Fleet, tenant_digest, tenant_row_count
from psycopg import sql

from migrator.db import dsn as dsnlib
from migrator.move import MoveOptions, move_tenants
from migrator.move.fence import leftovers
from migrator.progress import Silent


def test_move_flips_route_after_exact_copy_and_cleanup_empties_source(fleet: Fleet) -> None:
    rows = fleet.seed("eu-1", 7, 5_000)
    fleet.seed("eu-1", 8, 800)  # a neighbour that must stay put, untouched
    layout = fleet.layout()
    before = tenant_digest(fleet.dsn("eu-1"), layout, "7")
    neighbour = tenant_digest(fleet.dsn("eu-1"), layout, "8")

    result = fleet.run("move", "7", "--to", "eu-2", "--batch-rows", "700", "--yes", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["route"]["stamp"] == "eu-2" and out["route"]["version"] == 2
    assert out["move"]["phase"] == "flipped" and out["move"]["rows_copied"] == rows

    assert fleet.catalog.route("7").stamp == "eu-2"
    assert tenant_digest(fleet.dsn("eu-2"), layout, "7") == before
    assert tenant_digest(fleet.dsn("eu-1"), layout, "7") == before  # old copy stays until cleanup
    assert tenant_digest(fleet.dsn("eu-1"), layout, "8") == neighbour

    result = fleet.run("cleanup", "7", "--stamp", "eu-1", "--batch-rows", "333", "--yes")
    assert result.exit_code == 0, result.output
    assert tenant_row_count(fleet.dsn("eu-1"), layout, "7") == 0
    assert tenant_digest(fleet.dsn("eu-1"), layout, "8") == neighbour
    assert fleet.catalog.moves("7")[0].phase == "cleaned"
    for stamp in ("eu-1", "eu-2"):
        with dsnlib.connect(fleet.dsn(stamp), autocommit=True) as conn:
            assert leftovers(conn) == [], stamp


def test_target_sequences_are_advanced_past_copied_keys(fleet: Fleet) -> None:
    fleet.seed("eu-1", 3, 2_000)
    with dsnlib.connect(fleet.dsn("eu-1"), autocommit=True) as conn:
        top = conn.execute("SELECT max(id) FROM tasks WHERE tenant_id = 3").fetchone()[0]
    move_tenants(fleet.ctx, ("3",), "eu-2", MoveOptions(batch_rows=500), Silent())
    with dsnlib.connect(fleet.dsn("eu-2"), autocommit=True) as conn:
        project = conn.execute("SELECT id FROM projects WHERE tenant_id = 3 LIMIT 1").fetchone()[0]
        new_id = conn.execute(
            "INSERT INTO tasks (tenant_id, project_id, title) VALUES (3, %s, 'after the move') RETURNING id",
            (project,),
        ).fetchone()[0]
    assert new_id > top


def test_every_column_type_survives_byte_exact(fleet: Fleet) -> None:
    fleet.seed("eu-1", 11, 300)
    with dsnlib.connect(fleet.dsn("eu-1"), autocommit=True) as conn:
        task = conn.execute("SELECT id FROM tasks WHERE tenant_id = 11 ORDER BY id LIMIT 1").fetchone()[0]
        conn.execute(
            "UPDATE tasks SET meta = %s::jsonb, labels = ARRAY['a,b', 'quote\"', NULL, 'ünï'],"
            " estimate_hours = 123456.78, due_at = '2030-02-28 23:59:59.999999+05:30' WHERE tenant_id = 11 AND id = %s",
            ('{"nested": {"n": 1.50, "s": "tab\\there"}, "arr": [1, null, true, 1e-7]}', task),
        )
        conn.execute(
            "INSERT INTO attachments (tenant_id, task_id, file_name, content, uploaded_from)"
            " VALUES (11, %s, 'bin', %s, '2001:db8::1/128')",
            (task, bytes(range(256)) * 3),
        )
    layout = fleet.layout()
    before = tenant_digest(fleet.dsn("eu-1"), layout, "11")
    move_tenants(fleet.ctx, ("11",), "us-1", MoveOptions(batch_rows=64), Silent())
    assert tenant_digest(fleet.dsn("us-1"), layout, "11") == before
    with dsnlib.connect(fleet.dsn("us-1"), autocommit=True) as conn:
        size = conn.execute(
            sql.SQL("SELECT size_bytes FROM {} WHERE tenant_id = 11 AND file_name = 'bin'").format(
                sql.Identifier("attachments")
            )
        ).fetchone()[0]
    assert size == 768  # the generated column was recomputed on the target


def test_global_tables_are_reported_and_left_alone(fleet: Fleet) -> None:
    layout = fleet.layout()
    assert "billing_plans" in layout.global_tables
    assert "billing_plans" not in [t.name for t in layout.tables]
    order = [t.name for t in layout.tables]
    assert order.index("tenants") < order.index("projects") < order.index("tasks") < order.index("comments")


def test_copied_tables_are_analyzed_on_the_target_before_their_children(fleet: Fleet) -> None:
    """Stale statistics ("empty") on a refilled target made foreign-key checks of the next table's
    COPY walk the whole tenant per row; each copied table is analyzed before its children."""
    rows = fleet.seed("eu-1", 4, 3_000)
    layout = fleet.layout()
    with dsnlib.connect(fleet.dsn("eu-2"), autocommit=True) as conn:
        for table in layout.tables:  # only migrator may refresh the statistics during this test
            conn.execute(sql.SQL("ALTER TABLE {} SET (autovacuum_enabled = false)").format(table.ident))
            conn.execute(sql.SQL("ANALYZE {}").format(table.ident))
    move_tenants(fleet.ctx, ("4",), "eu-2", MoveOptions(batch_rows=500, online=False), Silent())
    with dsnlib.connect(fleet.dsn("eu-2"), autocommit=True) as conn:
        estimated = {
            t.name: conn.execute(
                "SELECT reltuples FROM pg_class WHERE oid = %s::regclass", (t.ident.as_string(conn),)
            ).fetchone()[0]
            for t in layout.tables
        }
    counts = tenant_digest(fleet.dsn("eu-2"), layout, "4")
    assert sum(c for c, _ in counts.values()) == rows
    for table in layout.tables:
        assert estimated[table.name] == counts[table.label][0], table.name


def test_a_small_copy_into_a_table_the_statistics_count_as_large_takes_no_new_sample(fleet: Fleet) -> None:
    """Sampling a large shared table for a few copied rows cost 177 ms a table in a drain of small
    tenants; statistics that still describe the table are kept (a copy of over 10% refreshes them)."""
    fleet.seed("eu-2", 5, 6_000)
    fleet.seed("eu-1", 6, 60)
    layout = fleet.layout()
    with dsnlib.connect(fleet.dsn("eu-2"), autocommit=True) as conn:
        for table in layout.tables:
            conn.execute(sql.SQL("ALTER TABLE {} SET (autovacuum_enabled = false)").format(table.ident))
            conn.execute(sql.SQL("ANALYZE {}").format(table.ident))
        before = dict(conn.execute("SELECT relname, analyze_count FROM pg_stat_user_tables").fetchall())
    move_tenants(fleet.ctx, ("6",), "eu-2", MoveOptions(), Silent())
    with dsnlib.connect(fleet.dsn("eu-2"), autocommit=True) as conn:
        conn.execute("SELECT pg_stat_clear_snapshot()")
        after = dict(conn.execute("SELECT relname, analyze_count FROM pg_stat_user_tables").fetchall())
    assert after["tasks"] == before["tasks"] and after["comments"] == before["comments"]
