"""Fleet schema commands: status (drift), diff (structures), upgrade (canary, then waves), downgrade, history, log."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from migrator.cli import render
from migrator.cli.base import JSON, RIPPLE, RUN_FLAGS, Queued, cli, confirm, context_of, emit, engine_option, queued
from migrator.errors import BadInput, MigratorError, SchemaDrift

if TYPE_CHECKING:  # the engine is imported when a command runs, which keeps `migrator --help` fast
    from migrator.rollout.runner import RolloutOptions


def _rollout_defaults() -> RolloutOptions:
    from migrator.rollout.runner import RolloutOptions

    return RolloutOptions()


@cli.group("schema")
def schema_group() -> None:
    """One Alembic history applied uniformly to every stamp: drift, rollouts, their log."""


@schema_group.command("status")
@click.option(
    "--active-only", is_flag=True, help="Only active stamps (draining and retired ones are shown by default)."
)
@engine_option(
    "--connections-per-server",
    lambda: _rollout_defaults().connections_per_server,
    "At most this many sessions on one database server at once.",
)
@JSON
@click.pass_context
def schema_status_cmd(ctx: click.Context, active_only: bool, connections_per_server: int, as_json: bool) -> None:
    """Each stamp's revision against head and its structure's fingerprint; exit 3 when an active stamp drifts
    (behind, ahead, unknown, unreachable, or a fingerprint other than the majority's at its revision)."""
    from migrator.catalog import StampState
    from migrator.rollout.drift import fleet_status

    status = fleet_status(context_of(ctx), active_only, connections_per_server)
    rows, short = status.stamps, status.short
    drifting = [r for r in rows if r.drift]
    gating = [r for r in drifting if r.stamp_state == StampState.ACTIVE]
    head = rows[0].target if rows else None
    if drifting:
        names = ", ".join(f"{r.stamp} ({_drift_note(r, short)})" for r in drifting)
        summary = f"{len(drifting)} of {len(rows)} stamps drift from head {head}: {names}"
    else:
        summary = f"all {len(rows)} stamps at head {head}"
    text = render.table(
        ["", "stamp", "state", "tenants", "revision", "fingerprint", "head", "pending", "status", "error"],
        [
            [
                "!!" if r.drift else "",
                r.stamp,
                r.stamp_state,
                r.tenants,
                r.current or "-",
                r.fingerprint[:short] if r.fingerprint else "-",
                r.target,
                len(r.pending) if r.state in ("behind", "ahead") else "",
                _status_cell(r),
                r.error,
            ]
            for r in rows
        ],
    )
    lines = [text, summary, *_structure_lines(status.structures, short)]
    if any(r.odd for r in rows):
        lines.append("`migrator schema diff --fleet` shows how each drifted group differs from the majority")
    data = {
        "head": head,
        "drift": bool(gating),
        "stamps": [{**_fields(r), "drift": r.drift} for r in rows],
        "structures": [
            {
                "revision": s.revision,
                "fingerprint": s.digest,
                "count": len(s.stamps),
                "stamps": list(s.stamps),
                "majority": s.majority,
            }
            for s in status.structures
        ],
    }
    emit(as_json, data, "\n".join(lines))
    if gating:
        raise SchemaDrift()


@schema_group.command("diff")
@click.argument("names", metavar="[STAMP_A STAMP_B]", nargs=-1)
@click.option("--fleet", is_flag=True, help="Each minority group of stamps against its revision's majority.")
@click.option("--active-only", is_flag=True, help="With --fleet: only active stamps.")
@engine_option(
    "--connections-per-server",
    lambda: _rollout_defaults().connections_per_server,
    "With --fleet: at most this many sessions on one database server at once.",
)
@JSON
@click.pass_context
def schema_diff_cmd(
    ctx: click.Context,
    names: tuple[str, ...],
    fleet: bool,
    active_only: bool,
    connections_per_server: int,
    as_json: bool,
) -> None:
    """The structural differences of two stamps, object by object with the DDL of each side; exit 3 when
    they differ. With --fleet, each drifted group against the majority of its revision."""
    from migrator.rollout.drift import diff_fleet, diff_stamps

    if fleet and names:
        raise BadInput("give two stamps, or --fleet, not both")
    if not fleet and len(names) != 2:
        raise BadInput("give two stamps to compare (`migrator schema diff STAMP_A STAMP_B`), or --fleet")
    if fleet:
        groups = diff_fleet(context_of(ctx), active_only, connections_per_server)
        blocks = [_group_text(g) for g in groups] or ["every revision's stamps share one fingerprint"]
        emit(as_json, groups, "\n".join(blocks))
        if groups:
            raise SchemaDrift()
        return
    found = diff_stamps(context_of(ctx), names[0], names[1])
    emit(as_json, {**_fields(found), "lines": found.lines()}, _diff_text(found))
    if found.differences:
        raise SchemaDrift()


@schema_group.command("upgrade")
@click.argument("revision", default="head")
@click.option(
    "--canary", default=None, help="Stamp to upgrade first, alone (default: the active one with fewest tenants)."
)
@engine_option("--parallel", lambda: _rollout_defaults().parallel, "Stamps upgraded at once per wave.")
@click.option(
    "--continue-on-error",
    is_flag=True,
    help="Keep going with later waves when a stamp fails (a failing canary still stops the rollout).",
)
@click.option("--dry-run", is_flag=True, help="Print each stamp's pending revisions and their SQL; change nothing.")
@click.option("--active-only", is_flag=True, help="Leave draining and retired stamps out.")
@RIPPLE
@queued(
    "one step per stamp, wave by wave (the canary's first; without --waves the others are one wave, and "
    "--parallel does not apply)",
    "follow the rollout until every stamp has run.",
    "--wait follows a queued rollout: add --queue",
)
@engine_option(
    "--connections-per-server",
    lambda: _rollout_defaults().connections_per_server,
    "With --queue: at most this many sessions on one database server at once (workers and planning).",
)
@RUN_FLAGS
@click.pass_context
def schema_upgrade_cmd(
    ctx: click.Context,
    revision: str,
    canary: str | None,
    parallel: int,
    continue_on_error: bool,
    dry_run: bool,
    active_only: bool,
    waves: Any,
    bake_s: float,
    check: str | None,
    queue: Queued | None,
    connections_per_server: int,
    yes: bool,
    no_progress: bool,
    as_json: bool,
) -> None:
    """Upgrade every stamp to REVISION (default head): the canary first, then waves of --parallel stamps
    (or --waves), with --bake and --check between two waves."""
    from migrator.rollout.runner import RolloutOptions, upgrade_fleet

    options = RolloutOptions(
        revision, canary, parallel, continue_on_error, dry_run, active_only, connections_per_server, waves, bake_s,
        check,
    )  # fmt: skip
    again = _again(f"migrator schema upgrade {revision}", options)
    if queue is not None and not dry_run:
        _queued_upgrade(context_of(ctx), options, queue, None if yes else _confirm, as_json)
        return

    from migrator.interrupts import stop_on_signals

    # Ctrl-C, SIGTERM: the running wave's steps end, no more wave starts
    with stop_on_signals() as stop, render.progress(not (as_json or no_progress), "stamps") as progress:
        rollout = upgrade_fleet(context_of(ctx), options, progress, None if yes else _confirm, stop.event)
    _report(rollout, as_json, stop, again, options.gate)


def _again(command: str, options: Any) -> str:
    """The command that resumes a stopped rollout: the same one, with the flags that shape what is left
    (the stamps done are at the target then, and a new canary is chosen among the rest)."""
    import shlex

    from migrator.rollout.ripple import format_duration

    parts = [command]
    parts += ["--active-only"] if options.active_only else []
    parts += ["--continue-on-error"] if options.continue_on_error else []
    parts += [f"--waves {options.waves}"] if options.waves is not None else []
    parts += [f"--bake {format_duration(options.bake_s)}"] if options.bake_s else []
    parts += [f"--check {shlex.quote(options.check)}"] if options.check is not None else []
    return " ".join(parts)


def _queued_upgrade(context: Any, options: Any, queue: Queued, confirm: Any, as_json: bool) -> None:
    from migrator.catalog import StepResult
    from migrator.queue.enqueue import enqueue_upgrade
    from migrator.queue.follow import follow_rollout
    from migrator.rollout.ripple import CHECK_FAILED

    queued = enqueue_upgrade(context, options, queue.name, confirm)
    first = f"canary {queued.canary} first" if queued.canary else "no canary"
    sizes = queued.waves[1:] if queued.canary else queued.waves
    if sizes:
        first += f", then {len(sizes)} wave(s) of {', '.join(map(str, sizes))} stamp(s)"
    if options.gate and len(queued.waves) > 1:
        first += f"; between waves: {options.gate.describe()}"
    render.say(
        f"rollout {queued.run_id} to {queued.target}: {queued.steps} stamp(s) queued on {queue.name} ({first}), "
        f"{queued.skipped} with nothing to do"
    )
    if not queued.workers:
        render.say("no worker is running: the stamps wait until one starts (`migrator worker`)")
    data: dict[str, Any] = {"run_id": queued.run_id, "target": queued.target, "canary": queued.canary}
    if not queue.wait:
        emit(
            as_json, {**data, "queued": queued.steps}, f"queued rollout {queued.run_id}; `migrator schema log` shows it"
        )
        return
    rows = follow_rollout(context, queued.run_id, render.say)
    shown = (StepResult.OK, StepResult.FAILED, StepResult.SKIPPED)
    counts = {r: sum(1 for _, result, _ in rows if result == r) for r in shown}
    data["stamps"] = [{"stamp": s, "result": r, "error": e} for s, r, e in rows]
    emit(as_json, data, f"rollout {queued.run_id}: " + ", ".join(f"{n} {r}" for r, n in counts.items()))
    gated = next((e for _, r, e in rows if r == StepResult.SKIPPED and CHECK_FAILED in (e or "")), None)
    if gated is not None:
        left = [s for s, r, e in rows if r == StepResult.SKIPPED and e == gated]
        why = gated.removeprefix("not tried: ")
        raise MigratorError(
            f"rollout {queued.run_id} {why}; {len(left)} stamp(s) not tried ({', '.join(left)}), left untouched; "
            f"resume: `{_again(f'migrator schema upgrade {options.revision}', options)} --queue {queue.name}`"
        )
    if counts[StepResult.FAILED]:
        raise MigratorError(f"{counts[StepResult.FAILED]} stamp(s) failed; `migrator schema log` shows why")


@schema_group.command("downgrade")
@click.argument("revision")
@click.option("--stamp", "names", multiple=True, help="A stamp to downgrade (repeatable; default: every stamp).")
@engine_option("--parallel", lambda: _rollout_defaults().parallel, "Stamps downgraded at once per wave.")
@RIPPLE
@RUN_FLAGS
@click.pass_context
def schema_downgrade_cmd(
    ctx: click.Context,
    revision: str,
    names: tuple[str, ...],
    parallel: int,
    waves: Any,
    bake_s: float,
    check: str | None,
    yes: bool,
    no_progress: bool,
    as_json: bool,
) -> None:
    """Downgrade stamps to REVISION (or base), canary first, with the same waves, gate, locks and log as upgrade."""
    from migrator.interrupts import stop_on_signals
    from migrator.rollout.runner import RolloutOptions, downgrade_stamps

    options = RolloutOptions(revision, parallel=parallel, waves=waves, bake_s=bake_s, check=check)
    with stop_on_signals() as stop, render.progress(not (as_json or no_progress), "stamps") as progress:
        rollout = downgrade_stamps(
            context_of(ctx), revision, names, options, progress, None if yes else _confirm, stop.event
        )
    again = _again(" ".join(["migrator schema downgrade", revision, *(f"--stamp {name}" for name in names)]), options)
    _report(rollout, as_json, stop, again, options.gate)


@schema_group.command("history")
@JSON
@click.pass_context
def schema_history_cmd(ctx: click.Context, as_json: bool) -> None:
    """The stamps' revisions with their messages, newest first; head marked."""
    from migrator.rollout.runner import history

    revisions = history(context_of(ctx))
    emit(
        as_json,
        revisions,
        render.table(
            ["", "revision", "revises", "message"],
            [["head" if r.is_head else "", r.revision, r.down_revision or "-", r.message] for r in revisions],
        ),
    )


@schema_group.command("log")
@click.option("--stamp", default=None, help="Only runs on this stamp.")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True, help="How many runs to show.")
@JSON
@click.pass_context
def schema_log_cmd(ctx: click.Context, stamp: str | None, limit: int, as_json: bool) -> None:
    """Recorded schema runs per stamp, newest first: who, when, from/to, result, error."""
    from migrator.rollout.runner import runs

    found = runs(context_of(ctx).catalog, stamp, limit)
    emit(
        as_json,
        found,
        render.table(
            ["started", "run", "stamp", "direction", "from", "to", "result", "operator", "error"],
            [
                [
                    f"{r.started_at:%Y-%m-%d %H:%M:%S}",
                    r.run_id[:8],
                    r.stamp,
                    r.direction,
                    r.from_revision or "-",
                    r.to_revision or "base",
                    r.result,
                    r.operator,
                    _short(r.error),
                ]
                for r in found
            ],
        ),
    )


