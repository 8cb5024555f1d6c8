"""How the engine reports progress without knowing about terminals: one protocol per kind of work
(a move, a fleet's schema rollout, a plan's apply), each with the one implementation that says nothing.

The CLI renders them with tqdm; tests, `--json` runs and benchmarks pass (or extend) the silent ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # only named in signatures: the results each kind of work reports
    from migrator.plans.apply import Entry, EntryResult, Prepared
    from migrator.rollout.runner import StampOutcome


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


class RolloutProgress(Protocol):
    """A schema rollout's progress, wave by wave."""

    def wave_started(self, number: int, waves: int, stamps: Sequence[str]) -> None:
        """Wave `number` (0 is the canary) of `waves` starts on these stamps."""

    def stamp_finished(self, outcome: StampOutcome) -> None:
        """One stamp of the current wave is done (ok or failed)."""

    def wave_finished(self, number: int) -> None:
        """Every stamp of the wave is done."""


class SilentRollout:
    """No rollout progress output: for tests, `--json` and benchmarks."""

    def wave_started(self, number: int, waves: int, stamps: Sequence[str]) -> None:
        pass

    def stamp_finished(self, outcome: StampOutcome) -> None:
        pass

    def wave_finished(self, number: int) -> None:
        pass


class ApplyProgress(Protocol):
    """How `apply` reports, from any thread (the CLI draws an overall tqdm bar and one line per event)."""

    def begin(self, prepared: Prepared) -> None:
        """The plan's remaining entries are about to run."""

    def started(self, entry: Entry) -> None:
        """An entry's move (or its resume) started."""

    def rows(self, count: int) -> None:
        """`count` more rows were copied by any of the running moves."""

    def finished(self, result: EntryResult) -> None:
        """An entry's move ended, done or failed."""

    def note(self, message: str) -> None:
        """Something the operator should read (an interruption)."""


class SilentApply:
    """The apply reporter of `--json` runs and benchmarks: says nothing until the result."""

    def begin(self, prepared: Prepared) -> None:
        pass

    def started(self, entry: Entry) -> None:
        pass

    def rows(self, count: int) -> None:
        pass

    def finished(self, result: EntryResult) -> None:
        pass

    def note(self, message: str) -> None:
        pass
