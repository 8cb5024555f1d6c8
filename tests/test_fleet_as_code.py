"""Stamps as code: `fleet plan FILE` shows and `fleet apply FILE` makes the catalog's stamps match a
declarative file: creating stamps through `stamp create`, changing attributes and states, refusing
what the catalog forbids before any change, keeping secrets out of the file; a second apply is a no-op."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import Fleet, catalog_snapshot

from migrator.db import dsn as dsnlib
from migrator.db.alembic import current_revision
from migrator.local import provision

HEAD = "0006_task_checklists"


def _empty_database(fleet: Fleet, name: str) -> str:
    db = fleet.databases[0].removesuffix("_catalog") + f"_{name}"
    fleet.databases.append(db)
    return provision.create_database(fleet.server, db)


def _attributes(fleet: Fleet) -> dict[str, tuple[object, ...]]:
    return {s.name: (s.region, s.capacity_rows, s.state, s.kind) for s in fleet.catalog.stamps()}


FILE = """\
stamps:
  - name: eu-1
    region: eu-west
    capacity_rows: 2000000
  - name: eu-2
    state: draining
  - name: us-1
    state: {us_state}
  - name: eu-3
    dsn: ${{EU3_DSN}}
    region: eu
    capacity_rows: 5000000
    kind: dedicated
