"""Tables that reach the tenant only through foreign keys move exactly, and cleanup leaves no orphan.

A billing schema made by hand: invoices carry the tenant column; their lines, the lines' taxes
(three levels down), payments, notes with two nullable paths, shipments through a composite key, a
comment tree under lines and a partitioned event table do not. Moves run as README's
least-privileged role, in both write modes, offline and online with the application writing child
rows during the copy. What was moved is checked with hand-written joins (not migrator's own
discovery or verify), and after cleanup every foreign key of the source is validated again.
"""

from __future__ import annotations

import json
import re
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from test_real_schemas_shapes import (  # noqa: F401
    STAMPS,
    TENANT,
    Shaped,
    ShapedFactory,
    WritesOnce,
    _assert_refused,
    _copied,
    _move_refused,
    _tenants,
    shaped,
)

from migrator.db import dsn as dsnlib
from migrator.errors import MigratorError
from migrator.move import CleanupOptions, MoveOptions, cleanup_tenants, copy, move_tenants, moved, verify
from migrator.move.fence import leftovers
from migrator.progress import Silent

NEIGHBOUR = "43"

BILLING = (
    "CREATE TABLE currencies (code text PRIMARY KEY)",
    "INSERT INTO currencies VALUES ('EUR'), ('USD')",
    "CREATE TABLE invoices (id bigint PRIMARY KEY, tenant_id bigint NOT NULL REFERENCES tenants,"
    " number integer NOT NULL, UNIQUE (tenant_id, number))",
    "CREATE TABLE invoice_lines (id bigint PRIMARY KEY, invoice_id bigint NOT NULL REFERENCES invoices"
    " ON DELETE CASCADE, currency text NOT NULL REFERENCES currencies, amount numeric(12, 2) NOT NULL)",
    # three levels down, keyed by its parent
    "CREATE TABLE line_taxes (line_id bigint NOT NULL REFERENCES invoice_lines ON DELETE CASCADE,"
    " kind text NOT NULL, rate numeric NOT NULL, PRIMARY KEY (line_id, kind))",
    "CREATE TABLE payments (id bigint PRIMARY KEY, invoice_id bigint NOT NULL REFERENCES invoices"
    " ON DELETE CASCADE, paid numeric(12, 2) NOT NULL)",
    # two nullable paths; SET NULL when either parent goes
    "CREATE TABLE notes (id bigint PRIMARY KEY, line_id bigint REFERENCES invoice_lines ON DELETE SET NULL,"
    " payment_id bigint REFERENCES payments ON DELETE SET NULL, body text)",
    # a composite foreign key into a unique key holding the tenant column under another name
    "CREATE TABLE shipments (id bigint PRIMARY KEY, owner bigint NOT NULL, invoice_number integer NOT NULL,"
    " FOREIGN KEY (owner, invoice_number) REFERENCES invoices (tenant_id, number) ON DELETE CASCADE)",
    # a path table that is itself a tree
    "CREATE TABLE line_comments (id bigint PRIMARY KEY, line_id bigint NOT NULL REFERENCES invoice_lines"
    " ON DELETE CASCADE, parent_id bigint REFERENCES line_comments ON DELETE CASCADE, body text)",
    # a partitioned path table
    "CREATE TABLE events (id bigint NOT NULL, invoice_id bigint NOT NULL REFERENCES invoices ON DELETE CASCADE,"
    " at date NOT NULL, what text, PRIMARY KEY (id, at)) PARTITION BY RANGE (at)",
    "CREATE TABLE events_2025 PARTITION OF events FOR VALUES FROM ('2025-01-01') TO ('2026-01-01')",
    "CREATE TABLE events_rest PARTITION OF events DEFAULT",
)

_LINES = "SELECT l.id FROM invoice_lines l JOIN invoices i ON i.id = l.invoice_id WHERE i.tenant_id = %(t)s"
_PAYMENTS = "SELECT p.id FROM payments p JOIN invoices i ON i.id = p.invoice_id WHERE i.tenant_id = %(t)s"
# The oracle: each table's rows of a tenant, written by hand.
ORACLE = {
    "tenants": "SELECT x::text FROM tenants x WHERE id = %(t)s",
    "invoices": "SELECT x::text FROM invoices x WHERE tenant_id = %(t)s",
    "invoice_lines": f"SELECT x::text FROM invoice_lines x WHERE id IN ({_LINES})",
    "line_taxes": f"SELECT x::text FROM line_taxes x WHERE line_id IN ({_LINES})",
    "payments": f"SELECT x::text FROM payments x WHERE id IN ({_PAYMENTS})",
    "notes": f"SELECT x::text FROM notes x WHERE line_id IN ({_LINES}) OR payment_id IN ({_PAYMENTS})",
    "shipments": "SELECT x::text FROM shipments x WHERE owner = %(t)s",
    "line_comments": f"SELECT x::text FROM line_comments x WHERE line_id IN ({_LINES})",
    "events": "SELECT x::text FROM events x JOIN invoices i ON i.id = x.invoice_id WHERE i.tenant_id = %(t)s",
}
PATH_TABLES = ("events", "invoice_lines", "line_comments", "line_taxes", "notes", "payments", "shipments")


def oracle(fleet: Shaped, stamp: str, tenant: str = TENANT) -> dict[str, tuple[int, str]]:
    out = {}
    with dsnlib.connect(fleet.admin[stamp], autocommit=True) as conn:
        for table, query in ORACLE.items():
            row = conn.execute(
                f"SELECT count(*), coalesce(md5(string_agg(r, '|' ORDER BY r)), '') FROM ({query}) s(r)",
                {"t": tenant},
            ).fetchone()
            assert row is not None
            out[table] = (int(row[0]), str(row[1]))
    return out


