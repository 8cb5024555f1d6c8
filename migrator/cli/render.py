"""Turning engine results into text tables, JSON and progress bars (the CLI's only presentation code)."""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import date, datetime
from decimal import Decimal
from typing import Any, Protocol

from migrator.progress import Progress, Silent

# tqdm and the DSN helpers (psycopg) are imported where a line or a bar is drawn: `migrator --help`
# draws none and must stay fast.


def mask_text(text: str) -> str:
    """The text with every DSN password masked (`migrator.db.dsn.mask_text`)."""
    from migrator.db.dsn import mask_text as mask

    return mask(text)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain aligned text table; empty cells for None."""
    cells = [[("" if v is None else str(v)) for v in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines)


def _default(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    raise TypeError(f"cannot render {type(value).__name__} as JSON")


def to_json(value: Any) -> str:
    return json.dumps(value, default=_default, indent=2, sort_keys=True)


class MaskingFilter(logging.Filter):
    """Logging filter that masks DSN passwords in every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = mask_text(record.getMessage())
        record.args = ()
        return True


def setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(MaskingFilter())
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("migrator")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO if verbose else logging.WARNING)


LINE_INTERVAL_S = 5.0  # how often a progress line is written where stderr is not a terminal (never 10 s quiet)


class Meter(Protocol):
    """One counter of progress: a tqdm bar on a terminal, else a `LineMeter`."""

    def update(self, n: int) -> object: ...

    def set_description(self, desc: str) -> None: ...

    def close(self) -> None: ...


class LineMeter:
    """Progress for logs (CI, cron, Kubernetes): a plain line every `interval` seconds and one at the end.

    No carriage returns or cursor codes, which a terminal-less log would keep as garbage.
    """

    def __init__(
        self, desc: str, total: int | None, unit: str, initial: int = 0, interval: float = LINE_INTERVAL_S
    ) -> None:
        self._desc, self._total, self._unit, self._interval = desc, total, unit, interval
        self._done = self._start = initial
        self._began = self._last = time.monotonic()
        self._closed = False

    def update(self, n: int) -> None:
        self._done += n
        if time.monotonic() - self._last >= self._interval:
            self._line()

    def set_description(self, desc: str) -> None:
        self._desc = desc

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._line()

    def _line(self) -> None:
        now = time.monotonic()
        self._last = now
        elapsed = now - self._began
        rate = (self._done - self._start) / max(elapsed, 1e-6)
        done = counted(self._done, self._total, self._unit) if self._total else ""
        left = (self._total - self._done) / rate if self._total and rate > 0 and self._done < self._total else None
        eta = f", ETA {left:.0f} s" if left is not None else ""
        say(f"{self._desc}: {done or f'{self._done:,} {self._unit}'}, {rate:,.0f} {self._unit}/s, {elapsed:.1f} s{eta}")


def counted(done: int, total: int, unit: str) -> str:
    """`350/1,000 rows (35%)`; past a total counted at the start, `382 rows: 350 at start + 32 written
    since` (rows the application wrote during the copy), never more than 100%."""
    if done > total:
        return f"{done:,} {unit}: {total:,} at start + {done - total:,} written since"
    return f"{done:,}/{total:,} {unit} ({done / total:.0%})"


class _Bar:
    """A tqdm bar whose total grows, saying why, when rows written during the copy pass the count
    taken at the start (tqdm would show 109%)."""

    def __init__(self, bar: Any, total: int | None) -> None:
        self._bar, self._at_start = bar, total or 0

    def update(self, n: int) -> None:
        self._bar.update(n)
        if self._at_start and self._bar.n > self._at_start:
            self._bar.total = self._bar.n
            written = self._bar.n - self._at_start
            self._bar.set_postfix_str(f"{self._at_start:,} at start + {written:,} written since", refresh=False)

    def set_description(self, desc: str) -> None:
        self._bar.set_description(desc)

    def close(self) -> None:
        self._bar.close()


