"""The engine's packages stack in floors: a lower one never imports an upper one, not even for type hints.

A circle such as catalog -> rollout -> catalog (once only under TYPE_CHECKING) makes every change to
the upper package a change to the lower one's meaning; these tests keep the floors apart.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "migrator"
UPPER = (
    "migrator.move",
    "migrator.plans",
    "migrator.rollout",
    "migrator.queue",
    "migrator.provision",
    "migrator.cli",
    "migrator.local",
)
FLOORS = {
    "db": ("migrator.catalog", "migrator.stamps", *UPPER),
    "catalog": ("migrator.stamps", *UPPER),
    "stamps": UPPER,
    "move": UPPER[1:],
    # The job queue runs plans and rollouts; they know nothing of it, and it knows nothing of the CLI.
    "plans": ("migrator.queue", "migrator.provision", "migrator.cli", "migrator.local"),
    "rollout": ("migrator.queue", "migrator.provision", "migrator.cli", "migrator.local"),
    "queue": ("migrator.provision", "migrator.cli", "migrator.local"),
    # Provisioning runs a stamp's upgrade as a rollout's step does, and registers it; nothing below uses it.
    "provision": ("migrator.move", "migrator.plans", "migrator.queue", "migrator.cli", "migrator.local"),
    # The local-fleet tooling stands beside the product: it uses the catalog, the stamps' plumbing and
    # provisioning (`fleet up` creates its stamps as users' are created), never the jobs or the CLI (only
    # the CLI's `fleet` commands import it).
    "local": tuple(upper for upper in UPPER[:-1] if upper != "migrator.provision"),
}


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


@pytest.mark.parametrize("floor", sorted(FLOORS))
def test_a_lower_package_never_imports_an_upper_one(floor: str) -> None:
    forbidden = FLOORS[floor]
    offending = {
        f"{path.relative_to(PACKAGE.parent)}: {name}"
        for path in (PACKAGE / floor).rglob("*.py")
        for name in _imports(path)
        if any(name == upper or name.startswith(f"{upper}.") for upper in forbidden)
    }
    assert not offending, sorted(offending)


def test_nothing_in_the_wheel_imports_the_test_tooling() -> None:
    """migrator.testing is left out of the wheel: a module of the product that imported it would fail
    for every user (the writer's oracle and the chaos engine are for tests, benchmarks and the demo)."""
    offending = {
        f"{path.relative_to(PACKAGE.parent)}: {name}"
        for path in PACKAGE.rglob("*.py")
        if "testing" not in path.relative_to(PACKAGE).parts
        for name in _imports(path)
        if name == "migrator.testing" or name.startswith("migrator.testing.")
    }
    assert not offending, sorted(offending)
