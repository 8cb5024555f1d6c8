"""`--metrics-port` serves Prometheus metrics while a move runs, and its counters are the move's own figures."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
import urllib.request

import pytest
from conftest import Fleet, tenant_row_count, terminate_migrator_sessions
from prometheus_client.parser import text_string_to_metric_families

from migrator.context import Context
from migrator.move import MoveOptions, move_tenants
from migrator.progress import Silent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Sample name and labels -> value, from the endpoint."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_count_the_rows_freeze_and_retries_the_move_reports(
    fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="migrator.retry")
    seeded = fleet.seed("eu-1", 7, 12_000)
    ctx = Context(fleet.ctx.config, fleet.ctx.catalog)  # its own metrics
    port = _free_port()
    layout = fleet.layout()
    killed: list[int] = []
    done = threading.Event()

    def kill_mid_copy() -> None:
        """Once the copy's first batches are on the target (a fixed delay misses it on a loaded machine)."""
        while not done.is_set() and not tenant_row_count(fleet.dsn("eu-2"), layout, "7"):
            time.sleep(0.02)
        while not done.is_set() and not killed:
            if n := terminate_migrator_sessions(fleet, fleet.dsn("eu-2")):
                killed.append(n)
            time.sleep(0.01)

    killer = threading.Thread(target=kill_mid_copy)
    with ctx.metrics.serve(port):
        killer.start()
        try:
            outcome = move_tenants(ctx, ("7",), "eu-2", MoveOptions(batch_rows=500, jobs=1, rate_limit=5_000), Silent())
        finally:
            done.set()
            killer.join()
        scraped = _scrape(port)
    assert killed and killed[0] >= 1, "the copy's session was not terminated: no retry to count"
    assert outcome.move is not None and outcome.move.freeze_ms is not None
    retried = [r for r in caplog.records if r.name == "migrator.retry"]
    assert len(retried) >= 1

    def value(name: str, **labels: str) -> float:
        return scraped.get((name, tuple(sorted(labels.items()))), 0.0)

    assert value("migrator_rows_copied_total", source="eu-1", target="eu-2") == outcome.move.rows_copied == seeded
    assert sum(v for (n, _), v in scraped.items() if n == "migrator_transient_retries_total") == len(retried)
    assert value("migrator_freeze_duration_seconds_count", outcome="flipped") == 1
    assert value("migrator_freeze_duration_seconds_sum", outcome="flipped") * 1000 == pytest.approx(
        outcome.move.freeze_ms, abs=0.01
    )
    assert value("migrator_moves_ended_total", outcome="flipped") == 1
    assert all(v == 0 for (n, _), v in scraped.items() if n == "migrator_moves")  # none running any more
    assert ("migrator_catchup_backlog_changes", (("source", "eu-1"),)) in scraped
    assert value("migrator_verify_mismatches_total") == 0
    assert not any("7" in dict(labels).values() for _, labels in scraped), "a tenant id became a label"


def test_metrics_endpoint_answers_while_a_move_copies(fleet: Fleet) -> None:
    seeded = fleet.seed("eu-1", 7, 9_000)
    port = _free_port()
    proc = fleet.popen(
        "move", "7", "--to", "eu-2", "--jobs", "1", "--batch-rows", "300", "--rate-limit", "3000",
        "--metrics-port", str(port), "--yes", "--json",
    )  # fmt: skip
    copying: list[float] = []
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            scraped = _scrape(port)
        except OSError:
            time.sleep(0.1)
            continue
        if scraped.get(("migrator_moves", (("phase", "copying"),))) == 1:
            copying.append(scraped.get(("migrator_rows_copied_total", (("source", "eu-1"), ("target", "eu-2")))))
        time.sleep(0.2)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    moved = json.loads(out)["move"]
    assert len(copying) >= 3, copying  # answered several times during the copy
    assert copying == sorted(copying) and copying[-1] <= moved["rows_copied"] == seeded
    assert any(0 < rows < seeded for rows in copying), copying  # seen part-way through the copy


def test_a_metrics_port_in_use_is_refused_before_the_move_starts(fleet: Fleet) -> None:
    fleet.seed("eu-1", 7, 100)
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        result = fleet.run("move", "7", "--to", "eu-2", "--metrics-port", str(taken.getsockname()[1]), "--yes")
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: --metrics-port") and result.stderr.count("\n") == 1
    assert fleet.catalog.route("7").stamp == "eu-1" and fleet.catalog.open_move("7") is None


def test_metrics_of_a_cohort_count_one_move_and_each_of_its_tenants(fleet: Fleet) -> None:
    counts = fleet.seed_many("eu-1", list(range(31, 41)), 300)
    ctx = Context(fleet.ctx.config, fleet.ctx.catalog)
    port = _free_port()
    with ctx.metrics.serve(port):
        outcome = move_tenants(ctx, tuple(str(t) for t in counts), "eu-2", MoveOptions(batch_rows=200), Silent())
        scraped = _scrape(port)
    assert outcome.move is not None and len(outcome.routes) == 10
    assert scraped[("migrator_rows_copied_total", (("source", "eu-1"), ("target", "eu-2")))] == sum(counts.values())
    assert outcome.move.rows_copied == sum(counts.values())
    assert scraped[("migrator_moves_ended_total", (("outcome", "flipped"),))] == 1
    assert scraped[("migrator_tenants_moved_total", ())] == 10
    assert scraped[("migrator_freeze_duration_seconds_count", (("outcome", "flipped"),))] == 1
    assert all(v == 0 for (n, _), v in scraped.items() if n in ("migrator_moves", "migrator_move_tenants"))
    assert ("migrator_move_tenants", (("phase", "copying"),)) in scraped  # it was counted while it copied
