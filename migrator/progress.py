"""How the engine reports progress without knowing about terminals (the CLI renders it with tqdm)."""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
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
