"""`scripts/test` leaves nothing in the temporary directory after a passing run and keeps a failing
test's directory: pytest runs with the project's own settings on two one-test files, with its
temporary root in a directory of this test."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO

TEST_FILE = """
def test_writes(tmp_path):
    (tmp_path / "data").write_bytes(b"x" * 100_000)
    assert {ok}
"""


def _run_pytest(tmp_path: Path, name: str, ok: bool) -> tuple[int, list[Path]]:
    tests = tmp_path / name
    tests.mkdir()
    (tests / f"test_{name}.py").write_text(TEST_FILE.format(ok=ok))
    temporary = tmp_path / f"{name}-tmp"
    temporary.mkdir()
    env = {**os.environ, "TMPDIR": str(temporary)}
    env.pop("PYTEST_XDIST_WORKER", None)
    env.pop("PYTEST_ADDOPTS", None)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", str(REPO / "pyproject.toml"), tests],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return done.returncode, sorted(path for path in temporary.rglob("*") if path.is_file())


def test_a_passing_run_leaves_no_temporary_files_and_a_failing_one_keeps_them(tmp_path: Path) -> None:
    passed, left = _run_pytest(tmp_path, "passing", ok=True)
    assert passed == 0
    assert left == []
    failed, kept = _run_pytest(tmp_path, "failing", ok=False)
    assert failed == 1
    assert [path.name for path in kept] == ["data"]
