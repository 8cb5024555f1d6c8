"""Turning engine results into text tables, JSON and progress bars (the CLI's only presentation code)."""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from collections.abc import Sequence
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from tqdm import tqdm

from migrator.db.dsn import mask_text


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


class Bars:
    """Progress as tqdm bars on stderr: one overall bar and one per table, with rows/s."""

    def __init__(self, desc: str = "total") -> None:
        self._desc = desc
        self._overall: tqdm[Any] | None = None
        self._bars: dict[str, tqdm[Any]] = {}

    def begin(self, total: int) -> None:
        if self._overall is None:
            self._overall = tqdm(
                total=total or None,
                desc=self._desc,
                unit="rows",
                unit_scale=True,
                position=0,
                file=sys.stderr,
                dynamic_ncols=True,
                leave=True,
            )

    def phase(self, message: str) -> None:
        tqdm.write(mask_text(message), file=sys.stderr)

    def start_table(self, table: str, total: int, done: int) -> None:
        bar = tqdm(
            total=total or None,
            initial=done,
            desc=table,
            unit="rows",
            unit_scale=True,
            leave=False,
            position=1,
            file=sys.stderr,
            dynamic_ncols=True,
        )
        self._bars[table] = bar
        if done and self._overall is not None:
            self._overall.update(done)

    def advance(self, table: str, rows: int) -> None:
        if table in self._bars:
            self._bars[table].update(rows)
        if self._overall is not None:
            self._overall.update(rows)

    def finish_table(self, table: str) -> None:
        bar = self._bars.pop(table, None)
        if bar is not None:
            bar.close()

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()
        if self._overall is not None:
            self._overall.close()
