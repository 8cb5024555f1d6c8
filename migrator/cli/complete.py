"""Shell completion beyond command names: stamp names and move ids from the catalog, plan files.

Enabled with `eval "$(_MIGRATOR_COMPLETE=bash_source migrator)"` (zsh_source, fish_source), click's
own mechanism. Which parameter completes what is said once, here, by parameter name; the catalog is
read with a short timeout and any failure (no config, catalog down) completes nothing, silently.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import click
from click.shell_completion import CompletionItem

PLANS_DIR = Path("plans")
PLAN_SUFFIXES = (".yaml", ".yml")

Completer = Callable[[click.Context, click.Parameter, str], list[CompletionItem]]


def _catalog_url(ctx: click.Context) -> str:
    from migrator import config as configlib

    return configlib.load(ctx.find_root().params.get("config_path")).catalog_url


def _from_catalog(read: Callable[[str], list[tuple[str, str]]]) -> Completer:
    def complete(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[CompletionItem]:
        try:
            found = read(_catalog_url(ctx))
        except Exception:  # no config, catalog unreachable or too slow: complete nothing, print nothing
            return []
        return [CompletionItem(value, help=about) for value, about in found if value.startswith(incomplete)]

    return complete


def _stamps(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    from migrator.catalog.completion import stamp_names

    return _from_catalog(stamp_names)(ctx, param, incomplete)


def _moves(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    from migrator.catalog.completion import move_ids

    return _from_catalog(move_ids)(ctx, param, incomplete)


def _plan_files(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    """Plan files under ./plans/ (where `migrator plan` writes them); any other path as a file."""
    plans = sorted(
        str(path)
        for path in (PLANS_DIR.glob("*") if PLANS_DIR.is_dir() else ())
        if path.suffix in PLAN_SUFFIXES and str(path).startswith(incomplete)
    )
    return [CompletionItem(path) for path in plans] or [CompletionItem(incomplete, type="file")]


# parameter name -> what it completes; `name` is a stamp's only under `migrator stamp` (not `stamp add`).
STAMP_PARAMS = {"stamp", "source", "target", "to", "canary", "names"}
MOVE_PARAMS = {"move_id"}
PLAN_FILE_COMMANDS = {"apply", "plan show"}


def _completer(path: str, param: click.Parameter) -> Completer | None:
    if param.name in STAMP_PARAMS or (param.name == "name" and path.startswith("stamp ") and path != "stamp add"):
        return _stamps
    if param.name in MOVE_PARAMS:
        return _moves
    if param.name == "file" and path in PLAN_FILE_COMMANDS:
        return _plan_files
    return None


def attach(group: click.Group, prefix: str = "") -> None:
    """Give every parameter that names a stamp, a move or a plan file its completion (idempotent)."""
    for name, command in group.commands.items():
        path = f"{prefix}{name}"
        for param in command.params:
            found = _completer(path, param)
            if found is not None and param._custom_shell_complete is None:
                param._custom_shell_complete = found
        if isinstance(command, click.Group):
            attach(command, f"{path} ")