# -- presentation ---------------------------------------------------------------------------------


def _fields(value: Any) -> dict[str, Any]:
    return {name: getattr(value, name) for name in value.__dataclass_fields__}


def _drift_note(row: Any, short: int) -> str:
    """Why a stamp drifts: `behind 2`, `fingerprint ×9c0e`, or both."""
    parts = []
    if row.state != "up to date":
        parts.append(f"{row.state}{f' {len(row.pending)}' if row.pending else ''}")
    if row.odd:
        parts.append(f"fingerprint ×{row.fingerprint[:short]}")
    return ", ".join(parts)


def _status_cell(row: Any) -> str:
    if not row.drift:
        return str(row.state)
    if not row.odd:
        return str(row.state).upper()
    return "DRIFTED" if row.state == "up to date" else f"{str(row.state).upper()}, DRIFTED"


def _structure_lines(structures: Any, short: int) -> list[str]:
    """`412 stamps at 0042, 3 fingerprints: 409 ×a1f3, 2 ×9c0e, 1 ×77b2`, one line per revision."""
    by_revision: dict[str | None, list[Any]] = {}
    for structure in structures:
        by_revision.setdefault(structure.revision, []).append(structure)
    lines = []
    for revision, found in by_revision.items():
        count = sum(len(s.stamps) for s in found)
        groups = ", ".join(f"{len(s.stamps)} ×{s.digest[:short]}" for s in found)
        majority = "" if len(found) == 1 or found[0].majority else " (no majority: every group drifts)"
        lines.append(
            f"{count} stamp{'s' * (count != 1)} at {revision or 'no revision'}, {len(found)} "
            f"fingerprint{'s' * (len(found) != 1)}: {groups}{majority}"
        )
    return lines


