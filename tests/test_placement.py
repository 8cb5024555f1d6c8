"""Placement: residency, tiers and anti-affinity checked before every write, and the audit trail."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from click.testing import CliRunner, Result
from conftest import Fleet, catalog_snapshot, create_roles, drop_roles, grant_operator, login_url

from migrator.catalog import audit, policy
from migrator.cli import cli
from migrator.db import dsn as dsnlib


@pytest.fixture
def operator_catalog(fleet: Fleet) -> Iterator[str]:
    """A catalog DSN of a plain role holding exactly the grants of docs/privileges.md."""
    catalog_db = fleet.databases[0]
    prefix = catalog_db.removesuffix("_catalog")
    owner, operator = f"{prefix}_placement_owner", f"{prefix}_placement_migrator"
    server = fleet.server
    password = create_roles(server, owner, operator)
    try:
        grant_operator(server, operator, owner, fleet.databases[1:], catalog_db)
        yield login_url(server, operator, password, catalog_db)
    finally:
        drop_roles(server, fleet.databases, operator, owner)


def test_the_audit_trail_cannot_be_updated_or_deleted_by_migrators_role_nor_its_owner(
    fleet: Fleet, operator_catalog: str
) -> None:
    with psycopg.connect(operator_catalog, autocommit=True) as conn:
        conn.execute("INSERT INTO audit (actor, action, tenants) VALUES ('ops', 'route set', '{7}')")
        assert conn.execute("SELECT actor, db_role FROM audit").fetchall() == [("ops", conn.info.user)]
        conn.execute("INSERT INTO tenants (tenant, residency) VALUES ('7', '{eu}')")  # an ordinary table
        for statement in ("UPDATE audit SET actor = 'someone else'", "DELETE FROM audit", "TRUNCATE audit"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)
    with dsnlib.connect(fleet.catalog.url, autocommit=True) as owner:  # the catalog's owner, a superuser here
        for statement in ("UPDATE audit SET actor = 'someone else'", "DELETE FROM audit", "TRUNCATE audit"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
                owner.execute(statement)
        assert owner.execute("SELECT actor FROM audit").fetchall() == [("ops",)]


def test_each_rule_names_the_tenant_the_rule_and_the_stamp(fleet: Fleet) -> None:
    catalog = fleet.catalog
    catalog.update_stamp("us-1", kind="dedicated")
    for tenant in ("7", "8", "9"):
        catalog.set_route(tenant, "eu-1")
    policy.set_placement(catalog, ["7"], policy.Change(residency=("eu",), anti_affinity=("bank",)))
    policy.set_placement(catalog, ["8"], policy.Change(tier=policy.Tier.DEDICATED))
    policy.set_placement(catalog, ["9"], policy.Change(anti_affinity=("bank",)))
    assert policy.check(catalog, ["7"], "us-1") == [
        "tenant 7 -> stamp us-1: residency: it may live in eu only, us-1 is in region us"
    ]
    assert policy.check(catalog, ["8"], "eu-2") == [
        "tenant 8 -> stamp eu-2: tier: a dedicated tenant needs a dedicated stamp, eu-2 is shared"
    ]
    assert policy.check(catalog, ["8"], "us-1") == []
    assert policy.check(catalog, ["8", "9"], "us-1") == [
        "tenant 8 -> stamp us-1: dedicated stamp: us-1 is dedicated and holds tenant 9",
        "tenant 9 -> stamp us-1: dedicated stamp: us-1 is dedicated and holds tenant 8",
    ]
    assert policy.check(catalog, ["7", "9"], "eu-2") == [
        "tenant 7 -> stamp eu-2: anti-affinity bank: eu-2 holds tenant 9",
        "tenant 9 -> stamp eu-2: anti-affinity bank: eu-2 holds tenant 7",
    ]
    policy.set_placement(catalog, ["7"], policy.Change(anywhere=True))
    assert policy.placements(catalog, ["7"])["7"] == policy.Placement("7", None, policy.Tier.SHARED, ("bank",))
    assert [r.reason for r in audit.trail(catalog, tenant="7") if r.action == "tenant set"] == [
        "residency eu, anti-affinity bank",
        "residency any",
    ]


def test_tenant_set_stamp_kind_and_route_import_with_residency(fleet: Fleet, tmp_path: Path) -> None:
    result = fleet.run("stamp", "update", "us-1", "--kind", "dedicated")
    assert result.exit_code == 0, result.output + result.stderr
    assert "dedicated" in result.output
    csv_file = tmp_path / "routes.csv"
    csv_file.write_text("tenant,stamp,residency\n7,eu-1,eu\n8,eu-1,eu|us\n9,eu-1,\n")
    result = fleet.run("route", "import", str(csv_file))
    assert result.exit_code == 0, result.output + result.stderr
    attrs = policy.placements(fleet.catalog)
    assert (attrs["7"].residency, attrs["8"].residency, "9" in attrs) == (("eu",), ("eu", "us"), False)
    result = fleet.run("tenant", "set", "9", "--residency", "us", "--tier", "dedicated")
    assert result.exit_code == 0, result.output + result.stderr
    assert result.output == "tenant 9: residency us, tier dedicated, anti-affinity -\n"
    outside = tmp_path / "outside.csv"
    outside.write_text("10,eu-2,us\n")
    result = fleet.run("route", "import", str(outside))
    assert result.exit_code == 2
    assert "tenant 10 -> stamp eu-2: residency" in result.stderr and "nothing imported" in result.stderr
    assert fleet.catalog.find_route("10") is None
    fleet.seed("eu-1", 7, 10)
    result = fleet.run("tenant", "list", "--stamp", "eu-1", "--json")
    assert [(r["tenant"], r["residency"], r["tier"]) for r in json.loads(result.output)] == [("7", ["eu"], "shared")]


def _root_rows(fleet: Fleet, stamp: str, *rows: tuple[int, str | None]) -> None:
    """Tenants the stamp's root table holds before migrator knows them, each with a residency column."""
    with dsnlib.connect(fleet.dsn(stamp), autocommit=True) as conn:
        conn.execute("ALTER TABLE tenants ADD COLUMN IF NOT EXISTS data_region text")
        for tenant, region in rows:
            conn.execute("INSERT INTO tenants (id, name, data_region) VALUES (%s, 't', %s)", (tenant, region))


