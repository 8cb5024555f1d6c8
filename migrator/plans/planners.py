"""Plans: which tenants to move where, written to a YAML file an operator reviews before `apply`.

Like `terraform plan`, planning only reads: it measures the fleet (see `migrator.sizes`), places
tenants and writes a file; nothing moves until `migrator apply FILE`. Three planners share one
format: `drain` empties a stamp, `rebalance` evens out utilisation, `isolate` gives one heavy
tenant a dedicated stamp. The file format (`to_yaml`, `parse_plan`) lives here too, so what is
written and what is accepted are defined in one place; plans/README.md shows an example.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import yaml

from migrator.catalog import Catalog, Stamp, StampState, name_tenants, policy
from migrator.context import Context
from migrator.db import dsn as dsnlib
from migrator.errors import BadInput
from migrator.move import shapes
from migrator.plans.capacity import FleetSizes, StampUsage, measure_fleet, shift
from migrator.stamps import keyspace
from migrator.stamps.discovery import problems_message
from migrator.stamps.keyspace import Blocked
from migrator.stamps.sizes import TenantSize, human_bytes

VERSION = 1
KINDS = ("drain", "rebalance", "isolate")
_EPSILON = 1e-9


@dataclass(frozen=True)
class Cohorts:
    """How planners group small tenants into cohorts (flags --cohort-rows, --cohort-tenants).

    A cohort moves as one unit (one move, one freeze, one flip); grouping small tenants saves each
    of them a move's fixed cost (about 1 to 2 s). A tenant of `rows` or more moves alone.
    """

    rows: int = 50_000
    tenants: int = 100


@dataclass(frozen=True)
class PlannedMove:
    """One entry of `moves:`, a cohort of one or more tenants; `line` is where it sits in the file."""

    tenants: tuple[str, ...]
    source: str
    target: str
    rows: int
    bytes: int
    line: int = field(default=0, compare=False)
    queue: str | None = None  # `apply --queue`: the workers' queue of this entry (its target's region, say)

    @property
    def who(self) -> str:
        return name_tenants(self.tenants)


@dataclass(frozen=True)
class Utilisation:
    """A stamp before and after the plan: rows used / capacity_rows (None without capacity), and sizes."""

    before: float | None
    after: float | None
    rows_before: int | None = None
    rows_after: int | None = None
    bytes_before: int | None = None
    bytes_after: int | None = None


@dataclass(frozen=True)
class Plan:
    kind: str
    created: str
    catalog: str
    fleet_schema_revision: str | None
    reason: str
    utilisation: dict[str, Utilisation]
    moves: tuple[PlannedMove, ...]
    threshold: float | None = None
    notes: tuple[str, ...] = ()
    version: int = VERSION

    @property
    def rows(self) -> int:
        return sum(m.rows for m in self.moves)


# -- planners ---------------------------------------------------------------------------------------------


# While placing tenants, each stamp's usage as the moves planned so far leave it, by stamp name.
Rooms = dict[str, StampUsage]


def _fits(room: StampUsage, tenant: TenantSize) -> bool:
    return room.fits(tenant.rows, tenant.bytes)


def _shortfall(room: StampUsage, tenant: TenantSize) -> str:
    short = " and ".join(f"{o.short:,} {o.unit}" for o in room.shifted(tenant.rows, tenant.bytes).overruns())
    return f"{room.stamp.name} is {short} short"


def _largest_first(tenants: list[TenantSize]) -> list[TenantSize]:
    return sorted(tenants, key=lambda t: (-t.rows, -t.bytes, len(t.tenant), t.tenant))


def _active(catalog: Catalog, names: list[str] | None, exclude: str) -> list[Stamp]:
    """Active stamps that may receive tenants: all of them, or only `names` (flag --to)."""
    if names is None:
        return [s for s in catalog.stamps() if s.state == StampState.ACTIVE and s.name != exclude]
    chosen = []
    for name in dict.fromkeys(names):
        stamp = catalog.stamp(name)
        if stamp.name == exclude:
            raise BadInput(f"--to lists {name}, the stamp being drained")
        if stamp.state != StampState.ACTIVE:
            raise BadInput(f"--to lists {name}, which is {stamp.state}; only active stamps receive tenants")
        chosen.append(stamp)
    return chosen


def plan_drain(
    ctx: Context,
    stamp_name: str,
    to: list[str] | None = None,
    cohorts: Cohorts | None = None,
    by_region: bool = False,
) -> Plan:
    """`migrator plan drain`: every tenant routed to the stamp, largest first, onto the roomiest stamp
    the placement policy allows it; then the small tenants going to one stamp are grouped into cohorts.
    A tenant with room only on stamps the policy forbids is refused, naming them: never placed there."""
    catalog = ctx.catalog
    source = catalog.stamp(stamp_name)
    targets = _active(catalog, to, source.name)
    if not targets:
        raise BadInput(f"no active stamp to drain {source.name} onto")
    sizes = measure_fleet(ctx, [source, *targets])
    tenants = _largest_first(sizes.routed_to(source.name))
    if not tenants:
        raise BadInput(f"stamp {source.name} has no tenant routed to it; nothing to drain")
    blocked = _colliding(ctx, [source, *targets])
    _refuse_colliding_everywhere(source.name, [t.tenant for t in tenants], [s.name for s in targets], blocked)
    rooms = dict(sizes.usage)
    layout = policy.load_layout(catalog)
    moves = []
    for tenant in tenants:
        forbidden = {s.name: found for s in targets if (found := layout.violations([tenant.tenant], s.name))}
        allowed = [s for s in targets if s.name not in blocked.get(tenant.tenant, {}) and s.name not in forbidden]
        fitting = [rooms[s.name] for s in allowed if _fits(rooms[s.name], tenant)]
        if not fitting:
            short = [_shortfall(rooms[s.name], tenant) for s in targets if s.name not in forbidden]
            refused = [line for found in forbidden.values() for line in found]
            raise BadInput(
                f"cannot drain {source.name}: tenant {tenant.tenant} ({tenant.rows:,} rows, "
                f"{human_bytes(tenant.bytes)}) fits on no stamp the placement policy allows: "
                f"{'; '.join([*short, *(f'policy forbids {line}' for line in refused)])}; add capacity or stamps "
                "it may live on"
            )
        room = max(fitting, key=lambda r: (r.free_rows, r.free_bytes, -r.rows))
        moves.append(_shift(rooms, source.name, room.stamp.name, tenant))
        layout.place([tenant.tenant], source.name, room.stamp.name)
    moves = group(moves, cohorts or Cohorts(), layout.residency_key)
    notes: tuple[str, ...] = ()
    if source.state == StampState.ACTIVE:
        notes = (
            f"{source.name} is still active: `migrator stamp set-state {source.name} draining` keeps new "
            "tenants off it while the plan runs",
        )
    reason = (
        f"drain {source.name} ({source.state}) onto {', '.join(sorted({m.target for m in moves}))}: "
        f"{sum(len(m.tenants) for m in moves)} tenants in {len(moves)} moves, {sum(m.rows for m in moves):,} rows, "
        "largest first"
    )
    return _plan(ctx, sizes, rooms, moves, _Why("drain", reason, notes=notes), by_region)


def _colliding(ctx: Context, chosen: list[Stamp]) -> Blocked:
    """Per tenant, the stamps among `chosen` where its sequence-backed ids are taken (`keys check`)."""
    return keyspace.check(ctx, chosen=chosen).blocked()


def _refuse_colliding_everywhere(source: str, tenants: list[str], targets: list[str], blocked: Blocked) -> None:
    """Refuse, before anything is written, a plan with a tenant whose ids collide on every target."""
    stuck = [t for t in tenants if targets and all(name in blocked.get(t, {}) for name in targets)]
    if not stuck:
        return
    named = "; ".join(
        f"tenant {t} ({', '.join(f'on {name}: {keyspace.describe(blocked[t][name])}' for name in targets)})"
        for t in stuck
    )
    raise BadInput(
        f"cannot place {len(stuck)} tenants of {source}: their ids collide with other tenants' on every "
        f"target: {named}; see `migrator keys check`, and `migrator keys stride` so new ids never collide"
    )


def plan_isolate(ctx: Context, tenant: str, target_name: str, by_region: bool = False) -> Plan:
    """`migrator plan isolate`: a one-move plan giving a (heavy) tenant a stamp of its own."""
    catalog = ctx.catalog
    route = catalog.route(tenant)
    target = catalog.stamp(target_name)
    if target.name == route.stamp:
        raise BadInput(f"tenant {tenant} already lives on {target.name}")
    if target.state != StampState.ACTIVE:
        raise BadInput(f"stamp {target.name} is {target.state}; only active stamps receive tenants")
    refused = policy.check(catalog, [tenant], target.name)
    if refused:
        raise BadInput(
            f"cannot isolate tenant {tenant} on {target.name}: the placement policy forbids {'; '.join(refused)}"
        )
    neighbours = catalog.routes(target.name)
    if neighbours:
        names = ", ".join(r.tenant for r in neighbours[:5]) + (", ..." if len(neighbours) > 5 else "")
        raise BadInput(
            f"stamp {target.name} already holds {len(neighbours)} tenant(s) ({names}); isolate needs an empty stamp"
        )
    sizes = measure_fleet(ctx, [catalog.stamp(route.stamp), target])
    if tenant not in sizes.tenants:
        raise BadInput(f"tenant {tenant} has no rows on its stamp {route.stamp}")
    size = sizes.tenants[tenant]
    rooms = dict(sizes.usage)
    if not _fits(rooms[target.name], size):
        raise BadInput(
            f"cannot isolate tenant {tenant} ({size.rows:,} rows, {human_bytes(size.bytes)}) on "
            f"{target.name}: {_shortfall(rooms[target.name], size)}"
        )
    move = _shift(rooms, route.stamp, target.name, size)
    reason = f"isolate tenant {tenant} ({size.rows:,} rows) from {route.stamp} on the dedicated stamp {target.name}"
    return _plan(ctx, sizes, rooms, [move], _Why("isolate", reason), by_region)


def plan_rebalance(
    ctx: Context,
    threshold: float = 0.1,
    max_moves: int | None = None,
    cohorts: Cohorts | None = None,
    by_region: bool = False,
) -> Plan:
    """`migrator plan rebalance`: greedy moves until every active stamp is within `threshold` of the mean.

    The mean is the fleet's utilisation as a whole (rows used / capacity over all active stamps): it
    does not change as tenants move, so it is a fixed target. Each step moves the tenant of the most
    over-utilised stamp that best closes its gap with the least utilised one; a tenant moves once.
    The small tenants going from one stamp to another are then grouped into cohorts.
    """
    active = [s for s in ctx.catalog.stamps() if s.state == StampState.ACTIVE]
    missing = [s.name for s in active if s.capacity_rows is None]
    if missing:
        raise BadInput(
            f"rebalance needs capacity_rows on every active stamp; missing on {', '.join(missing)} "
            "(set it with `migrator stamp update NAME --capacity-rows N`)"
        )
    if len(active) < 2:
        raise BadInput("rebalance needs at least two active stamps")
    sizes = measure_fleet(ctx, active)
    blocked = _colliding(ctx, active)
    rooms = dict(sizes.usage)
    layout = policy.load_layout(ctx.catalog)
    mean = sum(r.rows for r in rooms.values()) / sum(s.capacity_rows or 0 for s in active)
    moves: list[PlannedMove] = []
    moved: set[str] = set()
    notes: list[str] = []
    while not _balanced(rooms, mean, threshold):
        if max_moves is not None and len(moves) >= max_moves:
            notes.append(f"stopped at --max-moves {max_moves}")
            break
        step = _best_step(rooms, sizes, moved, mean, blocked, layout)
        if step is None:
            notes.append("no remaining single move of an unmoved tenant the placement policy allows narrows the gap")
            break
        tenant, source, target = step
        moves.append(_shift(rooms, source, target, tenant))
        layout.place([tenant.tenant], source, target)
        moved.add(tenant.tenant)
    if not _balanced(rooms, mean, threshold):
        worst = max(rooms.values(), key=lambda r: abs((r.utilisation or 0) - mean))
        notes.insert(
            0,
            f"threshold {threshold} NOT reached: {worst.stamp.name} ends at {worst.utilisation:.4f} "
            f"against the mean {mean:.4f}",
        )
    if blocked:
        notes.append(
            f"{len(blocked)} tenants have ids other tenants hold on some stamps; they were only placed where "
            "they do not collide (`migrator keys check`)"
        )
    tenants = len(moves)
    moves = group(moves, cohorts or Cohorts(), layout.residency_key)
    reason = (
        f"rebalance {len(active)} active stamps to within {threshold} of the fleet's utilisation "
        f"{mean:.4f} (rows used / capacity_rows): {tenants} tenants in {len(moves)} moves"
    )
    return _plan(ctx, sizes, rooms, moves, _Why("rebalance", reason, threshold, tuple(notes)), by_region)


def _balanced(rooms: Rooms, mean: float, threshold: float) -> bool:
    return all(abs((r.utilisation or 0) - mean) <= threshold + _EPSILON for r in rooms.values())


def _best_step(
    rooms: Rooms, sizes: FleetSizes, moved: set[str], mean: float, blocked: Blocked, layout: policy.Layout
) -> tuple[TenantSize, str, str] | None:
    """The most over- and least utilised pair (then the next pairs) and the tenant that best evens them,
    among the tenants whose ids do not collide on that stamp and whom the placement policy allows there
    (as the steps before leave the fleet: a dedicated stamp never gets a second tenant)."""
    order = sorted(rooms.values(), key=lambda r: (-(r.utilisation or 0), r.stamp.name))
    over = [r for r in order if (r.utilisation or 0) > mean + _EPSILON]
    under = [r for r in reversed(order) if (r.utilisation or 0) < mean - _EPSILON]
    for src in over:
        candidates = [t for t in sizes.routed_to(src.stamp.name) if t.tenant not in moved]
        for dst in under:
            now = max(abs((src.utilisation or 0) - mean), abs((dst.utilisation or 0) - mean))
            allowed = [
                t
                for t in candidates
                if dst.stamp.name not in blocked.get(t.tenant, {}) and not layout.violations([t.tenant], dst.stamp.name)
            ]
            gaps = {t.tenant: _gap_after(src, dst, t, mean) for t in allowed if _fits(dst, t)}
            fitting = [t for t in candidates if t.tenant in gaps and gaps[t.tenant] < now - _EPSILON]
            if fitting:
                best = min(fitting, key=lambda t: (gaps[t.tenant], -t.rows, t.tenant))
                return best, src.stamp.name, dst.stamp.name
    return None


def _gap_after(src: StampUsage, dst: StampUsage, tenant: TenantSize, mean: float) -> float:
    """How far from the mean the farther of the two stamps would be after moving `tenant`."""
    after_src = src.shifted(-tenant.rows, -tenant.bytes).utilisation or 0
    after_dst = dst.shifted(tenant.rows, tenant.bytes).utilisation or 0
    return max(abs(after_src - mean), abs(after_dst - mean))


def _shift(rooms: Rooms, source: str, target: str, tenant: TenantSize) -> PlannedMove:
    """Plan moving `tenant` from `source` to `target`, accounting it in `rooms`."""
    shift(rooms, source, target, tenant.rows, tenant.bytes)
    return PlannedMove((tenant.tenant,), source, target, tenant.rows, tenant.bytes)


def group(
    moves: list[PlannedMove], cohorts: Cohorts, residency: Callable[[str], Hashable] = lambda tenant: None
) -> list[PlannedMove]:
    """Group the planned single-tenant moves into cohorts, per (source, target, residency), in plan order.

    A tenant of `cohorts.rows` rows or more stays alone; the others fill cohorts of at most
    `cohorts.tenants` tenants and `cohorts.rows` rows. Large tenants keep their place first (a
    drain places largest first), the cohorts follow. A cohort never mixes residencies (`residency`
    of a tenant, `Layout.residency_key`): an override or a later policy change then concerns whole cohorts.
    """

    def large(move: PlannedMove) -> bool:
        return move.rows >= cohorts.rows or cohorts.tenants <= 1

    open_: dict[tuple[str, str, Hashable], list[PlannedMove]] = {}
    grouped: list[list[PlannedMove]] = []
    for move in moves:
        if large(move):
            continue
        pair = (move.source, move.target, residency(move.tenants[0]))
        current = open_.get(pair)
        if (
            current is None
            or len(current) >= cohorts.tenants
            or sum(m.rows for m in current) + move.rows > cohorts.rows
        ):
            current = open_[pair] = []
            grouped.append(current)
        current.append(move)
    return [m for m in moves if large(m)] + [
        PlannedMove(
            tuple(t for m in members for t in m.tenants),
            members[0].source,
            members[0].target,
            sum(m.rows for m in members),
            sum(m.bytes for m in members),
        )
        for members in grouped
    ]


@dataclass(frozen=True)
class _Why:
    """What a planner says of its plan: its kind, reason, rebalance threshold and notes."""

    kind: str
    reason: str
    threshold: float | None = None
    notes: tuple[str, ...] = ()


def _plan(
    ctx: Context, sizes: FleetSizes, rooms: Rooms, moves: list[PlannedMove], why: _Why, by_region: bool = False
) -> Plan:
    """The plan of `moves`; `by_region` (`--queue-by-region`) names each entry's workers' queue after
    its target's region, so that under `apply --queue` a worker near the data copies it (a target
    without a region leaves its entry on the apply's queue)."""
    if by_region:
        moves = [replace(m, queue=sizes.usage[m.target].stamp.region or None) for m in moves]
    utilisation = {
        name: Utilisation(
            _round(usage.utilisation),
            _round(rooms[name].utilisation),
            usage.rows,
            rooms[name].rows,
            usage.bytes,
            rooms[name].bytes,
        )
        for name, usage in sorted(sizes.usage.items())
    }
    pairs = sorted({(m.source, m.target) for m in moves})
    refused = [
        (source, target, problems)
        for source, target in pairs
        if (problems := shapes.between(sizes.usage[source].stamp, ctx.catalog.stamp(target), ctx.config.tenancy))
    ]
    notes = why.notes + tuple(
        f"moves from {source} to {target} will be refused by preflight: {problems_message(problems)}"
        for source, target, problems in refused
    )
    return Plan(
        kind=why.kind,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        catalog=dsnlib.mask(ctx.catalog.url),
        fleet_schema_revision=_revision(sizes.usage, moves),
        reason=why.reason,
        utilisation=utilisation,
        moves=tuple(moves),
        threshold=why.threshold,
        notes=notes,
    )


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def _revision(usage: dict[str, StampUsage], moves: list[PlannedMove]) -> str | None:
    """The schema revision every stamp of the plan is at; a move needs equal revisions, so refuse a mix."""
    involved = {m.source for m in moves} | {m.target for m in moves} or set(usage)
    found = {name: usage[name].revision for name in sorted(involved)}
    if len(set(found.values())) > 1:
        listed = ", ".join(f"{name} at {rev}" for name, rev in found.items())
        raise BadInput(
            f"stamps of the plan are at different schema revisions ({listed}); "
            "upgrade them first (a move needs equal revisions)"
        )
    return next(iter(found.values()), None)


