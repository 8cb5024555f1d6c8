"""The root command group and what every command shares: error mapping, config loading, output.

No logic lives here beyond presentation; every command maps `MigratorError` to one line on
stderr and its exit code (1 operation failed, 2 bad input, 3 schema drift), and `--json` gives
machine output.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from migrator import __version__
from migrator.cli import render
from migrator.errors import BadInput, Declined, MigratorError

if TYPE_CHECKING:  # psycopg and the engine load when a command runs: `migrator --help` must stay fast
    from migrator.context import Context

JSON = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
ALLOW_TRIGGERS = click.option(
    "--allow-triggers",
    is_flag=True,
    help="Proceed although application triggers on tenant tables would fire for migrator's writes "
    "(copies, replays, deletes): for triggers known to be harmless. Without it such a move is refused.",
)
YES = click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
NO_PROGRESS = click.option(
    "--no-progress", is_flag=True, help="Print no progress (bars on a terminal, else a line every few seconds)."
)


class Failure(click.ClickException):
    """A failure shown as one masked line on stderr (none when the report said it all), with its exit code."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(render.mask_text(message))
        self.exit_code = exit_code  # type: ignore[misc]  # a ClassVar in click, read per instance

    def show(self, file: Any = None) -> None:
        if self.message:
            click.echo(f"error: {self.format_message()}", err=True)


def _failure(exc: Exception) -> Failure:
    """The one mapping from an exception to the line and exit code the operator sees."""
    if isinstance(exc, MigratorError):
        return Failure(str(exc), exc.exit_code)
    if isinstance(exc, click.UsageError):
        return Failure(f"{typed_path(exc.ctx)}: {exc.format_message()}", exc.exit_code)
    if _database_error(exc):
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return Failure(f"database error: {first}", 1)
    return Failure(str(exc), 1)  # OSError: a file or directory the command needs


def _database_error(exc: BaseException) -> bool:
    """A psycopg error, told without importing psycopg: none can be raised before something imported it."""
    psycopg = sys.modules.get("psycopg")
    return psycopg is not None and isinstance(exc, psycopg.Error)


def summary(command: click.Command) -> str:
    """A command's one-line summary in its group's list: the first sentence of its help, whole.

    click cuts a summary at the terminal's width with `...`, mid-word or mid-backtick; a sentence that
    does not fit wraps instead.
    """
    return command.get_short_help_str(limit=10_000)


class SummaryGroup(click.Group):
    """A group that lists its commands by their whole first sentence (`summary`)."""

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        listed = [(name, self.get_command(ctx, name)) for name in self.list_commands(ctx)]
        rows = [(name, summary(command)) for name, command in listed if command is not None and not command.hidden]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


class MigratorGroup(SummaryGroup):
    """Maps engine, usage, database and file errors of every command to `Failure` (never a traceback).

    Commands end non-zero only by raising: a `MigratorError` (its `exit_code`) or click's usage errors.
    """

    group_class = SummaryGroup  # `migrator stamp`, `migrator plan`, ... list their commands the same way

    def main(self, *args: Any, **kwargs: Any) -> Any:
        from migrator.cli.complete import attach

        attach(self)  # stamp names, move ids and plan files complete too (`_MIGRATOR_COMPLETE`)
        return super().main(*args, **kwargs)

    def make_context(
        self, info_name: str | None, args: list[str], parent: click.Context | None = None, **extra: Any
    ) -> click.Context:
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.UsageError as exc:  # the root's own options, e.g. `migrator --bogus`
            raise _failure(exc) from None

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.exceptions.NoArgsIsHelpError:
            raise  # a group named alone (`migrator stamp`) shows its help
        except (MigratorError, click.UsageError, OSError) as exc:
            raise _failure(exc) from None
        except Exception as exc:
            if _database_error(exc):
                raise _failure(exc) from None
            raise


_IMPLIED = "migrator.implied_commands"  # ctx.meta key: paths of sub-commands DefaultGroup implied