def orphans_and_revalidation(fleet: Shaped, stamp: str) -> list[str]:
    """Every foreign key of the stamp, added again NOT VALID and validated: the ones that fail.

    In `replica` mode nothing checked the deletes of the move's sessions: this is the proof that no
    remaining row references a deleted one.
    """
    failed = []
    with dsnlib.connect(fleet.admin[stamp], autocommit=True) as conn:
        keys = conn.execute(
            "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(c.oid), r.relkind = 'p'"
            " FROM pg_constraint c JOIN pg_class r ON r.oid = c.conrelid"
            " WHERE contype = 'f' AND connamespace::regnamespace::text IN ('public', 'billing') AND conparentid = 0"
            " ORDER BY 1, 2"
        ).fetchall()
        for table, name, definition, partitioned in keys:
            recheck = sql.Identifier(f"{name}_recheck")
            rel = sql.SQL(table)  # regclass text: quoted as needed by the server
            try:
                if partitioned:  # NOT VALID is not supported there: adding it validates at once
                    conn.execute(
                        sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} {}").format(rel, recheck, sql.SQL(definition))
                    )
                else:
                    conn.execute(
                        sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} {} NOT VALID").format(
                            rel, recheck, sql.SQL(definition)
                        )
                    )
                    conn.execute(sql.SQL("ALTER TABLE {} VALIDATE CONSTRAINT {}").format(rel, recheck))
            except psycopg.errors.ForeignKeyViolation as exc:  # the failure is the finding
                failed.append(f"{name}: {exc}")
            conn.execute(sql.SQL("ALTER TABLE {} DROP CONSTRAINT IF EXISTS {}").format(rel, recheck))
    return failed


def seed(fleet: Shaped, tenant: str, invoices: int = 12) -> None:
    """Invoices with lines, taxes, payments, notes, shipments, a comment tree and events per tenant."""
    base = int(tenant) * 100_000
    with dsnlib.connect(fleet.admin["eu-1"]) as conn:
        for n in range(invoices):
            inv = base + n
            conn.execute("INSERT INTO invoices VALUES (%s, %s, %s)", (inv, tenant, n))
            conn.execute("INSERT INTO payments VALUES (%s, %s, %s)", (inv, inv, n * 3))
            conn.execute("INSERT INTO shipments VALUES (%s, %s, %s)", (inv, tenant, n))
            day = "2025-03-01" if n % 2 else "2026-03-01"
            conn.execute("INSERT INTO events VALUES (%s, %s, %s, 'issued')", (inv, inv, day))
            for k in range(5):
                line = inv * 10 + k
                conn.execute("INSERT INTO invoice_lines VALUES (%s, %s, %s, %s)", (line, inv, ("EUR", "USD")[k % 2], k))
                conn.execute("INSERT INTO line_taxes VALUES (%s, 'vat', 0.2), (%s, 'city', 0.01)", (line, line))
                conn.execute(
                    "INSERT INTO notes VALUES (%s, %s, %s, 'both'), (%s, %s, NULL, 'line only')",
                    (line, line, inv if k == 0 else None, -line, line),
                )
                conn.execute(
                    "INSERT INTO line_comments VALUES (%s, %s, NULL, 'root'), (%s, %s, %s, 'reply')",
                    (line, line, -line, line, line),
                )
        # rows of no tenant: a note with no parent at all
        conn.execute("INSERT INTO notes VALUES (%s, NULL, NULL, 'nobody''s') ON CONFLICT DO NOTHING", (base - 1,))


def billing(build: ShapedFactory, invoices: int = 12) -> Shaped:
    """Two stamps of the billing schema, the tenant and its neighbour seeded on eu-1."""
    fleet = build(BILLING)
    _tenants(fleet, TENANT, NEIGHBOUR)
    seed(fleet, TENANT, invoices)
    seed(fleet, NEIGHBOUR, invoices)
    return fleet


CHILD_WRITES = (  # tenant 42's invoices are 4200000 + n, their lines (4200000 + n) * 10 + k; 43's alike
    # a new invoice with a line and a tax, after its table was copied
    "INSERT INTO invoices VALUES (4200099, 42, 99)",
    "INSERT INTO invoice_lines VALUES (42000990, 4200099, 'EUR', 9.99)",
    "INSERT INTO line_taxes VALUES (42000990, 'vat', 0.2)",
    # a line re-parented to another invoice of the tenant, and one to the neighbour's invoice
    "UPDATE invoice_lines SET invoice_id = 4200001 WHERE id = 42000001",
    "UPDATE invoice_lines SET invoice_id = 4300001 WHERE id = 42000002",
    # a line of the neighbour's moved into the tenant (its taxes come with it)
    "UPDATE invoice_lines SET invoice_id = 4200003 WHERE id = 43000004",
    # an invoice deleted: lines, taxes, payments, comments and events cascade, notes are set NULL
    "DELETE FROM invoices WHERE id = 4200005",
    "UPDATE line_taxes SET rate = 0.21 WHERE line_id = 42000003 AND kind = 'vat'",
    "DELETE FROM payments WHERE id = 4200006",
    # the neighbour keeps writing its own child rows
    "INSERT INTO line_taxes VALUES (43000000, 'extra', 0.5)",
)


def writes_child_rows(dsn: str) -> WritesOnce:
    """Child rows written as the application would, once the copy of invoice_lines has committed a batch."""
    return WritesOnce(dsn, *CHILD_WRITES, table="invoice_lines")


@contextmanager
def replica_grant(fleet: Shaped, granted: bool = True) -> Iterator[None]:
    """With `granted`, migrator's role may write as replica for the block (a superuser's grant, revoked after)."""
    operator = sql.Identifier(str(conninfo_to_dict(fleet.operator_dsns["eu-1"])["user"]))
    if not granted:
        yield
        return
    fleet.execute("eu-1", sql.SQL("GRANT SET ON PARAMETER session_replication_role TO {}").format(operator))
    try:
        yield
    finally:
        fleet.execute("eu-1", sql.SQL("REVOKE SET ON PARAMETER session_replication_role FROM {}").format(operator))


