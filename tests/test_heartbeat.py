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
