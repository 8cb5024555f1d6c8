"""The scripts' long quiet steps (pip, `fleet up`, the demo's seed) print a line every few seconds
(`with_heartbeat` in scripts/_heartbeat.sh), so scripts/demo never goes 10 s without one; the
command's exit status comes through, and the heartbeat ends with it."""

from __future__ import annotations

import subprocess
import time

from conftest import REPO


def _bash(script: str) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    done = subprocess.run(
        ["bash", "-c", f"source {REPO / 'scripts' / '_heartbeat.sh'}; {script}"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return done, time.monotonic() - started


def test_a_long_step_prints_a_line_every_interval_and_its_status_comes_through() -> None:
    done, elapsed = _bash('HEARTBEAT_S=1 with_heartbeat "seeding" sleep 3.5; echo "status $?"')
    assert done.stdout.splitlines() == [
        "   ... seeding (1 s)",
        "   ... seeding (2 s)",
        "   ... seeding (3 s)",
        "status 0",
    ]
    assert elapsed < 4.5  # the heartbeat ends with the step, not at its next beat
    failed, _ = _bash('HEARTBEAT_S=1 with_heartbeat "failing" bash -c "exit 3"; echo "status $?"')
    assert failed.stdout == "status 3\n"


def test_the_demo_wraps_its_quiet_steps() -> None:
    demo = (REPO / "scripts" / "demo").read_text()
    for step in ("migrator fleet up", "migrator fleet seed"):
        [line] = [line for line in demo.splitlines() if step in line]
        assert line.startswith("with_heartbeat "), line
    assert 'with_heartbeat "installing"' in (REPO / "scripts" / "_venv.sh").read_text()


def test_a_step_that_counts_nothing_says_it_is_still_running_every_few_seconds() -> None:
    from migrator.progress import Silent, ticking

    class Lines(Silent):
        def __init__(self) -> None:
            self.lines: list[str] = []

        def phase(self, message: str) -> None:
            self.lines.append(message)

    progress = Lines()
    with ticking(progress, "verifying the bulk copy of tenant 7", every_s=0.1):
        time.sleep(0.35)
    ticks = len(progress.lines)
    assert ticks >= 3 and all(line.startswith("verifying the bulk copy of tenant 7: ") for line in progress.lines)
    with ticking(progress, "a short step", every_s=1.0):  # shorter than its interval: nothing said
        time.sleep(0.05)
    assert len(progress.lines) == ticks