@pytest.mark.parametrize("mode", ["online", "offline"])
@pytest.mark.parametrize("write_mode", ["replica", "checked"])
def test_path_tables_move_exactly_and_cleanup_leaves_no_orphan(
    shaped: ShapedFactory,  # noqa: F811
    mode: str,
    write_mode: str,
) -> None:
    fleet = billing(shaped)
    with replica_grant(fleet, write_mode == "replica"):
        layout = fleet.layout()
        assert {t.name for t in layout.tables if t.key is None} == set(PATH_TABLES)
        assert layout.global_tables == ("currencies",)

        dry = fleet.run("move", TENANT, "--to", "eu-2", "--dry-run", "--json")
        assert dry.exit_code == 0, dry.output
        planned = json.loads(dry.stdout)
        assert planned["reached"]["line_taxes"] == (
            "path line_taxes.line_id -> invoice_lines.invoice_id -> invoices.tenant_id"
        ), planned["reached"]
        assert planned["reached"]["invoices"] == "column tenant_id" and planned["global_tables"] == ["currencies"]
        before = oracle(fleet, "eu-1")
        assert before["line_taxes"][0] == 120 and before["notes"][0] == 120
        listed = fleet.run("tenant", "list", "--stamp", "eu-1", "--sizes", "--json")  # plans' capacity figures too
        assert listed.exit_code == 0, listed.output
        sizes = {row["tenant"]: row["rows"] for row in json.loads(listed.stdout)}
        assert sizes[TENANT] == sum(rows for rows, _ in before.values()), (sizes, before)

        online = mode == "online"
        writer = writes_child_rows(fleet.admin["eu-1"]) if online else Silent()
        outcome = move_tenants(fleet.context(), (TENANT,), "eu-2", MoveOptions(online=online, batch_rows=7), writer)
        assert [r.stamp for r in outcome.routes] == ["eu-2"]
        assert outcome.move is not None and outcome.move.write_mode == write_mode
        source = oracle(fleet, "eu-1")
        assert oracle(fleet, "eu-2") == source
        if online:
            assert isinstance(writer, WritesOnce) and writer.done
            assert source != before and source["invoice_lines"][0] == 60 + 1 - 1 + 1 - 5
        else:
            assert source == before
        neighbour = oracle(fleet, "eu-1", NEIGHBOUR)
        assert all(rows == 0 for rows, _ in oracle(fleet, "eu-2", NEIGHBOUR).values())
        verified = fleet.run("verify", TENANT, "--source", "eu-1", "--target", "eu-2", "--json")
        assert verified.exit_code == 0 and json.loads(verified.stdout)["equal"] is True, verified.output

        shown = fleet.run("cleanup", TENANT, "--stamp", "eu-1", "--dry-run")
        assert shown.exit_code == 0, shown.output
        assert re.search(rf"\nline_taxes +{source['line_taxes'][0]}\n", shown.stdout), shown.stdout
        assert oracle(fleet, "eu-1") == source
        cleaned = fleet.run("cleanup", TENANT, "--stamp", "eu-1", "--batch-rows", "5", "--yes")
        assert cleaned.exit_code == 0, cleaned.output
        assert all(rows == 0 for rows, _ in oracle(fleet, "eu-1").values())
        assert oracle(fleet, "eu-1", NEIGHBOUR) == neighbour
        assert oracle(fleet, "eu-2") == source
        for stamp in STAMPS:
            assert orphans_and_revalidation(fleet, stamp) == [], stamp
        fleet.assert_clean(layout, "eu-1")


def set_tenancy(fleet: Shaped, *, column: str = "tenant_id", exclude: tuple[str, ...] = ()) -> None:
    """Rewrite the fleet's [tenancy] as an operator editing migrator.toml would."""
    text = fleet.config_path.read_text()
    lines = []
    for line in text.splitlines():
        if line.startswith("exclude = "):
            line = "exclude = [" + ", ".join(json.dumps(t) for t in exclude) + "]"
        elif line.startswith("column = "):
            line = f"column = {json.dumps(column)}"
        lines.append(line)
    fleet.config_path.write_text("\n".join(lines) + "\n")


def test_cleanup_refuses_rows_no_move_copied_and_rows_that_would_dangle_before_deleting_any(
    shaped: ShapedFactory,  # noqa: F811
) -> None:
    fleet = billing(shaped)
    set_tenancy(fleet, exclude=("line_taxes",))  # the move misses a table
    moved = fleet.run("move", TENANT, "--to", "eu-2", "--offline", "--yes")
    assert moved.exit_code == 0, moved.output
    assert oracle(fleet, "eu-2")["line_taxes"][0] == 0
    before = fleet.snapshot()

    dangling = fleet.run("cleanup", TENANT, "--stamp", "eu-1", "--yes")
    _assert_refused(
        fleet, before, dangling, "rows of line_taxes that stay reference rows of tenant 42 in invoice_lines"
    )

    set_tenancy(fleet)  # the configuration changed since the move: line_taxes is a tenant table now
    for args in (("--yes",), ("--dry-run",)):
        missed = fleet.run("cleanup", TENANT, "--stamp", "eu-1", *args)
        _assert_refused(fleet, before, missed, "table line_taxes holds 120 rows of tenant 42 that move 1 did not copy")
    assert oracle(fleet, "eu-1")["line_taxes"][0] == 120


def move_and_clean(fleet: Shaped, digest: str, rows: int) -> None:
    """Move the tenant to eu-2 and clean up eu-1, judged by `digest`: (count, md5) of its rows, by hand."""
    source = fleet.query("eu-1", digest)
    moved = fleet.run("move", TENANT, "--to", "eu-2", "--yes")
    assert moved.exit_code == 0, moved.output
    assert fleet.query("eu-2", digest) == source and source[0][0] == rows
    cleaned = fleet.run("cleanup", TENANT, "--stamp", "eu-1", "--yes")
    assert cleaned.exit_code == 0, cleaned.output
    assert fleet.query("eu-1", digest)[0][0] == 0


def test_a_tenancy_that_finds_tenants_in_no_table_but_the_root_is_refused_before_any_write(
    shaped: ShapedFactory,  # noqa: F811
) -> None:
    fleet = shaped(("CREATE TABLE orders (id bigint PRIMARY KEY, tenant_id bigint NOT NULL, total numeric)",))
    _tenants(fleet, TENANT)
    fleet.execute("eu-1", "INSERT INTO orders SELECT g, 42, g FROM generate_series(1, 50) g")
    set_tenancy(fleet, column="tenantid")  # a typo: no table has it, and no foreign key leads to tenants
    for args in (("--dry-run",), ("--yes",), ("--offline", "--yes")):
        _move_refused(fleet, "the tenancy finds tenants in no table but the root tenants", "'tenantid'", args=args)


def test_a_typo_in_the_tenancy_column_is_refused_even_where_foreign_keys_find_other_tables(
    shaped: ShapedFactory,  # noqa: F811
) -> None:
    fleet = shaped(
        (
            "CREATE TABLE appointments (id bigint PRIMARY KEY, tenant_id bigint NOT NULL REFERENCES tenants)",
            "CREATE TABLE invoices (id bigint PRIMARY KEY, tenant_id bigint NOT NULL)",  # the key, no foreign key
        )
    )
    _tenants(fleet, TENANT)
    fleet.execute(
        "eu-1",
        "INSERT INTO appointments SELECT g, 42 FROM generate_series(1, 5) g",
        "INSERT INTO invoices SELECT g, 42 FROM generate_series(1, 5) g",
    )
    set_tenancy(fleet, column="tenantid")  # appointments is still found, through its foreign key; invoices is not
    for args in (("--dry-run",), ("--yes",)):
        _move_refused(fleet, "[tenancy] column 'tenantid' is in no table of 'public': check its spelling", args=args)


