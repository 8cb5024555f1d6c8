"""Ripple, not big bang: how a rollout's stamps are split into waves, and the gate between two waves.

`Waves` is `--waves 1,5%,25%,100%`: cumulative sizes (counts or percents) of the stamps after the
canary, which runs alone first and is not counted. `Gate` is what a rollout waits for after the
canary and after each wave before it starts the next: `--bake` (a watched pause) and `--check`
(a shell command whose non-zero exit stops the rollout). After the last wave there is nothing left
to hold back, so no gate runs there. The local runner and a queued rollout's workers both gate
through `Gate.wait` and `run_check`; the rollout's `Plan` alone decides the waves (`split`).
"""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from migrator.errors import BadInput

SAY_EVERY_S = 5.0  # a bake or a running check says so at least this often (plain-line logs stay alive)
TAIL_LINES = 10  # a failing check's last lines of output kept for its error
CHECK_FAILED = "stopped after check failed on"  # how a rollout a check stopped says so, in its rows too
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """`30s`, `5m`, `1h30m`, `500ms` or a bare number of seconds, as seconds."""
    spec = text.strip().lower()
    if re.fullmatch(r"\d+(?:\.\d+)?", spec):
        return float(spec)
    parts = _DURATION.findall(spec)
    if not spec or "".join(n + u for n, u in parts) != spec:
        raise BadInput(f"expected a duration such as 30s, 5m or 1h30m, got {text!r}")
    return sum(float(number) * _UNITS[unit] for number, unit in parts)


def format_duration(seconds: float) -> str:
    """The shortest of `45s`, `5m`, `1m30s`, `1.5s`: how a bake is shown and written back."""
    if seconds < 60 or seconds != int(seconds):
        return f"{seconds:g}s"
    minutes, rest = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return "".join(f"{n}{u}" for n, u in ((hours, "h"), (minutes, "m"), (rest, "s")) if n)


@dataclass(frozen=True)
class Waves:
    """`--waves`: each step is where the rollout stands after that wave, cumulatively, as a count of
    stamps or a percent of the stamps after the canary; the last step is 100%."""

    steps: tuple[tuple[float, bool], ...]  # (amount, is a percent)

    @classmethod
    def parse(cls, text: str) -> Waves:
        """Checked before anything runs: one-line errors naming the step that is wrong."""
        items = [item.strip() for item in text.split(",")]
        steps = tuple(_step(item, text) for item in items)
        for kind in (True, False):
            amounts = [amount for amount, percent in steps if percent is kind]
            if any(b <= a for a, b in zip(amounts, amounts[1:], strict=False)):
                what = "percents" if kind else "counts"
                raise BadInput(f"--waves {text!r}: sizes are cumulative, so the {what} must grow from step to step")
        if steps[-1] != (100, True):
            raise BadInput(f"--waves {text!r}: the last wave must be 100% (so every stamp gets a wave)")
        return cls(steps)

    def __str__(self) -> str:
        return ",".join(f"{amount:g}%" if percent else f"{amount:g}" for amount, percent in self.steps)

    def split(self, names: Sequence[str]) -> list[tuple[str, ...]]:
        """`names` (in rollout order) cut at each step's cumulative size; a step that would add no
        stamp on this fleet (5% of 10 stamps after 1) is no wave."""
        waves: list[tuple[str, ...]] = []
        covered = 0
        for amount, percent in self.steps:
            size = min(len(names), math.ceil(amount * len(names) / 100) if percent else int(amount))
            if size > covered:
                waves.append(tuple(names[covered:size]))
                covered = size
        return waves


def _step(item: str, text: str) -> tuple[float, bool]:
    percent = item.endswith("%")
    number = item.removesuffix("%").strip()
    pattern = r"\d+(?:\.\d+)?" if percent else r"\d+"
    if not re.fullmatch(pattern, number):
        raise BadInput(f"--waves {text!r}: {item!r} is neither a count of stamps (5) nor a percent (25%)")
    amount = float(number)
    if amount <= 0 or (percent and amount > 100):
        raise BadInput(f"--waves {text!r}: {item!r} must be {'over 0% and at most 100%' if percent else 'at least 1'}")
    return amount, percent


def split(names: Sequence[str], waves: Waves | None, parallel: int) -> list[tuple[str, ...]]:
    """The waves after the canary: `--waves` when given, else equal waves of `parallel` stamps."""
    if waves is not None:
        return waves.split(names)
    return [tuple(names[i : i + parallel]) for i in range(0, len(names), parallel)]