def test_route_import_from_a_stamp_takes_each_tenants_residency_and_refuses_one_outside_it_whole(
    fleet: Fleet, tmp_path: Path
) -> None:
    _root_rows(fleet, "eu-1", (21, "eu"), (22, "eu, us"), (23, None))
    _root_rows(fleet, "us-1", (31, "us"), (32, "eu"), (33, "us|ap"))
    init = CliRunner().invoke(
        cli, ["init", "--from-stamp", fleet.dsn("eu-1"), "--path", str(tmp_path / "guessed.toml")]
    )
    assert init.exit_code == 0, init.output
    assert "migrator route import --stamp NAME --residency-column data_region" in init.stdout, init.stdout

    before = catalog_snapshot(fleet)
    refused = fleet.run("route", "import", "--stamp", "us-1", "--residency-column", "data_region")
    assert refused.exit_code == 2, refused.output
    assert refused.stderr.count("\n") == 1
    assert "stamp us-1: 1 tenant(s) outside their residency: tenant 32 -> stamp us-1: residency" in refused.stderr
    assert "nothing imported" in refused.stderr
    assert catalog_snapshot(fleet) == before  # tenants 31 and 33 were not routed either, no audit record
    refused = fleet.run("route", "import", "--stamp", "us-1", "--residency", "eu")
    assert refused.exit_code == 2 and "3 tenant(s) outside their residency" in refused.stderr, refused.stderr
    assert catalog_snapshot(fleet) == before

    done = fleet.run("route", "import", "--stamp", "eu-1", "--residency-column", "data_region", "--json")
    assert done.exit_code == 0, done.output + done.stderr
    assert json.loads(done.stdout) == {"source": "stamp eu-1", "new": ["21", "22", "23"], "existing": []}
    attrs = policy.placements(fleet.catalog)
    assert (attrs["21"].residency, attrs["22"].residency, "23" in attrs) == (("eu",), ("eu", "us"), False)
    done = fleet.run("route", "import", "--stamp", "us-1", "--residency", "us,eu")
    assert done.exit_code == 0, done.output + done.stderr
    attrs = policy.placements(fleet.catalog)
    assert [attrs[t].residency for t in ("31", "32", "33")] == [("us", "eu")] * 3
    imports = [(r.tenants, r.to_stamp) for r in audit.trail(fleet.catalog) if r.action == "route import"]
    assert imports == [(["21", "22", "23"], "eu-1"), (["31", "32", "33"], "us-1")]
    again = fleet.run("route", "import", "--stamp", "eu-1", "--residency-column", "data_region", "--json")
    assert json.loads(again.stdout)["new"] == []  # a re-run changes nothing, records nothing
    assert len([r for r in audit.trail(fleet.catalog) if r.action == "route import"]) == 2

    missing = fleet.run("route", "import", "--stamp", "eu-2", "--residency-column", "data_region")
    assert missing.exit_code == 2
    assert missing.stderr == "error: stamp eu-2: table public.tenants has no column data_region (--residency-column)\n"
    both = fleet.run("route", "import", "--stamp", "eu-2", "--residency", "eu", "--residency-column", "data_region")
    assert both.exit_code == 2 and "not both" in both.stderr
    moved = fleet.run("move", "22", "--to", "us-1", "--yes")  # the residency imported is the one moves honour
    assert moved.exit_code == 0, moved.output + moved.stderr
    refused = fleet.run("move", "21", "--to", "us-1", "--yes")
    assert refused.exit_code == 2 and "tenant 21 -> stamp us-1: residency" in refused.stderr, refused.stderr


