"""Fleet-wide schema migrations: one Alembic history applied uniformly to every stamp.

`schema_status` compares each stamp's revision with the head, so drift shows at a glance.
`upgrade_fleet` upgrades a canary first (the active stamp with the fewest tenants: the smallest
blast radius), stops if it fails, then upgrades the rest in waves: of `--parallel` stamps, or
progressively larger ones (`--waves`); between two waves it bakes and checks (`--bake`, `--check`:
see `ripple`), and a failing check stops it with the later waves untouched. Each stamp
runs under its own lock with one transaction per revision, so a failing revision leaves it at the
previous one; every stamp's run is recorded in the catalog's `schema_runs`. `downgrade_stamps` is
the same machinery in reverse. A dry run prints the pending revisions and their SQL (Alembic's
offline mode) and touches no stamp. Stamps that hold a fenced move are refused: changing a
table under a cutover would stall or break it.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime

import psycopg

from migrator import stamps
from migrator.catalog import Stamp, StampState, StepResult, list_tenants
from migrator.catalog.schema_runs import RunLog, SchemaRun, runs
from migrator.context import Context
from migrator.db import dsn as dsnlib
from migrator.db.alembic import read_revision
from migrator.errors import BadInput, MigratorError
from migrator.progress import Progress, Silent
from migrator.rollout.history import AHEAD, BEHIND, UNKNOWN, UNREACHABLE, UP_TO_DATE, History, Revision
from migrator.rollout.ripple import CheckRun, Gate, Waves, check_env, run_check, split
from migrator.rollout.worker import ALEMBIC_IN_PROCESS, Job, StepDone, Workers, reason, trace
from migrator.stamps.fanout import PER_SERVER, each_stamp
from migrator.stamps.fingerprint import cached_digest

__all__ = [
    "AHEAD", "BEHIND", "UNKNOWN", "UNREACHABLE", "UP_TO_DATE", "Plan", "Revision", "Rollout", "RolloutFailed",
    "RolloutOptions", "SchemaRun", "StampOutcome", "StampSchema", "downgrade_stamps", "history",
    "runs", "schema_status", "upgrade_fleet",
]  # fmt: skip

OK, FAILED, SKIPPED, DRY_RUN = StepResult.OK, StepResult.FAILED, StepResult.SKIPPED, StepResult.DRY_RUN
logger = logging.getLogger(__name__)  # INFO (shown with `migrator -v`): tracebacks behind one-line stamp errors


class RolloutFailed(MigratorError):
    """At least one stamp failed; raised by the CLI after the report is shown (exit 1)."""


@dataclass(frozen=True)
class StampSchema:
    """One stamp's revision against a target (the head for `schema status`)."""

    stamp: str
    stamp_state: str  # the catalog's active / draining / retired
    tenants: int  # routes in the catalog: the blast radius of a bad revision
    current: str | None
    target: str | None
    pending: tuple[str, ...]  # to apply (oldest first) when behind, to undo (newest first) when ahead
    state: str
    error: str | None = None
    fingerprint: str | None = None  # the structure's digest (`schema status`; None where not read)
    odd: bool = False  # its fingerprint is not the majority's among the stamps at its revision

    @property
    def drift(self) -> bool:
        return self.state != UP_TO_DATE or self.odd


@dataclass(frozen=True)
class Plan:
    """What a rollout will do, shown before it starts (`--yes` skips the question)."""

    run_id: str
    direction: str
    target: str | None
    stamps: tuple[StampSchema, ...]
    waves: tuple[tuple[str, ...], ...]  # stamp names; the first wave is the canary alone when there is one
    canary: str | None
    targets: dict[str, Stamp] = field(repr=False, compare=False)  # DSNs: never rendered
    retired: tuple[str, ...] = ()  # retired stamps left out (not named with --stamp): skipped, and said so
    gate: Gate = Gate()  # what runs after each wave but the last, before the next (--bake, --check)

    def row(self, name: str) -> StampSchema:
        return next(s for s in self.stamps if s.stamp == name)

    def wave_name(self, number: int) -> str:
        return wave_name(number, self.canary is not None)

    def wave_of(self, name: str) -> int:
        return next(number for number, wave in enumerate(self.waves) if name in wave)

    def check_env(self, number: int) -> dict[str, str]:
        """The environment `--check` sees after wave `number` (see `ripple.check_env`)."""
        return check_env(self.run_id, self.direction, self.target, number, self.wave_name(number), self.waves[number])