"""


def test_plan_then_apply_creates_updates_and_drains_and_a_second_apply_changes_nothing(
    fleet: Fleet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fleet.seed("us-1", 1, 20)
    eu3 = _empty_database(fleet, "eu_3")
    monkeypatch.setenv("EU3_DSN", eu3)  # with the password: from the environment, never from the file
    declared = tmp_path / "fleet.yaml"
    declared.write_text(FILE.format(us_state="active"))
    before = _attributes(fleet)

    planned = fleet.run("fleet", "plan", str(declared))

    assert planned.exit_code == 0, planned.stderr
    lines = planned.stdout.splitlines()
    assert lines[0] == "+ create eu-3: region eu, capacity 5,000,000 rows, dedicated, active, dsn ${EU3_DSN}"
    assert lines[1] == "~ update eu-1: region eu -> eu-west, capacity_rows - -> 2000000"
    assert lines[2] == "~ drain eu-2: active -> draining"
    assert lines[-1] == "plan: 1 to create, 1 to update, 1 to set draining"
    assert _attributes(fleet) == before and current_revision(eu3) is None  # a plan changes nothing

    applied = fleet.run("fleet", "apply", str(declared))

    assert applied.exit_code == 0, applied.stderr
    assert applied.stdout.splitlines()[-1] == "applied 3 change(s)"
    assert fleet.server.password not in planned.output + applied.output + applied.stderr
    assert _attributes(fleet) == {
        "eu-1": ("eu-west", 2_000_000, "active", "shared"),
        "eu-2": ("eu", None, "draining", "shared"),
        "eu-3": ("eu", 5_000_000, "active", "dedicated"),
        "us-1": ("us", None, "active", "shared"),
    }
    assert current_revision(eu3) == HEAD and fleet.catalog.stamp("eu-3").dsn == eu3

    again = fleet.run("fleet", "apply", str(declared))
    assert again.exit_code == 0 and again.stdout.strip() == "nothing to change"
    replanned = fleet.run("fleet", "plan", "--json", str(declared))
    assert json.loads(replanned.stdout)["changes"] == []


def test_retiring_a_stamp_that_holds_tenants_is_refused_naming_it_before_any_change(
    fleet: Fleet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fleet.seed("us-1", 1, 20)
    eu3 = _empty_database(fleet, "eu_3r")
    monkeypatch.setenv("EU3_DSN", eu3)
    declared = tmp_path / "fleet.yaml"
    declared.write_text(FILE.format(us_state="retired"))
    before = catalog_snapshot(fleet)

    planned = fleet.run("fleet", "plan", str(declared))
    assert planned.exit_code == 2
    refused = "- retire us-1: active -> retired (refused: stamp us-1 still has 1 tenant(s) routed to it (1)"
    assert refused in planned.stdout
    assert "1 change(s) refused" in planned.stderr

    applied = fleet.run("fleet", "apply", str(declared))
    assert applied.exit_code == 2
    assert applied.stderr.startswith("error: fleet apply refused, nothing changed: retire us-1: stamp us-1 still has")
    assert catalog_snapshot(fleet) == before and current_revision(eu3) is None


def test_a_stamp_left_out_of_the_file_is_listed_and_kept_and_retiring_is_explicit(fleet: Fleet, tmp_path: Path) -> None:
    declared = tmp_path / "fleet.toml"  # the TOML form
    declared.write_text('[[stamps]]\nname = "eu-1"\n\n[[stamps]]\nname = "eu-2"\nstate = "retired"\n')

    planned = fleet.run("fleet", "plan", str(declared))
    assert planned.exit_code == 0, planned.stderr
    assert planned.stdout.splitlines() == [
        "- retire eu-2: active -> retired",
        "  not in fleet.toml, left as they are: us-1",
        "plan: 1 to retire",
    ]
    assert fleet.run("fleet", "apply", str(declared)).exit_code == 0
    assert _attributes(fleet)["eu-2"][2] == "retired" and _attributes(fleet)["us-1"][2] == "active"


def test_a_literal_password_in_the_file_is_refused_pointing_to_service_names_and_env_references(
    fleet: Fleet, tmp_path: Path
) -> None:
    before = catalog_snapshot(fleet)
    declared = tmp_path / "fleet.yaml"
    for dsn in ("postgresql://app:hunter2@db.example:5432/eu3", "host=db.example dbname=eu3 password=hunter2"):
        declared.write_text(f"stamps:\n  - name: eu-3\n    dsn: '{dsn}'\n")
        for command in ("plan", "apply"):
            result = fleet.run("fleet", command, str(declared))
            assert result.exit_code == 2
            assert "stamp eu-3: the DSN holds a password" in result.stderr
            assert "service: NAME" in result.stderr and "${STAMP_DSN}" in result.stderr
            assert "hunter2" not in result.output + result.stderr
    assert catalog_snapshot(fleet) == before


def test_a_password_given_by_an_environment_reference_is_accepted_and_masked(
    fleet: Fleet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = dsnlib.sqlalchemy_url(fleet.dsn("eu-1"))
    monkeypatch.setenv("EU1_PASSWORD", fleet.server.password)
    written = f"postgresql://{url.username}:${{EU1_PASSWORD}}@{url.host}:{url.port}/{url.database}?sslmode=prefer"
    declared = tmp_path / "fleet.yaml"
    declared.write_text(f"stamps:\n  - name: eu-1\n    dsn: '{written}'\n")

    planned = fleet.run("fleet", "plan", str(declared))
    assert planned.exit_code == 0, planned.stderr
    assert "dsn " in planned.stdout and "***" in planned.stdout
    assert fleet.server.password not in planned.output
    applied = fleet.run("fleet", "apply", str(declared))
    assert applied.exit_code == 0, applied.stderr
    assert fleet.server.password not in applied.output
    assert fleet.run("fleet", "apply", str(declared)).stdout.strip() == "nothing to change"


def test_a_file_that_is_not_a_list_of_stamps_or_names_an_unset_variable_is_refused(
    fleet: Fleet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    cases = {
        "stamps: {name: eu-1}\n": "expected one key, `stamps`",
        "stamps:\n  - name: eu-1\n    capacity: 5\n": "stamp eu-1: unknown key(s) capacity",
        "stamps:\n  - name: eu-1\n  - name: eu-1\n": "stamp eu-1 is declared twice",
        "stamps:\n  - name: eu-1\n    state: gone\n": "`state` must be one of active, draining, retired",
        "stamps:\n  - name: eu-4\n    dsn: ${NOT_SET_ANYWHERE}\n": "environment variable NOT_SET_ANYWHERE is not set",
    }
    for text, expected in cases.items():
        declared = tmp_path / "fleet.yaml"
        declared.write_text(text)
        result = fleet.run("fleet", "plan", str(declared))
        assert result.exit_code == 2 and expected in result.stderr, (text, result.stderr)


def test_apply_checks_every_new_stamp_before_the_first_change_and_adopt_takes_a_migrated_database(
    fleet: Fleet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = fleet.databases[0].removesuffix("_catalog") + "_migrated"
    fleet.databases.append(db)
    monkeypatch.setenv("EU3_DSN", provision.create_database(fleet.server, db, template="tpl_stamp"))
    declared = tmp_path / "fleet.yaml"
    text = "stamps:\n  - name: eu-1\n    region: eu-west\n  - name: eu-3\n    dsn: ${EU3_DSN}\n    region: eu\n"
    declared.write_text(text)
    before = catalog_snapshot(fleet)

    refused = fleet.run("fleet", "apply", str(declared))

    assert refused.exit_code == 2
    assert "database of stamp eu-3" in refused.stderr and "is not empty" in refused.stderr
    assert catalog_snapshot(fleet) == before  # eu-1's update waited for every check, and did not happen

    declared.write_text(text + "    adopt: true\n")
    applied = fleet.run("fleet", "apply", str(declared))
    assert applied.exit_code == 0, applied.stderr
    assert "+ create eu-3: region eu, capacity unlimited, shared, active, dsn ${EU3_DSN}, adopting its database" in (
        applied.stdout
    )
    assert _attributes(fleet)["eu-1"][0] == "eu-west" and _attributes(fleet)["eu-3"][0] == "eu"
    assert fleet.run("fleet", "plan", str(declared)).stdout.splitlines() == [
        "  not in fleet.yaml, left as they are: eu-2, us-1",
        "nothing to change",
    ]