def _plan(fleet: Fleet, out: Path, *args: str) -> Result:
    return fleet.run("plan", *args, "-o", str(out), "--json")


def test_drain_honours_residency_and_refuses_when_only_a_forbidden_stamp_has_room(fleet: Fleet, tmp_path: Path) -> None:
    fleet.seed("eu-1", 1, 2_000)
    fleet.seed("eu-1", 2, 300)
    assert fleet.run("tenant", "set", "1", "--residency", "eu").exit_code == 0
    fleet.catalog.update_stamp("eu-2", capacity_rows=1_000)
    out = tmp_path / "drain.yaml"
    refused = _plan(fleet, out, "drain", "eu-1")
    assert refused.exit_code == 2 and not out.exists()
    line = refused.stderr.strip()
    assert len(line.splitlines()) == 1
    assert "tenant 1 " in line and "eu-2 is " in line and "rows short" in line
    assert "policy forbids tenant 1 -> stamp us-1: residency: it may live in eu only, us-1 is in region us" in line

    fleet.catalog.update_stamp("eu-2", capacity_rows=100_000)
    fleet.catalog.update_stamp("us-1", capacity_rows=10_000_000)  # the roomier one, yet forbidden to tenant 1
    result = _plan(fleet, out, "drain", "eu-1", "--cohort-tenants", "1")
    assert result.exit_code == 0, result.output + result.stderr
    assert {m["tenant"]: m["to"] for m in json.loads(result.stdout)["moves"]} == {"1": "eu-2", "2": "us-1"}


def test_rebalance_never_puts_a_second_tenant_on_a_dedicated_stamp(fleet: Fleet, tmp_path: Path) -> None:
    for tenant in (1, 2, 3, 4):
        fleet.seed("eu-1", tenant, 1_000)
    fleet.seed("us-1", 9, 50)
    for stamp in ("eu-1", "eu-2", "us-1"):
        fleet.catalog.update_stamp(stamp, capacity_rows=5_000)
    assert fleet.run("stamp", "update", "us-1", "--kind", "dedicated").exit_code == 0
    result = _plan(fleet, tmp_path / "rebalance.yaml", "rebalance", "--threshold", "0.05", "--cohort-tenants", "1")
    assert result.exit_code == 0, result.output + result.stderr
    moves = json.loads(result.stdout)["moves"]
    assert moves and all(m["to"] == "eu-2" for m in moves), moves  # us-1 is the emptiest, and dedicated


def test_a_move_across_residency_is_refused_then_allowed_with_override_and_audited(fleet: Fleet) -> None:
    fleet.seed("eu-1", 7, 60)
    assert fleet.run("tenant", "set", "7", "--residency", "eu").exit_code == 0
    snapshot = catalog_snapshot(fleet)
    refused = fleet.run("move", "7", "--to", "us-1", "--yes")
    assert refused.exit_code == 2
    assert "tenant 7 -> stamp us-1: residency: it may live in eu only, us-1 is in region us" in refused.stderr
    assert catalog_snapshot(fleet) == snapshot
    unexplained = fleet.run("move", "7", "--to", "us-1", "--yes", "--override-policy")
    assert unexplained.exit_code == 2 and "--override-policy needs --reason" in unexplained.stderr
    assert catalog_snapshot(fleet) == snapshot

    moved = fleet.run(
        "--actor", "alice", "move", "7", "--to", "us-1", "--yes", "--override-policy", "--reason", "ticket 42"
    )
    assert moved.exit_code == 0, moved.output + moved.stderr
    assert fleet.catalog.route("7").stamp == "us-1"
    shown = fleet.run("audit", "--tenant", "7", "--json")
    assert shown.exit_code == 0, shown.output + shown.stderr
    records = json.loads(shown.stdout)
    override = next(r for r in records if r["action"] == "policy override")
    assert (override["actor"], override["from_stamp"], override["to_stamp"]) == ("alice", "eu-1", "us-1")
    assert override["reason"].startswith("ticket 42: tenant 7 -> stamp us-1: residency")
    assert override["move_id"] == fleet.catalog.moves("7")[0].id


