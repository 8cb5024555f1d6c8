"""`migrator stamp create`: a new stamp provisioned at the fleet's revision, registered only once it matches.

Every check comes before the first change, and the catalog is written last, in one transaction:
1. the name and database are new to the catalog, and the stamps' Alembic environment is configured;
2. the fleet's revision and structure: every stamp that is not retired at one revision (else refused:
   a rollout is under way, or stamps drifted), and a fingerprint most of them share (a tie is refused:
   nothing says which is right); a fleet without stamps takes the environment's head;
3. the database holds no application tables and no revision, unless `adopt`;
4. the upgrade runs as a rollout's step does (`run_stamp_step`: the stamp's schema lock, one
   transaction per revision), its sequences put into the stamp's key block on a strided fleet;
5. the new stamp matches the fleet: it is at the fleet's revision, and its structural fingerprint
   (`migrator.stamps.fingerprint`) equals the one most of the fleet's stamps share (else refused,
   naming each object that differs);
6. the stamp is registered with its attributes and key block at once (`Catalog.register_stamp`).

A failure after step 3 registers nothing and says where the database was left and what to do.
`fleet up` provisions its stamps through here, and `fleet apply` creates declared stamps through here.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import conninfo

from migrator import stamps
from migrator.catalog import Stamp, StampState, StepResult
from migrator.context import Context
from migrator.db import dsn as dsnlib
from migrator.db.alembic import read_revision
from migrator.errors import BadInput, ConfigError, MigratorError
from migrator.rollout.drift import structures
from migrator.rollout.history import AHEAD, UNKNOWN, History
from migrator.rollout.worker import Job, reason, run_stamp_step
from migrator.stamps import keyspace
from migrator.stamps.fanout import PER_SERVER, each_stamp
from migrator.stamps.fingerprint import Fingerprint, compare, fingerprint

logger = logging.getLogger(__name__)  # INFO (`migrator -v`): the traceback behind a one-line failure

# Tables, views and foreign tables of the application: outside the system schemas and migrator's own,
# not Alembic's version table, not a partition (its parent counts), not an extension's own.
APPLICATION_TABLES = r"""
SELECT format('%I.%I', n.nspname, c.relname)
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f') AND NOT c.relispartition
  AND n.nspname NOT IN ('pg_catalog', 'information_schema', '_migrator') AND n.nspname NOT LIKE 'pg\_%'
  AND c.relname <> 'alembic_version'
  AND NOT EXISTS (
    SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e'
  )
