"""The stamps' Alembic history, read from `[schema] script_location`: where a stamp stands against a target.

A fleet rollout needs one answer per stamp (up to date, behind by N, ahead, or at a revision this
history does not know), so the history must have exactly one head.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from alembic import command
from alembic.script import ScriptDirectory
from alembic.script.revision import RevisionError
from alembic.util import CommandError
from sqlalchemy.engine import URL

from migrator.db import alembic as migrations
from migrator.errors import BadInput
from migrator.rollout.worker import reason, trace

logger = logging.getLogger(__name__)  # INFO (`migrator -v`): the traceback behind a one-line error

UP_TO_DATE, BEHIND, AHEAD = "up to date", "behind", "ahead"
UNKNOWN, UNREACHABLE = "unknown revision", "unreachable"


@dataclass(frozen=True)
class Revision:
    """One revision of the history (`migrator schema history`)."""

    revision: str
    down_revision: str | None
    message: str
    is_head: bool


@dataclass(frozen=True)
class History:
    location: Path
    script: ScriptDirectory
    head: str

    @classmethod
    def load(cls, location: Path | str) -> History:
        config = migrations.alembic_config(location)
        try:
            script = ScriptDirectory.from_config(config)
            heads = script.get_heads()
        except (CommandError, RevisionError) as exc:
            raise BadInput(f"{location}: {exc}") from None
        except Exception as exc:  # a revision file of the user's that does not even import
            logger.info("loading the revisions of %s failed:\n%s", location, trace(exc))
            raise BadInput(f"{location}: cannot load its revisions: {reason(exc)}") from None
        if len(heads) != 1:
            found = ", ".join(heads) or "none"
            raise BadInput(f"{location} must have exactly one head to roll out, found {found}; merge them first")
        return cls(Path(str(config.get_main_option("script_location"))), script, heads[0])

    def revisions(self) -> list[Revision]:
        """Newest first; the message is the first line of the revision's docstring."""
        return [
            Revision(
                script.revision,
                _joined(script.down_revision),
                (script.doc or "").strip().splitlines()[0] if script.doc else "",
                script.revision == self.head,
            )
            for script in self.script.walk_revisions()
        ]

    def known(self, revision: str) -> bool:
        return revision in {r.revision for r in self.script.walk_revisions()}

    def resolve(self, revision: str, allow_base: bool) -> str | None:
        """A full revision id for `head`, an id or a unique prefix; None for `base` (downgrades only)."""
        if revision == "base" and allow_base:
            return None
        try:
            found = self.script.get_revision(revision)
        except (CommandError, RevisionError) as exc:
            raise BadInput(f"unknown revision {revision!r} in {self.location}: {exc}") from None
        if found is None:
            raise BadInput(f"{revision!r} is not a revision to upgrade to (use head or a revision id)")
        return found.revision

    def path(self, upper: str | None, lower: str | None) -> tuple[str, ...] | None:
        """Revisions in (lower, upper], newest first; None when lower is not an ancestor of upper."""
        if upper is None:
            return () if lower is None else None
        try:
            return tuple(s.revision for s in self.script.iterate_revisions(upper, lower or "base"))
        except (CommandError, RevisionError):
            return None

    def classify(self, current: str | None, target: str | None) -> tuple[str, tuple[str, ...]]:
        """State against `target`, with the revisions to apply (oldest first) or to undo (newest first)."""
        if current is not None and not self.known(current):
            return UNKNOWN, ()
        if current == target:
            return UP_TO_DATE, ()
        up = self.path(target, current)
        if up:
            return BEHIND, tuple(reversed(up))
        down = self.path(current, target)
        if down:
            return AHEAD, down
        return UNKNOWN, ()  # on another branch: neither above nor below

    def offline_sql(self, current: str | None, target: str | None, direction: str, url: URL) -> str:
        """Alembic's offline mode (`sql=True`) from `current` to `target`: the script a run would execute.

        `url` is the stamp's, without its password: offline mode contacts no database, but the stock
        env.py configures its context from `sqlalchemy.url`. Not thread-safe (Alembic's module-level
        proxies): callers hold `migrator.rollout.worker.ALEMBIC_IN_PROCESS`.
        """
        config = migrations.alembic_config(self.location, url=url)
        config.output_buffer = buffer = io.StringIO()
        if direction == "upgrade":
            command.upgrade(config, f"{current}:{target}" if current else str(target), sql=True)
        else:
            command.downgrade(config, f"{current}:{target or 'base'}", sql=True)
        return buffer.getvalue()


def _joined(down: str | Sequence[str] | None) -> str | None:
    """A merge revision has several parents: shown comma-separated."""
    return down if down is None or isinstance(down, str) else ",".join(down)