# -- the file ---------------------------------------------------------------------------------------------

_TOP_REQUIRED = ("version", "kind", "created", "catalog", "fleet_schema_revision", "reason", "utilisation", "moves")
_TOP_OPTIONAL = ("threshold", "notes")
_MOVE_KEYS = ("from", "to", "rows", "bytes")  # and `tenant` (one) or `tenants` (a cohort)
_USE_KEYS = ("before", "after", "rows_before", "rows_after", "bytes_before", "bytes_after")


def plan_data(plan: Plan) -> dict[str, Any]:
    """The plan as plain data, keys in file order (what `to_yaml` writes and `--json` prints)."""
    data: dict[str, Any] = {
        "version": plan.version,
        "kind": plan.kind,
        "created": plan.created,
        "catalog": plan.catalog,
        "fleet_schema_revision": plan.fleet_schema_revision,
        "reason": plan.reason,
    }
    if plan.threshold is not None:
        data["threshold"] = plan.threshold
    if plan.notes:
        data["notes"] = list(plan.notes)
    data["utilisation"] = {
        name: {k: getattr(u, k) for k in _USE_KEYS if getattr(u, k) is not None or k in ("before", "after")}
        for name, u in plan.utilisation.items()
    }
    data["moves"] = [
        {
            **({"tenant": m.tenants[0]} if len(m.tenants) == 1 else {"tenants": list(m.tenants)}),
            "from": m.source,
            "to": m.target,
            "rows": m.rows,
            "bytes": m.bytes,
            **({"queue": m.queue} if m.queue else {}),
        }
        for m in plan.moves
    ]
    return data