ORDER BY 1
"""


@dataclass(frozen=True)
class NewStamp:
    """A stamp to create: the flags of `migrator stamp create` (an entry of `fleet apply`'s file)."""

    name: str
    dsn: str
    region: str | None = None
    capacity_rows: int | None = None
    capacity_bytes: int | None = None
    state: StampState = StampState.ACTIVE
    kind: str = "shared"
    adopt: bool = False  # --adopt: take a database that already holds the application's tables


@dataclass(frozen=True)
class FleetShape:
    """What a new stamp must match: the one revision of the stamps that are not retired, and the
    structure most of them share, with a stamp of theirs to name (None: a fleet without stamps)."""

    revision: str
    structure: Fingerprint | None = None
    like: str | None = None
    share: str = ""  # how messages name it: "3 of 4 stamps share ×a1f3, like eu-1"


@dataclass(frozen=True)
class Prepared:
    """What `prepare` checked, nothing changed yet: the stamp as it will be registered (with its key
    block on a strided fleet), the fleet it must match and the revision it is at."""

    stamp: Stamp
    fleet: FleetShape
    current: str | None
    location: Path
    known_blocks: frozenset[int]
    head: str  # the environment's head; the fleet's revision may be older
    tables: int  # application tables it held (adopted)

    @property
    def target(self) -> str:
        return self.fleet.revision


@dataclass(frozen=True)
class Created:
    """What `stamp create` did: the stamp as registered, and its revision before and after."""

    stamp: Stamp
    from_revision: str | None
    revision: str
    head: str
    adopted_tables: int
    structure: Fingerprint  # its fingerprint, as checked against the fleet's

    def shape(self) -> FleetShape:
        """The fleet as this stamp now shows it, for a caller creating more stamps alike (`fleet up`)."""
        share = f"that of stamp {self.stamp.name}, ×{self.structure.digest[:4]}"
        return FleetShape(self.revision, self.structure, self.stamp.name, share)


def create_stamp(ctx: Context, new: NewStamp, fleet: FleetShape | None = None) -> Created:
    """`migrator stamp create`: every check, then the upgrade, then the one catalog transaction.

    `fleet`: the revision and structure to match when the caller knows them (`fleet up`, building the
    fleet stamp by stamp, gives the first stamp's); else the survey of the fleet (`fleet_shape`) reads them.
    """
    return provision(ctx, prepare(ctx, new, fleet))


def prepare(ctx: Context, new: NewStamp, known_shape: FleetShape | None = None) -> Prepared:
    """Every check of `stamp create` before anything changes (refused: BadInput, nothing changed)."""
    found = _history(ctx)
    fleet = ctx.catalog.stamps()
    _refuse_known(new, fleet)
    shape = known_shape or fleet_shape(fleet, found)
    target = shape.revision
    block = keyspace.next_block(fleet) if any(s.key_block is not None for s in fleet) else None
    stamp = Stamp(new.name, new.dsn, new.region, new.capacity_rows, new.capacity_bytes, new.state, block, new.kind)
    with stamps.connect(stamp) as conn:
        current = read_revision(conn)
        tables = [row[0] for row in conn.execute(APPLICATION_TABLES)]
    if (tables or current is not None) and not new.adopt:
        held = f"{len(tables)} application table(s) ({_some(tables)})" if tables else "no application table"
        raise BadInput(
            f"database of stamp {new.name} ({stamp.masked_dsn}) is not empty: it holds {held} and is at revision "
            f"{current or 'base (none)'}; give --adopt to take it as it is, brought to the fleet's revision "
            f"{target}, or use an empty database; nothing changed"
        )
    state, _ = found.classify(current, target)
    if state in (AHEAD, UNKNOWN):
        where = "past" if state == AHEAD else "not on the way to"
        raise BadInput(
            f"database of stamp {new.name} is at revision {current}, {where} the fleet's revision {target}; "
            "nothing changed"
        )
    known = keyspace.known_blocks(fleet)
    return Prepared(stamp, shape, current, found.location, known, found.head, len(tables))


def provision(ctx: Context, prepared: Prepared) -> Created:
    """Upgrade the prepared database, check it matches the fleet, register it; a failure registers nothing."""
    stamp = prepared.stamp
    job = Job(stamp, str(prepared.location), "upgrade", prepared.target, ctx.config.tenancy, prepared.known_blocks)
    done = run_stamp_step(job, prepared.current)
    if done.detail:
        logger.info("stamp create %s failed:\n%s", stamp.name, done.detail)
    if done.result != StepResult.OK:
        raise MigratorError(f"stamp {stamp.name} not created: {done.error}; {_left_at(done.at_revision)}")
    structure = _check_matches_fleet(stamp, prepared.fleet)
    try:
        registered = ctx.catalog.register_stamp(stamp)
    except MigratorError as exc:
        raise MigratorError(f"stamp {stamp.name} not registered: {exc}; {_left_at(prepared.target)}") from None
    return Created(registered, prepared.current, prepared.target, prepared.head, prepared.tables, structure)


def fleet_shape(fleet: Sequence[Stamp], found: History, per_server: int = PER_SERVER) -> FleetShape:
    """What a new stamp is brought to and checked against: the revision every stamp that is not retired
    is at (retired stamps are left out of rollouts too) and the structure most of them share; the
    environment's head for a fleet without stamps.

    Refused when the fleet is not at one revision (a rollout under way, or drift), when a stamp cannot
    be read (it might be elsewhere), when the fleet is at a revision the environment does not know, or
    when no structure is shared by more stamps than any other.
    """
    serving = [s for s in fleet if s.state != StampState.RETIRED]
    if not serving:
        return FleetShape(found.head)
    read = each_stamp(serving, _look, per_server)
    unreachable = [f"{seen.stamp}: {seen.error}" for seen in read if seen.error]
    if unreachable:
        raise BadInput(
            f"cannot tell the fleet's revision, a stamp cannot be read ({'; '.join(unreachable[:3])}); nothing changed"
        )
    at: dict[str | None, list[str]] = {}
    for seen in read:
        at.setdefault(seen.current, []).append(seen.stamp)
    if len(at) > 1:
        raise BadInput(
            f"the fleet is not at one revision ({_groups(at)}): a rollout is under way or stamps drifted; bring "
            "them to one revision (`migrator schema status`, `migrator schema upgrade`) before creating a stamp; "
            "nothing changed"
        )
    (revision,) = at
    if revision is None:
        raise BadInput("the fleet's stamps were never migrated (no revision): run `migrator schema upgrade` first")
    if not found.known(revision):
        raise BadInput(f"the fleet is at revision {revision}, which {found.location} does not know; nothing changed")
    return _majority(revision, read)


@dataclass(frozen=True)
class _Seen:
    """One stamp as the survey read it: its revision and fingerprint, or why it could not."""

    stamp: str
    current: str | None = None
    structure: Fingerprint | None = None
    error: str | None = None

    @property
    def fingerprint(self) -> str | None:
        return self.structure.digest if self.structure is not None else None


def _look(stamp: Stamp) -> _Seen:
    """A stamp's revision and fingerprint, in one session; a failure is its result, never raised."""
    try:
        with stamps.connect(stamp) as conn:
            return _Seen(stamp.name, read_revision(conn), fingerprint(conn))
    except (MigratorError, psycopg.Error) as exc:
        return _Seen(stamp.name, error=str(exc) if isinstance(exc, MigratorError) else reason(exc, stamp.dsn))


def _majority(revision: str, read: Sequence[_Seen]) -> FleetShape:
    """The structure more stamps share than any other (`rollout.drift`'s majority, as `schema status`
    shows it); a tie is refused (nothing says which is right)."""
    found = structures(read)
    leader = found[0]
    if not leader.majority:
        groups = ", ".join(f"{len(s.stamps)} ×{s.digest[:4]} ({_some(s.stamps)})" for s in found)
        raise BadInput(
            f"the fleet's stamps at {revision} have {len(found)} structures and none is shared by more stamps than "
            f"the others ({groups}): a new stamp cannot tell which to match; see `migrator schema diff --fleet`; "
            "nothing changed"
        )
    like = leader.stamps[0]
    structure = next(seen.structure for seen in read if seen.stamp == like)
    share = f"{len(leader.stamps)} of {len(read)} stamps share ×{leader.digest[:4]}, like {like}"
    return FleetShape(revision, structure, like, share)


def _groups(at: dict[str | None, list[str]]) -> str:
    """`2 at 0006, 1 at 0005 (us-1)`: each group's size, the minorities' stamps named."""
    ranked = sorted(at.items(), key=lambda item: (-len(item[1]), str(item[0])))
    top = len(ranked[0][1])
    return ", ".join(
        f"{len(names)} at {key or 'base'}" + ("" if len(names) == top else f" ({_some(names)})")
        for key, names in ranked
    )


def _history(ctx: Context) -> History:
    """The stamps' Alembic environment; without one, a refusal that says why it is needed."""
    try:
        return History.load(ctx.config.schema_env())
    except ConfigError as exc:
        raise ConfigError(
            f"stamp create brings a new stamp to the fleet's revision with the stamps' Alembic environment, "
            f"and there is none: {exc}; to register a database migrated by other means, use `migrator stamp add`"
        ) from None


def _refuse_known(new: NewStamp, fleet: Sequence[Stamp]) -> None:
    """A name the catalog has, or a database another stamp already is, is refused before any connection."""
    if any(s.name == new.name for s in fleet):
        raise BadInput(f"stamp {new.name!r} already exists; change it with `migrator stamp update {new.name}`")
    database = _database(new.dsn)
    same = [s.name for s in fleet if database is not None and _database(s.dsn) == database]
    if same:
        raise BadInput(f"the database of stamp {new.name} is already stamp {same[0]}'s; nothing changed")


def _database(dsn: str) -> tuple[Any, ...] | None:
    """Where a DSN points (service, host, port, database), to tell two names for one database apart."""
    try:
        params = conninfo.conninfo_to_dict(dsnlib.normalize(dsn))
    except psycopg.Error:
        return None
    return tuple(params.get(k) for k in ("service", "host", "port", "dbname"))


def _check_matches_fleet(stamp: Stamp, fleet: FleetShape) -> Fingerprint:
    """The new stamp must stand where the fleet stands: at its revision (a user's env.py could end
    elsewhere without failing), with the structure most of its stamps share; returns its structure."""
    with stamps.connect(stamp) as conn:
        revision = read_revision(conn)
        structure = fingerprint(conn)
    if revision != fleet.revision:
        raise MigratorError(
            f"stamp {stamp.name} not created: its database ended at revision {revision or 'base'}, not the fleet's "
            f"{fleet.revision}; {_left_at(revision)}"
        )
    if fleet.structure is None or fleet.like is None:
        return structure
    differences = compare(fleet.structure, structure)
    if differences:
        listed = "; ".join(d.describe(fleet.like, stamp.name) for d in differences[:5])
        more = f"; and {len(differences) - 5} more" if len(differences) > 5 else ""
        raise MigratorError(
            f"stamp {stamp.name} not created: its structure differs from the fleet's ({fleet.share}): "
            f"{listed}{more}; {_left_at(revision)}"
        )
    return structure


def _left_at(revision: str | None) -> str:
    """What a failed `stamp create` left behind, and the two ways on."""
    if revision is None:
        return "nothing registered; the database has no revision: fix the cause and run it again"
    return f"nothing registered; database left at revision {revision}: drop it, or fix the cause and rerun with --adopt"


def _some(items: Sequence[str], limit: int = 5) -> str:
    return ", ".join(items[:limit]) + (", ..." if len(items) > limit else "")