def wave_name(number: int, canary: bool) -> str:
    """The one numbering of a rollout's waves, in its prompt, progress, table and messages: "canary" for
    the canary's wave (index 0, when there is one), then "wave 1", "wave 2"... (`StampOutcome.wave` and
    the JSON keep the index)."""
    if canary and number == 0:
        return "canary"
    return f"wave {number if canary else number + 1}"


@dataclass(frozen=True)
class StampOutcome:
    """One stamp's line in the final report; `at_revision` is where it is now."""

    stamp: str
    wave: int | None  # None: not run
    result: StepResult
    from_revision: str | None
    to_revision: str | None
    at_revision: str | None
    pending: tuple[str, ...] = ()
    error: str | None = None
    sql: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None


@dataclass(frozen=True)
class Rollout:
    """The result of one `schema upgrade/downgrade` run: every selected stamp's outcome, in wave order."""

    run_id: str
    direction: str
    target: str | None
    canary: str | None
    dry_run: bool
    outcomes: tuple[StampOutcome, ...]
    stopped: str | None  # why the rollout ended before every stamp was tried
    interrupted: bool = False  # a stop (Ctrl-C, SIGTERM) ended it between two waves
    check: CheckRun | None = None  # the --check that failed and stopped it

    @property
    def failed(self) -> list[StampOutcome]:
        return [o for o in self.outcomes if o.result == FAILED]

    def summary(self) -> str:
        target = self.target or "base"
        counts = Counter(o.result for o in self.outcomes)
        text = f"{self.direction} to {target}: " + ", ".join(f"{n} {r}" for r, n in sorted(counts.items()))
        if self.failed:
            text += "; failed: " + ", ".join(
                f"{o.stamp} (at {o.at_revision})" if o.at_revision else o.stamp for o in self.failed
            )
        return text + (f"; {self.stopped}" if self.stopped else "")


# -- read-only views -----------------------------------------------------------------------------


def schema_status(
    ctx: Context, active_only: bool = False, per_server: int | None = None, *, fingerprints: bool = False
) -> list[StampSchema]:
    """Every stamp (`--active-only`: active ones) against the head, with its structure's fingerprint
    (`fingerprints`: see `migrator.rollout.drift`, which groups them) read in the same session; at most
    `per_server` sessions on one server at once. Unreachable stamps are reported too."""
    found = History.load(ctx.config.schema_env())
    return _survey(ctx, found, _select(ctx, (), active_only), found.head, per_server, fingerprints=fingerprints)


def history(ctx: Context) -> list[Revision]:
    """The stamps' revisions, newest first."""
    return History.load(ctx.config.schema_env()).revisions()


# -- rollouts ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RolloutOptions:
    """Flags of `migrator schema upgrade` (REVISION, --canary, --parallel, --continue-on-error,
    --dry-run, --active-only, --waves, --bake, --check; with --queue, --connections-per-server) and
    `schema downgrade` (REVISION, --parallel, --waves, --bake, --check)."""

    revision: str = "head"
    canary: str | None = None  # None: the active stamp with the fewest tenants
    parallel: int = 4  # stamps at once in a wave, and a wave's size without --waves
    continue_on_error: bool = False  # a failing canary still stops the rollout
    dry_run: bool = False
    active_only: bool = False
    connections_per_server: int = PER_SERVER  # a queued rollout's sessions on one server at once, planning included
    waves: Waves | None = None  # None: equal waves of `parallel` (one wave with --queue) after the canary
    bake_s: float = 0.0  # wait after the canary and after each wave but the last
    check: str | None = None  # shell command gating the next wave; non-zero exit stops the rollout

    @property
    def gate(self) -> Gate:
        return Gate(self.bake_s, self.check)


