"""The `migrator` command line: parse options, call one engine function, render its result.

No logic lives here beyond presentation. Each module registers its commands on the root group.
"""

from __future__ import annotations

from migrator.cli import core, fleet, keys, moves, plans, schema, throttle, workers  # noqa: F401  (register commands)
from migrator.cli.base import cli


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="migrator")


__all__ = ["cli", "main"]