FENCED_WRITES = (
    "INSERT INTO invoice_lines VALUES (1, 4200000, 'EUR', 1)",  # under the tenant's invoice
    "UPDATE line_taxes SET rate = 0.3 WHERE line_id = 42000000",  # three levels down
    "UPDATE invoice_lines SET invoice_id = 4300001 WHERE id = 42000010",  # out, to the neighbour
    "UPDATE invoice_lines SET invoice_id = 4200001 WHERE id = 43000010",  # in, from the neighbour
    "DELETE FROM notes WHERE id = 42000000",  # two paths
    "INSERT INTO shipments VALUES (1, 42, 2)",  # composite key
    "UPDATE events SET what = 'x' WHERE id = 4200001",  # a partition
    "DELETE FROM line_comments WHERE id = -42000000",  # a tree
    "DELETE FROM invoices WHERE id = 4200002",  # a cascade into every path table
    "INSERT INTO notes VALUES (9, 43000000, 4200000, 'cross')",  # the neighbour's line, the tenant's payment
)


def test_once_fenced_writes_to_the_tenants_path_rows_fail_with_mgf01_and_other_tenants_write_on(
    shaped: ShapedFactory,  # noqa: F811
) -> None:
    fleet = billing(shaped, invoices=3)
    moved = fleet.run("move", TENANT, "--to", "eu-2", "--yes")  # the source stays fenced until cleanup
    assert moved.exit_code == 0, moved.output
    before = oracle(fleet, "eu-1")
    with dsnlib.connect(fleet.admin["eu-1"], autocommit=True, pinned=False) as conn:
        for statement in FENCED_WRITES:
            with pytest.raises(psycopg.Error) as caught:
                conn.execute(statement)
            assert caught.value.sqlstate == "MGF01", (statement, caught.value)
            assert "tenant 42 is fenced" in str(caught.value), statement
        # the neighbour's child rows, and rows of no tenant, are written as before
        conn.execute("INSERT INTO invoice_lines VALUES (2, 4300000, 'EUR', 1)")
        conn.execute("UPDATE line_taxes SET rate = 0.3 WHERE line_id = 43000000")
        conn.execute("DELETE FROM notes WHERE id = -43000001")
        conn.execute("INSERT INTO notes VALUES (3, NULL, NULL, 'nobody''s')")
        conn.execute("DELETE FROM invoices WHERE id = 4300002")
    assert oracle(fleet, "eu-1") == before


def test_rows_of_two_tenants_and_tree_rows_without_a_path_are_refused_naming_them(
    shaped: ShapedFactory,  # noqa: F811
) -> None:
    fleet = shaped(
        (
            *BILLING,
            "CREATE TABLE folders (id bigint PRIMARY KEY, invoice_id bigint REFERENCES invoices,"
            " parent_id bigint REFERENCES folders)",
        )
    )
    _tenants(fleet, TENANT, NEIGHBOUR)
    seed(fleet, TENANT, invoices=2)
    seed(fleet, NEIGHBOUR, invoices=2)
    # a note whose line is the tenant's and whose payment is the neighbour's: it belongs to both
    fleet.execute("eu-1", "INSERT INTO notes VALUES (7, 42000000, 4300000, 'both tenants')")
    # a folder tree whose sub-folders reach the tenant only through their parent folder
    fleet.execute("eu-1", "INSERT INTO folders VALUES (1, 4200000, NULL), (2, NULL, 1), (3, NULL, 2)")
    _move_refused(
        fleet,
        "rows (7) of notes reference rows of payments that are not tenant 42's",
        "rows (2) of folders reach their tenant only through their parent row in folders",
    )


RAILS = (  # no foreign-key constraints at all, as Rails apps often have
    "CREATE TABLE invoices (id bigint PRIMARY KEY, tenant_id bigint NOT NULL, number integer NOT NULL)",
    "CREATE TABLE invoice_lines (id bigint PRIMARY KEY, invoice_id bigint NOT NULL, amount numeric NOT NULL)",
    "CREATE TABLE line_taxes (id bigint PRIMARY KEY, line_id bigint, rate numeric NOT NULL)",
)


def _for_both_tenants(fleet: Shaped, *statements: str) -> None:
    """Run the statements on eu-1 for TENANT and then NEIGHBOUR, with `{tenant}` and `{base}` (the tenant's
    id times 1000, so their keys never meet) filled in."""
    for tenant in (TENANT, NEIGHBOUR):
        fleet.execute("eu-1", *(s.format(tenant=tenant, base=int(tenant) * 1000) for s in statements))


REFERENCES = (
    '[tenancy.references]\n"invoice_lines.invoice_id" = "invoices.id"\n"line_taxes.line_id" = "invoice_lines.id"\n'
)