def upgrade_fleet(
    ctx: Context,
    options: RolloutOptions = RolloutOptions(),
    progress: Progress | None = None,
    confirm: Callable[[Plan], None] | None = None,
    stop: threading.Event | None = None,
) -> Rollout:
    """`migrator schema upgrade`: the canary, then waves of `parallel` stamps, to `options.revision`.

    A failing canary always stops the rollout; a failing later wave stops it unless
    `continue_on_error`. `confirm` sees the plan before anything runs and may raise to abort. `stop`
    (Ctrl-C, SIGTERM) lets the running wave's steps end and starts no more waves.
    """
    found = History.load(ctx.config.schema_env())
    target = found.resolve(options.revision, allow_base=False)
    chosen, retired = _rollout_stamps(ctx, (), options.active_only)
    plan = _plan(ctx, found, "upgrade", target, chosen, options, retired=retired)
    return _run(ctx, found, plan, options, progress or Silent(), confirm, stop)


def plan_upgrade(ctx: Context, options: RolloutOptions) -> tuple[History, Plan]:
    """The checks and order of `upgrade_fleet` without running it: what `schema upgrade --queue` sends.

    Its survey of the stamps' revisions opens at most `connections_per_server` sessions on each
    server at once, the budget the queued steps keep to. Without `--waves` the stamps after the
    canary are one wave: the workers and the per-server budget bound how many run at once.
    """
    found = History.load(ctx.config.schema_env())
    target = found.resolve(options.revision, allow_base=False)
    chosen, retired = _rollout_stamps(ctx, (), options.active_only)
    return found, _plan(
        ctx,
        found,
        "upgrade",
        target,
        chosen,
        replace(options, parallel=max(1, len(chosen))),
        options.connections_per_server,
        retired=retired,
    )


def record_not_run(log: RunLog, plan: Plan) -> list[StampOutcome]:
    """The plan's stamps with nothing to do, and the retired stamps it left out, recorded as skipped."""
    idle = [_not_run(log, s) for s in plan.stamps if not any(s.stamp in w for w in plan.waves)]
    retired = []
    for name in plan.retired:
        outcome = StampOutcome(name, None, SKIPPED, None, plan.target, None, (), "retired: left out of rollouts")
        log.add(outcome.stamp, outcome.from_revision, outcome.result, outcome.error)
        retired.append(outcome)
    return [*idle, *retired]


def downgrade_stamps(
    ctx: Context,
    revision: str,
    names: Sequence[str] = (),
    options: RolloutOptions = RolloutOptions(),
    progress: Progress | None = None,
    confirm: Callable[[Plan], None] | None = None,
    stop: threading.Event | None = None,
) -> Rollout:
    """`migrator schema downgrade`: the named stamps (`--stamp`, default all) down to `revision` or "base",
    canary first, then in waves (`options`: --parallel, --waves) with the same gate between them as an upgrade."""
    found = History.load(ctx.config.schema_env())
    target = found.resolve(revision, allow_base=True)
    options = replace(options, revision=revision)
    chosen, retired = _rollout_stamps(ctx, names, False)
    plan = _plan(ctx, found, "downgrade", target, chosen, options, retired=retired)
    return _run(ctx, found, plan, options, progress or Silent(), confirm, stop)


def _select(ctx: Context, names: Sequence[str], active_only: bool) -> list[Stamp]:
    if names:
        return [ctx.catalog.stamp(name) for name in dict.fromkeys(names)]
    return [s for s in ctx.catalog.stamps() if s.state == StampState.ACTIVE or not active_only]


def _rollout_stamps(ctx: Context, names: Sequence[str], active_only: bool) -> tuple[list[Stamp], tuple[str, ...]]:
    """The stamps a rollout changes, and the retired ones it leaves out: a retired stamp holds no tenant and
    serves none, so its schema is left where it is, unless `--stamp` names it. Draining stamps still hold
    tenants and are included."""
    chosen = _select(ctx, names, active_only)
    if names:
        return chosen, ()
    retired = tuple(s.name for s in chosen if s.state == StampState.RETIRED)
    return [s for s in chosen if s.state != StampState.RETIRED], retired