class DefaultGroup(SummaryGroup):
    """A group that runs its `run` sub-command when the first word is not a sub-command name.

    So `migrator move 42 --to eu-2` moves, while `migrator move status` reports. Its help is the help of
    `run` (usage, text, options: what the group does by default) followed by the other sub-commands;
    `run` itself is hidden.
    """

    def format_help(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        run = self.commands["run"]
        run_ctx = run.make_context(ctx.info_name, [], parent=ctx.parent, resilient_parsing=True)
        run.format_usage(run_ctx, formatter)
        run.format_help_text(run_ctx, formatter)
        run.format_options(run_ctx, formatter)
        self.format_commands(ctx, formatter)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = ["run", *args]
            ctx.meta.setdefault(_IMPLIED, set()).add(f"{ctx.command_path} run")
        return super().parse_args(ctx, args)


def typed_path(ctx: click.Context | None) -> str:
    """The command as the user typed it: `migrator move`, not the `migrator move run` it implied."""
    if ctx is None:
        return "migrator"
    path = ctx.command_path
    return path.rsplit(" ", 1)[0] if path in ctx.meta.get(_IMPLIED, ()) else path


def confirm(question: str) -> None:
    """Ask before changing anything; no (or no terminal to answer) ends the command with `Declined`."""
    from migrator.interrupts import prompting

    try:
        with prompting():
            agreed = click.confirm(question, err=True)
    except click.Abort:  # end of input or Ctrl-C at the prompt: end the prompt's line
        click.echo(err=True)
        agreed = False
    if not agreed:
        raise Declined("not confirmed; nothing was changed")


class EngineDefault:
    """An option's default read from the engine's options dataclass when it is needed (a run, or help).

    One truth for every default; read lazily because the engine modules import SQLAlchemy and
    Alembic, which `migrator --help` must not load.
    """

    def __init__(self, read: Callable[[], Any]) -> None:
        self._read = read

    def __call__(self) -> Any:
        return self._read()

    def __str__(self) -> str:  # what click's show_default prints
        return str(self())


class EngineChoice(click.Choice):  # type: ignore[type-arg]
    """A choice among values the engine defines (an enum's), read when first needed, not at import."""

    def __init__(self, read: Callable[[], Sequence[str]]) -> None:
        self._read = read
        self._choices: tuple[str, ...] | None = None
        super().__init__(())

    @property  # type: ignore[override]
    def choices(self) -> tuple[str, ...]:
        if self._choices is None:
            self._choices = tuple(self._read())
        return self._choices

    @choices.setter
    def choices(self, value: Sequence[str]) -> None:
        """click's own __init__ sets the (empty) choices it was given; the engine's are read instead."""


F = TypeVar("F", bound=Callable[..., Any])


def _default_jobs() -> int:
    from migrator.move.run import default_jobs

    return default_jobs()


def _default_batch_rows() -> int:
    from migrator.move.run import MoveOptions

    return MoveOptions.batch_rows


def engine_option(
    flag: str, read: Callable[[], Any], help: str, kind: click.ParamType | None = None
) -> Callable[[F], F]:
    """An option whose default the engine's options dataclass defines (`read` returns it when needed,
    see `EngineDefault`); a positive whole number unless `kind` says otherwise."""
    return click.option(
        flag, type=kind or click.IntRange(min=1), default=EngineDefault(read), show_default=True, help=help
    )


METRICS_PORT = click.option(
    "--metrics-port",
    type=click.IntRange(min=1, max=65535),
    default=None,
    help="Serve Prometheus metrics on this port (all interfaces) while the command runs.",
)


def options(*decorators: Callable[[F], F]) -> Callable[[F], F]:
    """Several Click options as one decorator, listed in the order they would be stacked."""

    def apply(command: F) -> F:
        for decorate in reversed(decorators):
            command = decorate(command)
        return command

    return apply


def bundle(into: str, build: Callable[..., Any], *decorators: Callable[[F], F]) -> Callable[[F], F]:
    """Several Click options whose values reach the command as one argument, `into=build(**values)`
    (a dataclass of the engine, built when the command runs, so `--help` imports no engine)."""

    def probe() -> None: ...

    names = [param.name for param in getattr(options(*decorators)(probe), "__click_params__", [])]  # type: ignore[arg-type]

    def decorate(command: F) -> F:
        @functools.wraps(command)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            values = {name: kwargs.pop(name) for name in names if name}
            return command(*args, **{into: build(**values)}, **kwargs)

        return options(*decorators)(wrapper)  # type: ignore[arg-type,return-value]

    return decorate


OVERRIDE_POLICY = options(
    click.option(
        "--override-policy",
        is_flag=True,
        help="Proceed although the placement policy (residency, tier, anti-affinity) forbids it; needs --reason, "
        "and the audit trail records both.",
    ),
    click.option("--reason", default=None, help="Why the placement policy is overridden (with --override-policy)."),
)


def override_reason(override_policy: bool, reason: str | None) -> str | None:
    """The reason of `--override-policy --reason TEXT`, or None without the flag; one without the other is
    a usage error (an override nobody explained is not recorded, it is refused)."""
    if override_policy and not (reason or "").strip():
        raise click.UsageError("--override-policy needs --reason TEXT (the audit trail records it)")
    if reason is not None and not override_policy:
        raise click.UsageError("--reason goes with --override-policy")
    return reason.strip() if override_policy and reason else None


NO_REVERT_WINDOW = click.option(
    "--no-revert-window",
    is_flag=True,
    help="Open no revert window at the flip: the target carries no capture trigger for the tenants, and "
    "`migrator move revert` cannot take the move back.",
)
RUN_FLAGS = options(YES, NO_PROGRESS, JSON)  # --yes, --no-progress, --json: a command that changes the fleet


@dataclass(frozen=True)
class Queued:
    """`--queue [NAME]` and `--wait`: hand the work to `migrator worker` processes on queue `name`, and
    follow it there (`wait`)."""

    name: str
    wait: bool


def queued(what: str, wait: str, alone: str) -> Callable[[F], F]:
    """`--queue [NAME]` of `apply` and `schema upgrade`, which hands the work to `migrator worker`
    processes, and `--wait`, which follows it there: one argument `queue: Queued | None` (None: run
    here). `alone` is the error for --wait without --queue, formatted with the command's parameters."""

    def build(queue: str | None, wait: bool) -> Queued | None:
        if wait and queue is None:
            raise BadInput(alone.format(**click.get_current_context().params))
        return None if queue is None else Queued(queue, wait)

    option = click.option(
        "--queue",
        is_flag=False,
        flag_value="migrator",
        default=None,
        metavar="[NAME]",
        help=f"Send {what} to `migrator worker` processes on this queue (default queue: migrator) instead of "
        "running them here.",
    )
    return bundle("queue", build, option, click.option("--wait", is_flag=True, help=f"With --queue: {wait}"))


def _rollout_default(name: str) -> Any:
    from migrator.rollout.runner import RolloutOptions

    return getattr(RolloutOptions, name)


class EngineParsed(click.ParamType):
    """A value the engine parses (`parse` imports it when a command runs): its one-line error is click's."""

    def __init__(self, name: str, parse: Callable[[str], Any]) -> None:
        self.name = name
        self._parse = parse

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):
            return value  # a default, already the engine's value
        try:
            return self._parse(value)
        except MigratorError as exc:
            self.fail(str(exc), param, ctx)


