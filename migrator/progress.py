"""How a move reports progress without knowing about terminals, and the one implementation that says nothing.

The other kinds of work report through protocols beside the results they report (a schema
rollout: `migrator.rollout.runner.RolloutProgress`; a plan's apply:
`migrator.plans.apply.ApplyProgress`), each with its one silent implementation. The CLI renders
them with tqdm bars or plain lines; tests, `--json` runs and benchmarks pass the silent ones.
"""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    """A move's (and a cleanup's or an abort's) progress, row by row."""

    def begin(self, total: int) -> None:
        """Work of `total` rows starts (called once preflight passed, so refusals print no bar)."""

    def phase(self, message: str) -> None:
        """A phase started or a notable event happened (one line)."""

    def start_table(self, table: str, total: int, done: int) -> None:
        """Copy of `table` starts (or resumes with `done` rows already on the target)."""

    def advance(self, table: str, rows: int) -> None:
        """`rows` more rows of `table` were committed on the target."""

    def finish_table(self, table: str) -> None:
        """Copy of `table` is complete."""


class Silent:
    """Progress that goes nowhere: for tests and `--json` runs."""

    def begin(self, total: int) -> None:
        pass

    def phase(self, message: str) -> None:
        pass

    def start_table(self, table: str, total: int, done: int) -> None:
        pass

    def advance(self, table: str, rows: int) -> None:
        pass

    def finish_table(self, table: str) -> None:
        pass