def _survey(
    ctx: Context,
    found: History,
    chosen: Sequence[Stamp],
    target: str | None,
    per_server: int | None = None,
    *,
    fingerprints: bool = False,
) -> list[StampSchema]:
    """Read every stamp's revision at once (threads: plain queries, no Alembic), and its structure's
    fingerprint in the same session (`fingerprints`: the digest the stamp keeps while its catalog is
    unchanged, `cached_digest`), with at most `per_server` sessions on one server
    at a time (`each_stamp`)."""
    tenants = Counter(route.stamp for route in ctx.catalog.routes())

    def look(stamp: Stamp) -> StampSchema:
        digest = None
        try:
            with stamps.connect(stamp) as conn:
                current = read_revision(conn)
                if fingerprints:
                    digest = cached_digest(conn)
        except (MigratorError, psycopg.Error) as exc:
            error = str(exc) if isinstance(exc, MigratorError) else reason(exc, stamp.dsn)
            return StampSchema(stamp.name, stamp.state, tenants[stamp.name], None, target, (), UNREACHABLE, error)
        state, pending = found.classify(current, target)
        unknown = f"revision {current} is not in {found.location}" if state == UNKNOWN else None
        return StampSchema(
            stamp.name, stamp.state, tenants[stamp.name], current, target, pending, state, unknown, digest
        )

    return each_stamp(chosen, look, per_server)


def _needs_work(row: StampSchema, direction: str) -> bool:
    return row.state in (UNREACHABLE, UNKNOWN, BEHIND if direction == "upgrade" else AHEAD)


def _plan(
    ctx: Context,
    found: History,
    direction: str,
    target: str | None,
    chosen: list[Stamp],
    options: RolloutOptions,
    per_server: int | None = None,
    *,
    retired: tuple[str, ...] = (),
) -> Plan:
    """Validate everything, then order the work: canary alone, the rest by fewest tenants, in `--waves` or
    `parallel` a wave (`ripple.split`: the one place waves are decided, for local and queued rollouts)."""
    canary, parallel = options.canary, options.parallel
    if parallel < 1:
        raise BadInput(f"--parallel must be at least 1, got {parallel}")
    names = [s.name for s in chosen]
    if canary is not None and canary not in names:
        ctx.catalog.stamp(canary)  # unknown stamp: BadInput naming it
        raise BadInput(f"canary {canary} is not among this rollout's stamps (retired, or draining with --active-only?)")
    _refuse_fenced(ctx, names)
    rows = _survey(ctx, found, chosen, target, per_server)
    work = [r for r in rows if _needs_work(r, direction)]
    if canary is None:
        healthy = [r for r in work if r.state not in (UNREACHABLE, UNKNOWN)]
        pool = [r for r in healthy if r.stamp_state == StampState.ACTIVE] or healthy or work
        canary = min(pool, key=lambda r: (r.tenants, r.stamp)).stamp if pool else None
    elif canary not in {r.stamp for r in work}:
        canary = None  # already at the target: nothing left to prove on it
    rest = sorted((r for r in work if r.stamp != canary), key=lambda r: (r.tenants, r.stamp))
    waves: list[tuple[str, ...]] = [(canary,)] if canary else []
    waves += split([r.stamp for r in rest], options.waves, parallel)
    targets = {s.name: s for s in chosen}
    plan_id = str(uuid.uuid4())
    return Plan(plan_id, direction, target, tuple(rows), tuple(waves), canary, targets, retired, options.gate)


def _refuse_fenced(ctx: Context, names: list[str]) -> None:
    """A stamp that is source or target of a fenced move (cutover, or an offline copy) is refused."""
    blocked = fenced_moves(ctx, names)
    if blocked:
        raise BadInput("; ".join(blocked.values()))