def test_declared_references_find_rows_of_tables_without_foreign_keys_and_bad_ones_are_refused(
    shaped: ShapedFactory,  # noqa: F811
) -> None:
    fleet = shaped(RAILS)
    _tenants(fleet, TENANT, NEIGHBOUR)
    _for_both_tenants(
        fleet,
        "INSERT INTO invoices SELECT {base} + g, {tenant}, g FROM generate_series(1, 20) g",
        "INSERT INTO invoice_lines SELECT {base} * 10 + g, {base} + 1 + g % 20, g FROM generate_series(1, 100) g",
        "INSERT INTO line_taxes SELECT {base} * 10 + g, {base} * 10 + g, 0.2 FROM generate_series(1, 100) g",
    )
    fleet.execute("eu-1", "INSERT INTO line_taxes VALUES (1, 999999, 0.1), (2, NULL, 0.1)")  # orphans: no tenant's
    without = fleet.run("move", TENANT, "--to", "eu-2", "--dry-run", "--json")  # invoices alone: no path
    assert without.exit_code == 0 and json.loads(without.stdout)["global_tables"] == ["invoice_lines", "line_taxes"]
    assert json.loads(without.stdout)["suspects"] == ["invoice_lines.invoice_id (like invoices)"]

    text = fleet.config_path.read_text()
    fleet.config_path.write_text(text + "\n" + REFERENCES.replace("invoices.id", "invoices.number"))
    _move_refused(fleet, "invoices.number is not a unique key")
    fleet.config_path.write_text(text + "\n" + REFERENCES.replace("line_taxes.line_id", "line_taxes.lineid"))
    _move_refused(fleet, "[tenancy.references] line_taxes.lineid: no line_taxes.lineid in schema 'public'")

    fleet.config_path.write_text(text + "\n" + REFERENCES)
    for stamp in STAMPS:  # a constraint on a declared reference too (NOT VALID: the orphans above)
        fleet.execute(stamp, "ALTER TABLE line_taxes ADD FOREIGN KEY (line_id) REFERENCES invoice_lines NOT VALID")
    dry = fleet.run("move", TENANT, "--to", "eu-2", "--dry-run", "--json")
    assert dry.exit_code == 0, dry.output
    assert json.loads(dry.stdout)["tables"] == {"invoices": 20, "invoice_lines": 100, "line_taxes": 100, "tenants": 1}
    assert json.loads(dry.stdout)["reached"]["line_taxes"] == (  # one path, though declared and constrained
        "path line_taxes.line_id -> invoice_lines.invoice_id -> invoices.tenant_id"
    )
    digest = (
        "SELECT count(*), md5(string_agg(x::text, '|' ORDER BY x::text)) FROM line_taxes x"
        " JOIN invoice_lines l ON l.id = x.line_id JOIN invoices i ON i.id = l.invoice_id WHERE i.tenant_id = 42"
    )
    move_and_clean(fleet, digest, rows=100)
    assert fleet.query("eu-1", "SELECT count(*) FROM line_taxes")[0][0] == 102  # the neighbour's and the orphans
    assert fleet.query("eu-1", "SELECT count(*) FROM invoice_lines WHERE invoice_id < 43000")[0][0] == 0


COHORT = (TENANT, "44")


def _kill_during_path_copy(fleet: Shaped, table: str = "line_taxes") -> None:
    """An online cohort move, slowed down, killed with -9 while it copies a path table."""
    proc = fleet.popen("move", *COHORT, "--to", "eu-2", "--batch-rows", "5", "--rate-limit", "300", "--yes")
    deadline = time.monotonic() + 90
    while _copied(fleet, table) < 10:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"the copy of {table} never started"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def _cohort_fleet(build: ShapedFactory) -> Shaped:
    fleet = build(BILLING)
    _tenants(fleet, *COHORT, NEIGHBOUR)
    for tenant in (*COHORT, NEIGHBOUR):
        seed(fleet, tenant)
    return fleet


def test_a_cohort_with_path_tables_resumes_after_kill_9_with_child_writes_in_between(
    shaped: ShapedFactory,  # noqa: F811
) -> None:
    fleet = _cohort_fleet(shaped)
    neighbour = oracle(fleet, "eu-1", NEIGHBOUR)
    _kill_during_path_copy(fleet)
    writes_child_rows(fleet.admin["eu-1"]).advance("invoice_lines", 1)  # while the move lies dead

    resumed = fleet.run("move", *COHORT, "--to", "eu-2", "--yes", "--json")
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.stdout)["resumed"] is True
    for tenant in COHORT:
        assert oracle(fleet, "eu-2", tenant) == oracle(fleet, "eu-1", tenant), tenant
    move = json.loads(resumed.stdout)["move"]["id"]
    cleaned = fleet.run("cleanup", "--move", str(move), "--yes")
    assert cleaned.exit_code == 0, cleaned.output
    for tenant in COHORT:
        assert all(rows == 0 for rows, _ in oracle(fleet, "eu-1", tenant).values()), tenant
    assert oracle(fleet, "eu-1", NEIGHBOUR) != neighbour  # the writer re-parented lines across the two
    assert oracle(fleet, "eu-1", NEIGHBOUR)["invoices"] == neighbour["invoices"]
    for stamp in STAMPS:
        assert orphans_and_revalidation(fleet, stamp) == [], stamp


def test_abort_of_a_killed_cohort_copy_as_replica_leaves_no_path_row_on_the_target(
    shaped: ShapedFactory,  # noqa: F811
) -> None:
    fleet = _cohort_fleet(shaped)
    with replica_grant(fleet):
        source = {tenant: oracle(fleet, "eu-1", tenant) for tenant in COHORT}
        _kill_during_path_copy(fleet)
        move = fleet.catalog.open_move(TENANT)
        assert move is not None and move.write_mode == "replica"
        aborted = fleet.run("move", "abort", str(move.id), "--batch-rows", "3", "--yes")
        assert aborted.exit_code == 0, aborted.output
        with dsnlib.connect(fleet.admin["eu-2"], autocommit=True) as conn:
            counts = {
                table: conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table))).fetchone()
                for table in ORACLE
            }
        assert counts == {table: (0,) for table in ORACLE} | {"tenants": (0,)}, counts
        assert orphans_and_revalidation(fleet, "eu-2") == []
        assert {tenant: oracle(fleet, "eu-1", tenant) for tenant in COHORT} == source
        assert fleet.catalog.route(TENANT).stamp == "eu-1"
        with dsnlib.connect(fleet.admin["eu-1"], autocommit=True) as conn:
            assert leftovers(conn) == []


SHARED_USERS = (
    "CREATE TABLE users (id bigint PRIMARY KEY, email text NOT NULL UNIQUE, name text NOT NULL)",
    "CREATE TABLE memberships (tenant_id bigint NOT NULL REFERENCES tenants, user_id bigint NOT NULL"
    " REFERENCES users, role text NOT NULL, PRIMARY KEY (tenant_id, user_id))",
)


@pytest.mark.parametrize("write_mode", ["replica", "checked"])
def test_followed_users_travel_with_their_tenant_and_are_never_deleted(
    shaped: ShapedFactory,  # noqa: F811
    write_mode: str,
) -> None:
    fleet = shaped(SHARED_USERS)
    _tenants(fleet, TENANT, NEIGHBOUR)
    with replica_grant(fleet, write_mode == "replica"):
        _follow_users(fleet)