@dataclass(frozen=True)
class CheckRun:
    """How a `--check` ended: its exit status (None: stopped before it ended) and its last lines."""

    command: str
    exit_code: int | None
    tail: tuple[str, ...]
    seconds: float

    @property
    def passed(self) -> bool:
        return self.exit_code == 0

    def status(self) -> str:
        if self.exit_code is not None and self.exit_code < 0:
            return f"killed by {signal.Signals(-self.exit_code).name}"
        return f"exit {self.exit_code}"

    def stopped(self, wave: str) -> str:
        """The rollout's stop, as the skipped stamps' rows and the report say it."""
        return f"{CHECK_FAILED} {wave} ({self.status()})"

    def output(self, lines: int = 3) -> str:
        """The last `lines` of output on one line (for a catalog row), or a note that there was none."""
        return " | ".join(self.tail[-lines:]) if self.tail else "(no output)"


@dataclass(frozen=True)
class Gate:
    """What a rollout waits for between two waves: `--bake` seconds, then `--check`'s command."""

    bake_s: float = 0.0
    check: str | None = None

    def __bool__(self) -> bool:
        return self.bake_s > 0 or self.check is not None

    def describe(self) -> str:
        """`bake 30s, then check `./healthy.sh`` for the prompt, the dry run and the queue's line."""
        parts = [f"bake {format_duration(self.bake_s)}"] if self.bake_s > 0 else []
        parts += [f"check `{self.check}`"] if self.check else []
        return ", then ".join(parts) or "no wait"

    def bake(self, before: str, stop: threading.Event, say: Callable[[str], None]) -> bool:
        """Wait `bake_s` seconds before wave `before`, saying so every few seconds; False if `stop` came first."""
        end = time.monotonic() + self.bake_s
        while (left := end - time.monotonic()) > 0:
            say(f"baking before {before}: {format_duration(math.ceil(left))} left")
            if stop.wait(min(SAY_EVERY_S, left)):
                return False
        return True


def check_env(
    run_id: str, direction: str, target: str | None, wave: int, name: str, stamps: Sequence[str]
) -> dict[str, str]:
    """What a check sees of the wave it judges (on top of migrator's own environment)."""
    return {
        "MIGRATOR_RUN_ID": run_id,
        "MIGRATOR_DIRECTION": direction,
        "MIGRATOR_TARGET_REVISION": target or "base",
        "MIGRATOR_WAVE": str(wave),  # the plan's index: 0 is the canary when there is one
        "MIGRATOR_WAVE_NAME": name,  # "canary", "wave 1", ...
        "MIGRATOR_WAVE_STAMPS": ",".join(stamps),
    }


def run_check(command: str, env: Mapping[str, str], stop: threading.Event, say: Callable[[str], None]) -> CheckRun:
    """Run `command` with the shell, each line of its output (stdout and stderr) to `say`, and a line
    every few seconds while it runs. A stop ends it (SIGTERM to its process group, then SIGKILL) and
    returns exit_code None: the rollout then stops as between two waves."""
    started = time.monotonic()
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    proc = subprocess.Popen(
        command,
        shell=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        env={**os.environ, **env},
        start_new_session=True,  # Ctrl-C reaches migrator, which decides; the check is ended below
    )
    reader = threading.Thread(target=_read, args=(proc, tail, say), name="check-output", daemon=True)
    reader.start()
    said = started
    while proc.poll() is None:
        if stop.wait(0.2):
            _end(proc)
            reader.join()
            return CheckRun(command, None, tuple(tail), time.monotonic() - started)
        if time.monotonic() - said >= SAY_EVERY_S:
            said = time.monotonic()
            say(f"check still running ({said - started:.0f} s)")
    reader.join(timeout=2)  # a child the check left in the background may hold its output open
    return CheckRun(command, proc.returncode, tuple(tail), time.monotonic() - started)


def _read(proc: subprocess.Popen[str], tail: deque[str], say: Callable[[str], None]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        text = line.rstrip("\n")
        tail.append(text)
        say(f"check | {text}")


def _end(proc: subprocess.Popen[str]) -> None:
    """SIGTERM to the check's process group, SIGKILL after a grace period."""
    for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=grace)
            break
        except subprocess.TimeoutExpired:
            continue
    proc.wait()