def fenced_moves(ctx: Context, names: list[str]) -> dict[str, str]:
    """Stamp name -> why it is blocked, for the given stamps."""
    blocked: dict[str, str] = {}
    for move in ctx.catalog.fenced_moves(names):
        for name in (move.source, move.target):
            if name in names and name not in blocked:
                blocked[name] = (
                    f"stamp {name} has {move.mode} move {move.id} ({list_tenants(move.tenants)}, {move.source} -> "
                    f"{move.target}) in its fenced {move.phase} phase; change its schema after the move finishes or "
                    "is aborted"
                )
    return blocked


def _run(
    ctx: Context,
    found: History,
    plan: Plan,
    options: RolloutOptions,
    progress: Progress,
    confirm: Callable[[Plan], None] | None,
    stop: threading.Event | None = None,
) -> Rollout:
    dry_run = options.dry_run
    if confirm is not None and plan.waves and not dry_run:
        confirm(plan)
    log = RunLog(ctx.catalog, plan.run_id, plan.direction, plan.target)
    try:
        done = record_not_run(log, plan)
        if dry_run:
            ran = [_dry_run(log, found, plan, name) for wave in plan.waves for name in wave]
            return Rollout(plan.run_id, plan.direction, plan.target, plan.canary, True, (*ran, *done), None)
        outcomes, stopped, check = _waves(ctx, found, plan, log, options, progress, stop or threading.Event())
        interrupted = stopped is not None and stopped.startswith(STOPPED)
        outcomes_all = (*outcomes, *done)
        return Rollout(
            plan.run_id, plan.direction, plan.target, plan.canary, False, outcomes_all, stopped, interrupted, check
        )
    finally:
        log.close()


STOPPED = "stopped at a safe point"


def _waves(
    ctx: Context,
    found: History,
    plan: Plan,
    log: RunLog,
    options: RolloutOptions,
    progress: Progress,
    stop: threading.Event,
) -> tuple[list[StampOutcome], str | None, CheckRun | None]:
    outcomes: list[StampOutcome] = []
    stopped: str | None = None
    check: CheckRun | None = None
    wide = max((len(w) for w in plan.waves), default=0)
    progress.begin(sum(len(w) for w in plan.waves), "stamps")
    with Workers(min(options.parallel, wide)) as workers:
        for number, wave in enumerate(plan.waves):
            if stop.is_set() and not stopped:  # between two waves: every started step has ended
                stopped = f"{STOPPED} before {plan.wave_name(number)}"
            if stopped:
                why = f"not tried: {stopped}" + (f"; its last output: {check.output()}" if check else "")
                outcomes += [_not_run(log, plan.row(name), why) for name in wave]
                continue
            part = plan.wave_name(number)
            if part != "canary":
                part += f"/{len(plan.waves) - (1 if plan.canary else 0)}"  # wave 1/3
            progress.start(part, len(wave), unit="stamps")
            refused = fenced_moves(ctx, list(wave))  # a move may have reached its cutover meanwhile
            finished = [_refused(log, plan.row(n), number, refused[n]) for n in wave if n in refused]
            for outcome in finished:
                _finished(progress, part, outcome)
            row_ids = log.start([(n, plan.row(n).current) for n in wave if n not in refused], number)
            for done in workers.run([(_job(ctx, found, plan, n), plan.row(n).current) for n in row_ids]):
                if done.detail:
                    logger.info("stamp %s failed:\n%s", done.stamp, done.detail)
                outcome = _outcome(plan, number, done)
                log.finish(row_ids[done.stamp], outcome.from_revision, outcome.result, outcome.error)
                _finished(progress, part, outcome)
                finished.append(outcome)
            progress.finish(part)
            outcomes += sorted(finished, key=lambda o: o.stamp)
            failed = [o.stamp for o in finished if o.result == FAILED]
            canary = number == 0 and plan.canary is not None
            if failed and (canary or not options.continue_on_error):
                which = "the canary" if canary else plan.wave_name(number)
                stopped = f"stopped after {which} failed on {', '.join(failed)}"
            elif plan.gate and number + 1 < len(plan.waves):
                stopped, check = _gate(plan, number, progress, stop)
    return outcomes, stopped, check