def test_a_plan_made_under_an_older_policy_is_stale_naming_the_entry(fleet: Fleet, tmp_path: Path) -> None:
    fleet.seed("eu-1", 7, 60)
    fleet.seed("eu-1", 8, 40)
    out = tmp_path / "drain.yaml"
    made = _plan(fleet, out, "drain", "eu-1", "--to", "us-1")
    assert made.exit_code == 0, made.output + made.stderr
    assert [m["tenants"] for m in json.loads(made.stdout)["moves"]] == [["7", "8"]]  # one cohort, as planned
    assert fleet.run("tenant", "set", "8", "--residency", "eu").exit_code == 0
    snapshot = catalog_snapshot(fleet)
    refused = fleet.run("apply", str(out), "--yes")
    assert refused.exit_code == 2
    assert f"stale plan {out}: moves[0] (line " in refused.stderr
    assert "tenant 8 -> stamp us-1: residency: it may live in eu only" in refused.stderr
    assert catalog_snapshot(fleet) == snapshot

    applied = fleet.run("apply", str(out), "--yes", "--override-policy", "--reason", "eu-1 is going away")
    assert applied.exit_code == 0, applied.output + applied.stderr
    assert {r.tenant: r.stamp for r in fleet.catalog.routes_of(["7", "8"])} == {"7": "us-1", "8": "us-1"}
    reasons = [r.reason or "" for r in audit.trail(fleet.catalog, tenant="8") if r.action == "policy override"]
    assert len(reasons) == 2 and all(r.startswith("eu-1 is going away: ") for r in reasons)  # the plan, the move
    applies = [r for r in audit.trail(fleet.catalog, tenant="8") if r.action == "plan apply"]
    assert len(applies) == 1 and applies[0].reason == f"drain plan {out}: 1 of 1 moves to run"


def test_a_cohort_never_mixes_residencies(fleet: Fleet, tmp_path: Path) -> None:
    fleet.seed_many("eu-1", list(range(101, 107)), 30)
    assert fleet.run("tenant", "set", "102", "--residency", "eu,us").exit_code == 0
    assert fleet.run("tenant", "set", "104", "--residency", "eu,us").exit_code == 0
    assert fleet.run("tenant", "set", "105", "--residency", "eu").exit_code == 0
    result = _plan(fleet, tmp_path / "drain.yaml", "drain", "eu-1", "--to", "eu-2", "--cohort-tenants", "10")
    assert result.exit_code == 0, result.output + result.stderr
    cohorts = sorted(sorted(m.get("tenants") or [m["tenant"]]) for m in json.loads(result.stdout)["moves"])
    assert cohorts == [["101", "103", "106"], ["102", "104"], ["105"]]


def test_the_audit_trail_records_moves_route_set_and_route_import(fleet: Fleet, tmp_path: Path) -> None:
    assert fleet.run("--actor", "bob", "route", "set", "5", "eu-1").exit_code == 0
    csv_file = tmp_path / "routes.csv"
    csv_file.write_text("6,eu-2\n8,us-1,us\n")
    assert fleet.run("route", "import", str(csv_file)).exit_code == 0
    assert fleet.run("route", "import", str(csv_file)).exit_code == 0  # a re-run changes nothing, records nothing
    fleet.seed("eu-1", 7, 60)  # routes through the catalog too
    assert fleet.run("move", "7", "--to", "eu-2", "--yes").exit_code == 0
    assert fleet.run("cleanup", "7", "--stamp", "eu-1", "--yes").exit_code == 0  # closes its revert window
    assert fleet.run("move", "7", "--to", "us-1", "--yes").exit_code == 0
    records = audit.trail(fleet.catalog)
    seen = [(r.action, r.tenants, r.from_stamp, r.to_stamp) for r in records]
    assert seen == [
        ("route set", ["5"], None, "eu-1"),
        ("route import", ["6"], None, "eu-2"),
        ("route import", ["8"], None, "us-1"),
        ("route set", ["7"], None, "eu-1"),
        ("move", ["7"], "eu-1", "eu-2"),
        ("move", ["7"], "eu-2", "us-1"),
    ]
    assert records[0].actor == "bob" and all(r.db_role for r in records)
    moves = [m.id for m in reversed(fleet.catalog.moves("7"))]
    assert [r.move_id for r in records if r.action == "move"] == moves
    crossed = json.loads(fleet.run("audit", "--cross-region", "--json").stdout)
    assert [(r["tenants"], r["from_region"], r["to_region"]) for r in crossed] == [(["7"], "eu", "us")]
    assert fleet.run("audit", "--tenant", "5", "--json").stdout.count('"action"') == 1
    assert json.loads(fleet.run("audit", "--since", "2999-01-01", "--json").stdout) == []
    shown = fleet.run("audit", "--tenant", "7")
    assert shown.exit_code == 0 and "eu-2 (eu)" in shown.stdout and "us-1 (us)" in shown.stdout