def _parse_waves(text: str) -> Any:
    from migrator.rollout.ripple import Waves

    return Waves.parse(text)


def _parse_duration(text: str) -> float:
    from migrator.rollout.ripple import parse_duration

    return parse_duration(text)


RIPPLE = options(  # --waves, --bake, --check: a schema rollout that ripples (upgrade and downgrade)
    click.option(
        "--waves",
        type=EngineParsed("waves", _parse_waves),
        default=EngineDefault(lambda: _rollout_default("waves")),
        metavar="SPEC",
        help="Progressively larger waves after the canary, cumulative counts or percents of the stamps after it, "
        "ending at 100% (e.g. 1,5%,25%,100%); --parallel still bounds the stamps at once in a wave. "
        "Default: waves of --parallel stamps.",
    ),
    click.option(
        "--bake",
        "bake_s",
        type=EngineParsed("duration", _parse_duration),
        default=EngineDefault(lambda: _rollout_default("bake_s")),
        metavar="DURATION",
        help="Wait this long (30s, 5m, 1h) after the canary and after each wave but the last, before the next. "
        "Default: no wait.",
    ),
    click.option(
        "--check",
        default=EngineDefault(lambda: _rollout_default("check")),
        metavar="CMD",
        help="Shell command run after the canary and after each wave but the last (after --bake), before the "
        "next, with MIGRATOR_WAVE, MIGRATOR_WAVE_STAMPS and MIGRATOR_TARGET_REVISION in its environment; a non-zero "
        "exit stops the rollout, leaving the stamps not started untouched.",
    ),
)

BATCH_ROWS = engine_option(
    "--batch-rows", _default_batch_rows, "Rows per copy batch (each batch is one target transaction)."
)
JOBS = engine_option(
    "--jobs",
    _default_jobs,
    "Parallel streams, each a source and a target connection: key ranges of large tables and "
    "independent tables copy (and verify) at once.",
)


def context_of(click_ctx: click.Context) -> Context:
    """The operation's context, loaded (config validated) on a command's first use of it."""
    from migrator.context import Context

    obj = click_ctx.find_root().obj
    if "context" not in obj:
        obj["context"] = Context.load(obj["config"], obj.get("actor"))
        click_ctx.find_root().call_on_close(obj["context"].catalog.close)
    return obj["context"]


def emit(as_json: bool, data: Any, text: str) -> None:
    click.echo(render.to_json(data) if as_json else text)


@click.group(cls=MigratorGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Path of migrator.toml (else $MIGRATOR_CONFIG, else ./migrator.toml).",
)
@click.option("-v", "--verbose", is_flag=True, help="Log retries and phases to stderr.")
@click.option("--actor", default=None, help="Who the audit trail names for this command's changes (else $USER).")
@click.version_option(__version__, prog_name="migrator")
@click.pass_context
def cli(ctx: click.Context, config_path: Path | None, verbose: bool, actor: str | None) -> None:
    """Move tenants between deployment stamps, drain and rebalance stamps, migrate every stamp's schema."""
    render.setup_logging(verbose)
    ctx.obj = {"config": config_path, "actor": actor}


def route_dict(route: Any) -> dict[str, Any]:
    return {
        "tenant": route.tenant,
        "stamp": route.stamp,
        "version": route.version,
        "state": route.state,
        "updated_at": route.updated_at,
    }
