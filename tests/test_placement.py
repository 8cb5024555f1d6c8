"""Placement: residency, tiers and anti-affinity checked before every write, and the audit trail."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from conftest import Fleet, operator_grants
from psycopg import sql

from migrator.catalog import audit, policy
from migrator.db import dsn as dsnlib


def _admin(fleet: Fleet, db: str, *statements: sql.Composable) -> None:
    with dsnlib.connect(fleet.server.dsn(db), autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)


@pytest.fixture
def operator_catalog(fleet: Fleet) -> Iterator[str]:
    """A catalog DSN of a plain role holding exactly the grants of docs/privileges.md."""
    catalog_db = fleet.databases[0]
    prefix = catalog_db.removesuffix("_catalog")
    owner, operator = f"{prefix}_placement_owner", f"{prefix}_placement_migrator"
    password = secrets.token_urlsafe(18)
    _admin(
        fleet,
        "postgres",
        sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(owner)),
        sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(operator), sql.Literal(password)),
    )
    try:
        for db, statement in operator_grants(operator, owner, fleet.databases[1:], catalog_db):
            _admin(fleet, db, statement)
        server = fleet.server
        yield f"postgresql://{operator}:{password}@{server.host}:{server.port}/{catalog_db}"
    finally:
        for db in fleet.databases:
            _admin(fleet, db, sql.SQL("DROP OWNED BY {}, {}").format(sql.Identifier(owner), sql.Identifier(operator)))
        for role in (operator, owner):
            _admin(fleet, "postgres", sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


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
    assert [r.reason for r in audit.trail(catalog, tenant="7")] == [
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