def terminal() -> bool:
    """Whether stderr, where progress goes, is a terminal that can redraw bars."""
    return sys.stderr.isatty()


def meter(
    desc: str,
    total: int | None,
    unit: str,
    *,
    initial: int = 0,
    position: int = 0,
    leave: bool = True,
    scale: bool = True,
) -> Meter:
    """A tqdm bar when stderr is a terminal, else plain lines (tqdm would write carriage returns).

    `scale` abbreviates large counts on the bar (12.3k rows); counts of a few stamps stay whole.
    """
    if not terminal():
        return LineMeter(desc, total, unit, initial)
    from tqdm import tqdm

    bar = tqdm(
        total=total or None,
        initial=initial,
        desc=desc,
        unit=unit,
        unit_scale=scale,
        position=position,
        leave=leave,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    return _Bar(bar, total)


def tenants_cell(tenants: tuple[str, ...]) -> str:
    """A cohort in one table cell: its first tenant and how many more (`101 +49`)."""
    return tenants[0] + (f" +{len(tenants) - 1}" if len(tenants) > 1 else "")


def say(message: str) -> None:
    """One masked line on stderr, above any bars being drawn."""
    from tqdm import tqdm

    tqdm.write(mask_text(message), file=sys.stderr)


class Bars:
    """The CLI's `Progress` (`migrator.progress`) on stderr: one overall counter, one per part worked on
    at once (a move's tables, a rollout's wave) with its rate, and lines.

    Bars on a terminal, plain periodic lines elsewhere (see `meter`). Parts under way at once (the
    move's parallel streams report from their threads) each get their own line under the total.
    """

    def __init__(self, desc: str = "total") -> None:
        self._desc = desc
        self._overall: Meter | None = None
        self._bars: dict[str, tuple[Meter, int]] = {}  # part -> its bar and the line it is drawn on
        self._lock = threading.Lock()

    def begin(self, total: int, unit: str = "rows") -> None:
        with self._lock:
            if self._overall is None:
                self._overall = meter(self._desc, total, unit, scale=unit == "rows")

    def describe(self, text: str) -> None:
        with self._lock:
            self._desc = text
            if self._overall is not None:
                self._overall.set_description(text)

    def phase(self, message: str) -> None:
        say(message)

    def note(self, message: str) -> None:
        say(message)

    def start(self, part: str, total: int, done: int = 0, unit: str = "rows") -> None:
        if self._overall is None:  # cleanup and abort count rows without a total
            self.begin(0, unit)
        with self._lock:
            taken = {line for _, line in self._bars.values()}
            line = next(n for n in range(1, len(taken) + 2) if n not in taken)
            bar = meter(part, total, unit, initial=done, position=line, leave=False, scale=unit == "rows")
            self._bars[part] = (bar, line)
            if done and self._overall is not None:
                self._overall.update(done)

    def advance(self, part: str, count: int) -> None:
        with self._lock:
            if part in self._bars:
                self._bars[part][0].update(count)
            if self._overall is not None:
                self._overall.update(count)

    def finish(self, part: str) -> None:
        with self._lock:
            bar = self._bars.pop(part, None)
            if bar is not None:
                bar[0].close()

    def close(self) -> None:
        with self._lock:
            for bar, _ in self._bars.values():
                bar.close()
            if self._overall is not None:
                self._overall.close()


class Notes(Silent):
    """The `Progress` of --json and --no-progress runs: only its notes (what an interruption did, what a
    plan waits for)."""

    def note(self, message: str) -> None:
        say(message)


@contextmanager
def progress(enabled: bool, desc: str = "total") -> Iterator[Progress]:
    """`Bars` for one command, closed however it ends; `Notes` for --json and --no-progress."""
    if not enabled:
        yield Notes()
        return
    bars = Bars(desc)
    try:
        yield bars
    finally:
        bars.close()