def to_yaml(plan: Plan, path: str = "FILE") -> str:
    """The plan as YAML: block-style header, one line per move and per stamp, for easy review and diffs."""
    data = plan_data(plan)
    body = {key: data.pop(key) for key in ("utilisation", "moves")}
    dump: dict[str, Any] = {"sort_keys": False, "allow_unicode": True, "width": 200}
    return (
        f"# migrator {plan.kind} plan: review it (`migrator plan show {path}`), then `migrator apply {path}`.\n"
        "# utilisation = rows used / capacity_rows; bytes = sum of pg_column_size of the tenant's rows.\n"
        + yaml.safe_dump(data, default_flow_style=False, **dump)
        + yaml.safe_dump(body, default_flow_style=None, **dump)
    )


def write_plan(plan: Plan, path: Path, force: bool = False) -> Path:
    """Write the plan file (flag -o); refuses to overwrite one that may have been applied (--force)."""
    if path.exists() and not force:
        raise BadInput(f"{path} already exists; choose another -o or pass --force to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_yaml(plan, str(path)))
    return path


class _Map(dict[Any, Any]):
    """A YAML mapping that remembers where it and each of its keys are (1-based lines)."""

    line: int = 0
    key_lines: dict[Any, int]


class _Problem(Exception):
    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line = line


class _Loader(yaml.SafeLoader):
    """SafeLoader whose mappings carry line numbers and which refuses duplicate keys."""


def _construct_map(loader: _Loader, node: yaml.MappingNode) -> Iterator[_Map]:
    data = _Map()
    data.line = node.start_mark.line + 1
    data.key_lines = {}
    yield data
    loader.flatten_mapping(node)
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        if not isinstance(key, Hashable):
            raise _Problem(line, "a mapping key must be a plain value")
        if key in data:
            raise _Problem(line, f"duplicate key {key!r} (first at line {data.key_lines[key]})")
        data[key] = loader.construct_object(value_node, deep=True)
        data.key_lines[key] = line


_Loader.add_constructor("tag:yaml.org,2002:map", _construct_map)


def load_plan(path: Path) -> tuple[Plan, bytes]:
    """Read and parse a plan file; returns the plan and the exact bytes (their digest keys the run)."""
    try:
        content = path.read_bytes()
    except OSError as exc:
        raise BadInput(f"cannot read plan {path}: {exc.strerror or exc}") from None
    return parse_plan(content, str(path)), content


def parse_plan(content: bytes | str, where: str = "plan") -> Plan:
    """Validate a plan's text; every error is one line naming the file, the line and the key at fault."""
    try:
        raw = yaml.load(content, Loader=_Loader)  # a SafeLoader subclass: no arbitrary objects
        return _plan_from(raw)
    except _Problem as exc:
        raise BadInput(f"{where}: line {exc.line}: {exc}") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise BadInput(f"{where}: malformed YAML{at}: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise BadInput(f"{where}: malformed YAML: {str(exc).splitlines()[0]}") from None
    except UnicodeDecodeError:
        raise BadInput(f"{where}: not UTF-8 text") from None


def _plan_from(raw: Any) -> Plan:
    if not isinstance(raw, _Map):
        raise _Problem(1, "not a plan: expected a mapping with keys " + ", ".join(_TOP_REQUIRED))
    _keys(raw, "", _TOP_REQUIRED, _TOP_OPTIONAL)
    version = _get(raw, "version", int, "an integer")
    if version != VERSION:
        raise _Problem(raw.key_lines["version"], f"version: unsupported plan version {version!r} (expected {VERSION})")
    kind = _get(raw, "kind", str, "a string")
    if kind not in KINDS:
        raise _Problem(raw.key_lines["kind"], f"kind: {kind!r} is not one of {', '.join(KINDS)}")
    created = _get(raw, "created", (str, datetime, date), "a timestamp")
    revision = raw["fleet_schema_revision"]
    if revision is not None and not isinstance(revision, str | int):
        raise _Problem(raw.key_lines["fleet_schema_revision"], "fleet_schema_revision: must be a string or null")
    threshold = raw.get("threshold")
    if threshold is not None and not _number(threshold):
        raise _Problem(raw.key_lines["threshold"], f"threshold: must be a number, got {threshold!r}")
    notes = raw.get("notes") or []
    if not isinstance(notes, list) or not all(isinstance(n, str) for n in notes):
        raise _Problem(raw.key_lines.get("notes", raw.line), "notes: must be a list of strings")
    return Plan(
        kind=kind,
        created=created.isoformat() if isinstance(created, date) else created,
        catalog=_get(raw, "catalog", str, "a string"),
        fleet_schema_revision=None if revision is None else str(revision),
        reason=_get(raw, "reason", str, "a string"),
        utilisation=_utilisation(raw),
        moves=_moves(raw),
        threshold=None if threshold is None else float(threshold),
        notes=tuple(notes),
        version=version,
    )


def _keys(data: _Map, prefix: str, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> None:
    for key in data:
        if key not in required and key not in optional:
            raise _Problem(data.key_lines[key], f"{prefix}{key}: unknown key (expected {', '.join(required)})")
    for key in required:
        if key not in data:
            raise _Problem(data.line, f"{prefix.rstrip('.') or 'plan'}: missing key {key!r}")


def _get(data: _Map, key: str, types: type | tuple[type, ...], what: str, prefix: str = "") -> Any:
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, types) or value == "":
        raise _Problem(data.key_lines[key], f"{prefix}{key}: must be {what}, got {value!r}")
    return value


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _utilisation(raw: _Map) -> dict[str, Utilisation]:
    section = raw["utilisation"]
    if not isinstance(section, _Map):
        raise _Problem(raw.key_lines["utilisation"], "utilisation: must be a mapping of stamp -> {before, after}")
    out = {}
    for stamp, entry in section.items():
        where = f"utilisation.{stamp}."
        if not isinstance(stamp, str) or not isinstance(entry, _Map):
            raise _Problem(section.key_lines[stamp], f"{where[:-1]}: must map a stamp name to {{before, after}}")
        _keys(entry, where, ("before", "after"), _USE_KEYS[2:])
        for key, value in entry.items():
            if value is not None and not (_number(value) and value >= 0):
                raise _Problem(entry.key_lines[key], f"{where}{key}: must be a non-negative number or null")
        out[stamp] = Utilisation(**{k: entry.get(k) for k in _USE_KEYS})
    return out


def _moves(raw: _Map) -> tuple[PlannedMove, ...]:
    entries = raw["moves"]
    if not isinstance(entries, list):
        raise _Problem(raw.key_lines["moves"], "moves: must be a list of {tenant, from, to, rows, bytes}")
    seen: dict[str, int] = {}
    moves = []
    for i, entry in enumerate(entries):
        where = f"moves[{i}]."
        if not isinstance(entry, _Map):
            raise _Problem(raw.key_lines["moves"], f"{where[:-1]}: must be a mapping {{tenant, from, to, rows, bytes}}")
        tenants = _entry_tenants(entry, where)
        _keys(entry, where, _MOVE_KEYS, ("tenant", "tenants", "queue"))
        source = _get(entry, "from", str, "a stamp name", where)
        target = _get(entry, "to", str, "a stamp name", where)
        rows, size = (_get(entry, k, int, "a non-negative integer", where) for k in ("rows", "bytes"))
        for key, value in (("rows", rows), ("bytes", size)):
            if value < 0:
                raise _Problem(entry.key_lines[key], f"{where}{key}: must be a non-negative integer, got {value}")
        if source == target:
            raise _Problem(entry.key_lines["to"], f"{where}to: same stamp as from ({source})")
        for tenant in tenants:
            if tenant in seen:
                raise _Problem(
                    entry.line, f"{where}tenant: tenant {tenant} appears twice (first at line {seen[tenant]})"
                )
            seen[tenant] = entry.line
        queue = _get(entry, "queue", str, "a queue name", where) if "queue" in entry else None
        moves.append(PlannedMove(tenants, source, target, rows, size, entry.line, queue))
    return tuple(moves)


def _entry_tenants(entry: _Map, where: str) -> tuple[str, ...]:
    """An entry's `tenant` (a move of one) or `tenants` (a cohort, a non-empty list): exactly one of them."""
    if ("tenant" in entry) == ("tenants" in entry):
        raise _Problem(entry.line, f"{where[:-1]}: needs exactly one of 'tenant' (one) or 'tenants' (a cohort)")
    if "tenant" in entry:
        return (str(_get(entry, "tenant", (str, int), "a tenant id", where)),)
    listed = entry["tenants"]
    if (
        not isinstance(listed, list)
        or not listed
        or any(isinstance(t, bool) or not isinstance(t, str | int) or t == "" for t in listed)
    ):
        raise _Problem(entry.key_lines["tenants"], f"{where}tenants: must be a non-empty list of tenant ids")
    return tuple(str(t) for t in listed)


def check_stamps(plan: Plan, catalog: Catalog, where: str) -> dict[str, Stamp]:
    """The plan's stamps as the catalog knows them; an unknown one is named with its line."""
    known = {s.name: s for s in catalog.stamps()}
    masked = dsnlib.mask(catalog.url)
    if plan.catalog != masked:
        raise BadInput(f"{where}: the plan was made for catalog {plan.catalog}, this configuration uses {masked}")
    for move in plan.moves:
        for key, name in (("from", move.source), ("to", move.target)):
            if name not in known:
                raise BadInput(f"{where}: line {move.line}: {key}: unknown stamp {name!r} ({move.who})")
    return known