def _follow_users(fleet: Shaped) -> None:
    users = [(i, f"u{i}@example.com", f"User {i}") for i in range(1, 6)]
    for stamp in STAMPS:  # users 3 and 4 are on both stamps already (members of tenants there)
        for user in users if stamp == "eu-1" else users[2:4]:
            fleet.execute(stamp, "INSERT INTO users VALUES (%s, %s, %s)", params=user)
    fleet.execute("eu-2", "UPDATE users SET name = 'Someone else' WHERE id = 4")
    fleet.execute(
        "eu-1",
        "INSERT INTO memberships VALUES (42, 1, 'owner'), (42, 3, 'member'), (42, 4, 'member'), (43, 1, 'member'),"
        " (43, 2, 'owner')",
    )
    _move_refused(
        fleet,
        "reference (1) in users (foreign key memberships_user_id_fkey), which target eu-2 does not hold",
        "add users to [tenancy] follow",
    )

    text = fleet.config_path.read_text()
    fleet.config_path.write_text(text.replace("exclude = []", 'exclude = []\nfollow = ["users"]'))
    _move_refused(fleet, "rows (4) of users (followed) differ between the source and target eu-2")
    fleet.execute("eu-2", "UPDATE users SET name = 'User 4' WHERE id = 4")

    writer = WritesOnce(  # a new user joins the tenant during the copy: the target cannot have it yet
        fleet.admin["eu-1"],
        "INSERT INTO users VALUES (9, 'new@example.com', 'New')",
        "INSERT INTO memberships VALUES (42, 9, 'member')",
    )
    outcome = move_tenants(fleet.context(), (TENANT,), "eu-2", MoveOptions(batch_rows=1), writer)
    assert writer.done and outcome.move is not None
    shared = "SELECT id, email, name FROM users ORDER BY id"
    assert [u[0] for u in fleet.query("eu-2", shared)] == [1, 3, 4, 9]  # those the tenant references
    members = "SELECT * FROM memberships WHERE tenant_id = 42 ORDER BY user_id"
    assert fleet.query("eu-2", members) == fleet.query("eu-1", members) and len(fleet.query("eu-2", members)) == 4
    on_source = fleet.query("eu-1", shared)
    cleaned = fleet.run("cleanup", TENANT, "--stamp", "eu-1", "--yes")
    assert cleaned.exit_code == 0, cleaned.output
    assert fleet.query("eu-1", members) == [] and fleet.query("eu-1", shared) == on_source  # never deleted


TWO_SCHEMAS = (
    "CREATE TABLE invoices (id bigint PRIMARY KEY, tenant_id bigint NOT NULL REFERENCES tenants, number int)",
    "CREATE SCHEMA billing",
    "CREATE TABLE billing.currencies (code text PRIMARY KEY)",
    "INSERT INTO billing.currencies VALUES ('EUR')",
    "CREATE TABLE billing.lines (id bigint PRIMARY KEY, invoice_id bigint NOT NULL REFERENCES public.invoices"
    " ON DELETE CASCADE, currency text NOT NULL REFERENCES billing.currencies, amount numeric NOT NULL)",
    "CREATE TABLE billing.line_taxes (line_id bigint PRIMARY KEY REFERENCES billing.lines ON DELETE CASCADE,"
    " rate numeric NOT NULL)",
)
TWO_SCHEMAS_ORACLE = (
    "SELECT count(*), md5(string_agg(x::text, '|' ORDER BY x::text)) FROM ("
    " SELECT l::text AS x FROM billing.lines l JOIN invoices i ON i.id = l.invoice_id WHERE i.tenant_id = 42"
    " UNION ALL SELECT t::text FROM billing.line_taxes t JOIN billing.lines l ON l.id = t.line_id"
    " JOIN invoices i ON i.id = l.invoice_id WHERE i.tenant_id = 42) s"
)


def test_tables_of_a_second_schema_are_found_through_their_foreign_keys(
    shaped: ShapedFactory,  # noqa: F811
) -> None:
    fleet = shaped(TWO_SCHEMAS)
    operator = str(conninfo_to_dict(fleet.operator_dsns["eu-1"])["user"])
    owner = operator.removesuffix("_migrator") + "_app_owner"  # the application's tables' owner
    for stamp in STAMPS:
        fleet.execute(stamp, sql.SQL("GRANT USAGE ON SCHEMA billing TO {}").format(sql.Identifier(owner)))
    _tenants(fleet, TENANT, NEIGHBOUR)
    _for_both_tenants(
        fleet,
        "INSERT INTO invoices SELECT {base} + g, {tenant}, g FROM generate_series(1, 10) g",
        "INSERT INTO billing.lines SELECT {base} * 10 + g, {base} + 1 + g % 10, 'EUR', g FROM generate_series(1, 50) g",
        "INSERT INTO billing.line_taxes SELECT {base} * 10 + g, 0.2 FROM generate_series(1, 50) g",
    )
    _move_refused(fleet, "table billing.lines references tenant table invoices", "add billing to [tenancy] schemas")

    text = fleet.config_path.read_text()
    fleet.config_path.write_text(text.replace('schema = "public"', 'schema = "public"\nschemas = ["billing"]'))
    checked = fleet.run("stamp", "check", "eu-1")  # the owner's membership gives USAGE on billing too
    assert checked.exit_code == 0, checked.output
    dry = fleet.run("move", TENANT, "--to", "eu-2", "--dry-run", "--json")
    assert dry.exit_code == 0, dry.output
    planned = json.loads(dry.stdout)
    assert planned["tables"]["billing.line_taxes"] == 50 and planned["global_tables"] == ["currencies"]
    assert planned["reached"]["billing.lines"] == "path lines.invoice_id -> invoices.tenant_id"

    move_and_clean(fleet, TWO_SCHEMAS_ORACLE, rows=100)
    assert fleet.query("eu-1", "SELECT count(*) FROM billing.lines")[0][0] == 50  # the neighbour's
    for stamp in STAMPS:
        assert orphans_and_revalidation(fleet, stamp) == [], stamp


class Interrupted(Exception):
    pass


class InterruptsTheDeletes(Silent):
    """Stops a cleanup after its first committed batch of deletes, as Ctrl-C or a lost session would."""

    def advance(self, table: str, rows: int) -> None:
        if rows:
            raise Interrupted(table)


def test_an_interrupted_cleanup_finishes_when_run_again(shaped: ShapedFactory) -> None:  # noqa: F811
    fleet = billing(shaped, invoices=4)
    moved = fleet.run("move", TENANT, "--to", "eu-2", "--yes")
    assert moved.exit_code == 0, moved.output
    neighbour = oracle(fleet, "eu-1", NEIGHBOUR)
    with pytest.raises(Interrupted):
        cleanup_tenants(fleet.context(), (TENANT,), "eu-1", CleanupOptions(batch_rows=5), InterruptsTheDeletes())
    assert (
        0 < sum(rows for rows, _ in oracle(fleet, "eu-1").values()) < sum(r for r, _ in oracle(fleet, "eu-2").values())
    )

    again = fleet.run("cleanup", TENANT, "--stamp", "eu-1", "--yes")
    assert again.exit_code == 0, again.output
    assert all(rows == 0 for rows, _ in oracle(fleet, "eu-1").values())
    assert oracle(fleet, "eu-1", NEIGHBOUR) == neighbour
    assert orphans_and_revalidation(fleet, "eu-1") == []