def _gate(plan: Plan, number: int, progress: Progress, stop: threading.Event) -> tuple[str | None, CheckRun | None]:
    """After wave `number`, before the next: the bake, then the check. Returns why the rollout stops
    (None: go on) and the check that failed. A stop during either is a stop between two waves."""
    before = plan.wave_name(number + 1)
    if not plan.gate.bake(before, stop, progress.phase):
        return f"{STOPPED} before {before}", None
    if plan.gate.check is None:
        return None, None
    after = "the canary" if number == 0 and plan.canary else plan.wave_name(number)
    progress.phase(f"check after {after}: {plan.gate.check}")
    check = run_check(plan.gate.check, plan.check_env(number), stop, progress.phase)
    if check.exit_code is None:
        return f"{STOPPED} before {before}", None
    if check.passed:
        progress.phase(f"check after {after} passed in {check.seconds:.1f} s")
        return None, None
    logger.info("check after %s failed (%s); its last output:\n%s", after, check.status(), "\n".join(check.tail))
    return check.stopped(after), check


def _finished(progress: Progress, wave: str, outcome: StampOutcome) -> None:
    """Count a stamp of the wave as done; a failing one gets its own line."""
    progress.advance(wave, 1)
    if outcome.result == FAILED:
        progress.phase(f"{outcome.stamp}: {outcome.error}")


def _job(ctx: Context, found: History, plan: Plan, name: str) -> Job:
    return Job.of(ctx, plan.targets[name], str(found.location), plan.direction, plan.target or "base")


def _outcome(plan: Plan, wave: int, done: StepDone) -> StampOutcome:
    row = plan.row(done.stamp)
    return StampOutcome(
        done.stamp,
        wave,
        done.result,
        done.from_revision,
        plan.target,
        done.at_revision,
        row.pending,
        done.error,
        None,
        done.started_at,
        done.finished_at,
    )


def _not_run(log: RunLog, row: StampSchema, why: str | None = None) -> StampOutcome:
    """A stamp with nothing to do (or left out after a failure): recorded as skipped."""
    if why is None:
        why = {
            UP_TO_DATE: None,
            AHEAD: f"already past {row.target}; use `migrator schema downgrade` to go back",
            BEHIND: f"below {row.target or 'base'} already",
        }.get(row.state)
    outcome = StampOutcome(row.stamp, None, SKIPPED, row.current, row.target, row.current, (), why)
    log.add(outcome.stamp, outcome.from_revision, outcome.result, outcome.error)
    return outcome


def _refused(log: RunLog, row: StampSchema, wave: int, why: str) -> StampOutcome:
    outcome = StampOutcome(row.stamp, wave, FAILED, row.current, row.target, row.current, row.pending, why)
    log.add(outcome.stamp, outcome.from_revision, outcome.result, outcome.error, wave)
    return outcome


def _dry_run(log: RunLog, found: History, plan: Plan, name: str) -> StampOutcome:
    """Pending revisions and their SQL, rendered by the stamp's env.py in offline mode with the stamp's
    URL minus its password; unreachable or unknown stamps, or an env.py that fails, fail here as for real.
    The outcome names the wave the stamp would run in."""
    row, stamp, wave = plan.row(name), plan.targets[name], plan.wave_of(name)
    outcome = StampOutcome(row.stamp, wave, FAILED, row.current, row.target, row.current, (), row.error)
    if row.state not in (UNREACHABLE, UNKNOWN):
        try:
            with ALEMBIC_IN_PROCESS:
                url = dsnlib.sqlalchemy_url(stamp.dsn, with_password=False)
                text = found.offline_sql(row.current, row.target, log.direction, url)
        except Exception as exc:  # the user's env.py or revisions: one line, the traceback for -v
            logger.info("dry run of stamp %s failed:\n%s", row.stamp, trace(exc, stamp.dsn))
            outcome = replace(outcome, error=f"{log.direction} --dry-run failed: {reason(exc, stamp.dsn)}")
        else:
            outcome = replace(outcome, result=DRY_RUN, pending=row.pending, sql=text)
    log.add(outcome.stamp, outcome.from_revision, outcome.result, outcome.error, wave)
    return outcome
