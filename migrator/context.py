"""What every operation runs with: the validated configuration and the catalog it names."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from migrator import config as configlib
from migrator.catalog import Catalog
from migrator.config import Config
from migrator.metrics import Metrics


@dataclass(frozen=True)
class Context:
    config: Config
    catalog: Catalog
    metrics: Metrics = field(default_factory=Metrics)  # this process's; served by --metrics-port

    @classmethod
    def load(cls, path: str | Path | None = None, actor: str | None = None) -> Context:
        """Validate the config (`--config`) before any connection is opened; `actor` (--actor) is who
        the audit trail names, else $USER."""
        cfg = configlib.load(path)
        return cls(cfg, Catalog(cfg.catalog_url, actor))