class NewInvoiceAfterItsTable(Silent):
    """Once invoices is copied (its table complete), and before invoice_lines starts, writes a new
    invoice with a line: the copy of lines takes the line before catch-up brings the invoice."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn

    def finish(self, part: str) -> None:
        if part == "invoices":
            with dsnlib.connect(self.dsn, autocommit=True) as conn, conn.transaction():
                conn.execute("INSERT INTO invoices VALUES (4200099, 42, 99)")
                conn.execute("INSERT INTO invoice_lines VALUES (42000990, 4200099, 'EUR', 9.99)")


class StopsInTheTaxes(NewInvoiceAfterItsTable):
    """... then stops the move in line_taxes."""

    def advance(self, table: str, rows: int) -> None:
        if table == "line_taxes" and rows:
            raise Interrupted(table)


def test_abort_as_replica_removes_path_rows_copied_before_their_parent(
    shaped: ShapedFactory,  # noqa: F811
) -> None:
    fleet = billing(shaped)
    with replica_grant(fleet):
        with pytest.raises(Interrupted):
            move_tenants(
                fleet.context(), (TENANT,), "eu-2", MoveOptions(batch_rows=7), StopsInTheTaxes(fleet.admin["eu-1"])
            )
        new_line = "SELECT count(*) FROM invoice_lines WHERE id = 42000990"
        assert fleet.query("eu-2", new_line) == [(1,)]  # copied, and its invoice not there yet
        assert fleet.query("eu-2", "SELECT count(*) FROM invoices WHERE id = 4200099") == [(0,)]
        move = fleet.catalog.open_move(TENANT)
        assert move is not None and move.write_mode == "replica"
        aborted = fleet.run("move", "abort", str(move.id), "--yes")
        assert aborted.exit_code == 0, aborted.output
        with dsnlib.connect(fleet.admin["eu-2"], autocommit=True) as conn:
            counts = {
                table: conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table))).fetchone()
                for table in ORACLE
            }
        assert counts == {table: (0,) for table in ORACLE}, counts
        assert orphans_and_revalidation(fleet, "eu-2") == []


class DeletesTheNewInvoice(NewInvoiceAfterItsTable):
    """... then deletes the new invoice (its line cascading) once line_taxes is copying: the target holds
    the copied line whose invoice it will never get."""

    deleted = False

    def advance(self, table: str, rows: int) -> None:
        if table == "line_taxes" and rows and not self.deleted:
            self.deleted = True
            with dsnlib.connect(self.dsn, autocommit=True) as conn:
                conn.execute("DELETE FROM invoices WHERE id = 4200099")


def test_a_path_row_copied_before_its_parent_and_deleted_with_it_leaves_no_orphan_as_replica(
    shaped: ShapedFactory,  # noqa: F811
) -> None:
    fleet = billing(shaped)
    with replica_grant(fleet):
        writer = DeletesTheNewInvoice(fleet.admin["eu-1"])
        outcome = move_tenants(fleet.context(), (TENANT,), "eu-2", MoveOptions(batch_rows=7), writer)
        assert writer.deleted and outcome.move is not None and outcome.move.write_mode == "replica"
        assert fleet.query("eu-2", "SELECT count(*) FROM invoice_lines WHERE id = 42000990") == [(0,)]
        assert oracle(fleet, "eu-2") == oracle(fleet, "eu-1")
        assert orphans_and_revalidation(fleet, "eu-2") == []


def test_keys_of_path_rows_taken_on_the_target_by_another_tenant_are_refused_naming_them(
    shaped: ShapedFactory,  # noqa: F811
) -> None:
    fleet = shaped(BILLING)
    _tenants(fleet, TENANT)
    seed(fleet, TENANT, invoices=2)
    # another tenant on the target whose invoice line and tax have keys the moving tenant uses too
    fleet.execute(
        "eu-2",
        "INSERT INTO tenants VALUES (7, 'seven')",
        "INSERT INTO invoices VALUES (700, 7, 1)",
        "INSERT INTO invoice_lines VALUES (42000001, 700, 'EUR', 1)",
        "INSERT INTO line_taxes VALUES (42000001, 'vat', 0.1)",
    )
    _move_refused(
        fleet,
        "primary key collision in invoice_lines: key (42000001) of tenant 42 already exists on eu-2",
        "primary key collision in line_taxes: key (42000001, vat)",
    )


def test_children_of_a_parent_deleted_under_a_declared_reference_end_up_on_one_stamp(
    shaped: ShapedFactory,  # noqa: F811
) -> None:
    fleet = shaped(RAILS)
    _tenants(fleet, TENANT)
    fleet.execute(
        "eu-1",
        "INSERT INTO invoices SELECT 42000 + g, 42, g FROM generate_series(1, 10) g",
        "INSERT INTO invoice_lines SELECT 420000 + g, 42001 + g % 10, g FROM generate_series(1, 60) g",
    )
    fleet.config_path.write_text(fleet.config_path.read_text() + "\n" + REFERENCES)
    # during the copy of lines an invoice is deleted: without a constraint nothing cascades, so its
    # lines stay on the source as rows of no tenant
    writer = WritesOnce(fleet.admin["eu-1"], "DELETE FROM invoices WHERE id = 42002", table="invoice_lines")
    move_tenants(fleet.context(), (TENANT,), "eu-2", MoveOptions(batch_rows=5), writer)
    assert writer.done
    orphans = "SELECT count(*) FROM invoice_lines WHERE invoice_id = 42002"
    assert fleet.query("eu-1", orphans) == [(6,)] and fleet.query("eu-2", orphans) == [(0,)]
    cleaned = fleet.run("cleanup", TENANT, "--stamp", "eu-1", "--yes")
    assert cleaned.exit_code == 0, cleaned.output
    assert fleet.query("eu-1", "SELECT count(*) FROM invoice_lines") == [(6,)]  # rows of no tenant stay
    assert fleet.query("eu-2", "SELECT count(*) FROM invoice_lines") == [(54,)]


def test_a_row_of_two_tenants_written_during_the_move_stops_it_naming_the_reference(
    shaped: ShapedFactory,  # noqa: F811
) -> None:
    fleet = billing(shaped, invoices=2)
    cross = WritesOnce(fleet.admin["eu-1"], "INSERT INTO notes VALUES (9, 43000000, 4200000, 'cross')")
    with pytest.raises(MigratorError) as caught:  # the neighbour's line, the tenant's payment
        move_tenants(fleet.context(), (TENANT,), "eu-2", MoveOptions(batch_rows=5), cross)
    message = str(caught.value)
    assert "replaying the changes of notes on the target" in message, message
    assert "references a row that is not its tenant's" in message and "(line_id)=(43000000)" in message, message
    assert fleet.catalog.route(TENANT).stamp == "eu-1"


BULK = (  # 20,000 more invoices of the tenant, each with a line, a tax, a payment and a note on both paths
    "INSERT INTO invoices SELECT 5000000 + g, 42, 1000 + g FROM generate_series(1, 20000) g",
    "INSERT INTO invoice_lines SELECT 70000000 + g, 5000000 + g, 'EUR', g FROM generate_series(1, 20000) g",
    "INSERT INTO line_taxes SELECT 70000000 + g, 'vat', 0.2 FROM generate_series(1, 20000) g",
    "INSERT INTO payments SELECT 5000000 + g, 5000000 + g, g FROM generate_series(1, 20000) g",
    "INSERT INTO notes SELECT 80000000 + g, 70000000 + g, 5000000 + g, 'bulk' FROM generate_series(1, 20000) g",
    "ANALYZE",
)


def _subplans(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The SubPlans of an EXPLAIN (FORMAT JSON) plan node, at any depth."""
    for child in node.get("Plans", ()):
        if child.get("Parent Relationship") == "SubPlan":
            yield child
        yield from _subplans(child)