def _diff_text(found: Any) -> str:
    revisions = ""
    if found.our_revision != found.their_revision:
        revisions = (
            f" ({found.ours} is at {found.our_revision or 'no revision'}, {found.theirs} at "
            f"{found.their_revision or 'no revision'}: the revisions between them differ too)"
        )
    if not found.differences:
        return f"{found.ours} and {found.theirs} have the same structure{revisions}"
    count = len(found.differences)
    head = f"{found.ours} and {found.theirs} differ in {count} object{'s' * (count != 1)}{revisions}:"
    return "\n".join([head, *(f"  {line}" for line in found.lines())])


def _group_text(group: Any) -> str:
    minority, majority = group.minority, group.majority
    lead = "the majority" if majority.majority else "the largest group (no majority)"
    head = (
        f"at {group.revision or 'no revision'}: {', '.join(minority.stamps)} (×{minority.digest}) against {lead} "
        f"×{majority.digest} of {len(majority.stamps)} stamp(s), compared as {group.diff.ours} and {group.diff.theirs}:"
    )
    return "\n".join([head, *(f"  {line}" for line in group.diff.lines())])


def _short(text: str | None, width: int = 100) -> str:
    if not text:
        return ""
    return text if len(text) <= width else text[: width - 1] + "…"


def _confirm(plan: Any) -> None:
    """Show what will run and ask; declining aborts before any stamp is touched."""
    if not plan.waves:
        return
    target = plan.target or "base"
    stamps = sum(len(w) for w in plan.waves)
    lead = f"canary {plan.canary}, then " if plan.canary else ""
    rest = len(plan.waves) - (1 if plan.canary else 0)
    click.echo(f"{plan.direction} {stamps} stamp(s) to {target}: {lead}{rest} wave(s)", err=True)
    for number, wave in enumerate(plan.waves):
        click.echo(f"  {plan.wave_name(number)}: {', '.join(wave)}", err=True)
    if plan.gate and len(plan.waves) > 1:
        click.echo(f"  between two waves: {plan.gate.describe()}", err=True)
    if plan.retired:
        click.echo(f"  skipped (retired): {', '.join(plan.retired)}", err=True)
    confirm(f"{plan.direction.capitalize()} {stamps} stamp(s) to {target}?")