def test_a_path_tables_copy_batch_probes_its_parents_by_hash_or_index_however_many_outgrow_work_mem(
    shaped: ShapedFactory,  # noqa: F811
) -> None:
    """20,000 first parents are about 640 kB to hash; the stamp's work_mem of 64 kB allows a 128 kB hash.
    An uncorrelated IN over them then rescans them all for every row of the batch (a 1,000,000-row
    tenant of the sample copied its 40,000 checklist items in 191 s): each batch must probe them
    by a hash or by an index. EXPLAIN only: the plan is the finding, and planning takes no time."""
    fleet = billing(shaped)
    fleet.execute("eu-1", *BULK)
    database = sql.Identifier(conninfo_to_dict(fleet.admin["eu-1"])["dbname"])
    fleet.execute("eu-1", sql.SQL("ALTER DATABASE {} SET work_mem = '64kB'").format(database))
    tables = [t for t in fleet.layout().tables if t.key is None and not t.self_references]
    assert {t.name for t in tables} == {"events", "invoice_lines", "line_taxes", "notes", "payments", "shipments"}
    with dsnlib.connect(fleet.operator_dsns["eu-1"], autocommit=True) as src:
        assert src.execute("SHOW work_mem").fetchone() == ("64kB",)
        for table in tables:
            of_tenants = copy.batch_filter(src, table, (TENANT,))
            for limit in (50_000, None):  # a batch read back from the target, and one bounded on the source
                select = copy._key_range(table, of_tenants, None, None, limit)
                plan = src.execute(sql.SQL("EXPLAIN (FORMAT JSON) {}").format(select)).fetchone()
                assert plan is not None
                subplans = list(_subplans(plan[0][0]["Plan"]))
                assert len({s["Subplan Name"] for s in subplans}) >= len(table.paths), (table.name, plan)
                for subplan in subplans:
                    probes = subplan["Subplan Name"].startswith("hashed ") or subplan["Node Type"] in (
                        "Index Scan",
                        "Index Only Scan",
                    )
                    assert probes, (table.name, limit, subplan)


def test_a_path_tables_rows_are_found_by_hash_or_index_inside_or_and_not_however_many_outgrow_work_mem(
    shaped: ShapedFactory,  # noqa: F811
) -> None:
    """A path table's tenant filter under OR (notes' two paths, in verify's checksums) or under NOT
    (cleanup's proof that no staying row references a deleted one) is no semi-join: PostgreSQL runs
    it once per row. An uncorrelated IN over the tenant's parents, once they outgrow hash_mem, then
    rescans all of them for every row (a Materialize of 580,000 tasks in a 1,000,000-row tenant of
    the sample): each must probe them by a hash or by an index. EXPLAIN only, as above."""
    fleet = billing(shaped)
    fleet.execute("eu-1", *BULK)
    database = sql.Identifier(conninfo_to_dict(fleet.admin["eu-1"])["dbname"])
    fleet.execute("eu-1", sql.SQL("ALTER DATABASE {} SET work_mem = '64kB'").format(database))
    layout = fleet.layout()
    owned = {t.name: t for t in layout.tables}
    statements = {}
    for table in layout.tables:
        if table.key is not None:
            continue
        statements[f"checksum of {table.name}"] = verify.checksum_query(
            table, verify._in_span(table, (TENANT,), (None, None))
        )
        for path in table.paths:  # the foreign keys a staying row of the table could hold into the tenant's rows
            hop = path.hops[0]
            statements[f"references of {table.name} into {hop.parent}"] = moved._references_query(
                table.ident, table, hop.columns, owned[hop.parent], hop.parent_columns, (TENANT,)
            )
    assert len(statements) == 15
    with dsnlib.connect(fleet.operator_dsns["eu-1"], autocommit=True) as src:
        assert src.execute("SHOW work_mem").fetchone() == ("64kB",)
        subplans = {}
        for name, statement in statements.items():
            plan = src.execute(sql.SQL("EXPLAIN (FORMAT JSON) {}").format(statement)).fetchone()
            assert plan is not None
            subplans[name] = list(_subplans(plan[0][0]["Plan"]))
    # run per row: the OR of notes' paths, and every NOT (each path table is some staying row's child)
    assert len(subplans["checksum of notes"]) >= 2 and all(subplans[n] for n in statements if "references" in n)
    rescanning = [
        (name, s["Subplan Name"])
        for name, found in subplans.items()
        for s in found
        if not s["Subplan Name"].startswith("hashed ") and "Materialize" in json.dumps(s)
    ]
    assert not rescanning