def _report(rollout: Any, as_json: bool, stop: Any = None, again: str = "", gate: Any = None) -> None:
    """The final table, then exit 1 naming the failed stamps (after rendering, like `verify`) or the check
    that failed, or, after a stop (Ctrl-C, SIGTERM), the line saying where it stopped; both with the
    command (`again`) that goes on."""
    from migrator.interrupts import Stopped
    from migrator.rollout.runner import RolloutFailed, wave_name

    data = {
        "run_id": rollout.run_id,
        "direction": rollout.direction,
        "target": rollout.target,
        "canary": rollout.canary,
        "dry_run": rollout.dry_run,
        "stopped": rollout.stopped,
        "stamps": [_fields(o) for o in rollout.outcomes],
    }
    table = render.table(
        ["stamp", "wave", "from", "to", "now at", "result", "error"],
        [
            [
                o.stamp,
                "" if o.wave is None else wave_name(o.wave, rollout.canary is not None),
                o.from_revision or "-",
                o.to_revision or "base",
                o.at_revision or "-",
                o.result,
                _short(o.error, 160),
            ]
            for o in rollout.outcomes
        ],
    )
    parts = [_dry_run_text(rollout, gate)] if rollout.dry_run else []
    emit(as_json, data, "\n".join([*parts, table, rollout.summary()]))
    if rollout.interrupted and stop is not None and stop.asked:
        ran = sum(1 for o in rollout.outcomes if o.wave is not None)
        left = [o.stamp for o in rollout.outcomes if (o.error or "").startswith("not tried")]
        raise Stopped(
            f"schema {rollout.direction} stopped by {stop.name} {rollout.stopped.removeprefix('stopped ')}: "
            f"{ran} stamp(s) ran their step, {len(left)} not tried ({', '.join(left)}); left in place: no lock and "
            f"no half-applied revision (each started step ran to its end); resume: `{again}`",
            stop.exit_code,
        )
    if rollout.check is not None:
        left = [o.stamp for o in rollout.outcomes if (o.error or "").startswith("not tried")]
        raise RolloutFailed(
            f"schema {rollout.direction} {rollout.stopped} after {rollout.check.seconds:.1f} s; its last output: "
            f"{rollout.check.output(10)}; {len(left)} stamp(s) not tried ({', '.join(left)}), left untouched; "
            f"resume: `{again}`"
        )
    if rollout.failed:
        raise RolloutFailed("")  # exit 1; the summary above names the failures, once


def _dry_run_text(rollout: Any, gate: Any) -> str:
    """The waves, then pending revisions and SQL, once per script (stamps at the same revision usually
    share it)."""
    from migrator.rollout.runner import wave_name

    groups: dict[tuple[str | None, str], list[Any]] = {}
    for outcome in rollout.outcomes:
        if outcome.sql is not None:
            groups.setdefault((outcome.from_revision, outcome.sql), []).append(outcome)
    blocks = []
    for (start, _), outcomes in groups.items():
        names = ", ".join(sorted(o.stamp for o in outcomes))
        pending = ", ".join(outcomes[0].pending)
        blocks.append(f"-- {names}: {start or 'base'} -> {rollout.target} (pending: {pending})\n{outcomes[0].sql}")
    if not blocks:
        return "-- nothing to do"
    waves: dict[int, list[str]] = {}
    for outcome in rollout.outcomes:
        if outcome.wave is not None:
            waves.setdefault(outcome.wave, []).append(outcome.stamp)
    lines = [f"-- {wave_name(n, rollout.canary is not None)}: {', '.join(names)}" for n, names in sorted(waves.items())]
    if gate and len(waves) > 1:
        lines.append(f"-- between two waves: {gate.describe()}")
    return "\n".join([*lines, *blocks])
