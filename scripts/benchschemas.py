"""The schemas `scripts/bench move` can move a tenant of: the sample application's, and a peer's.

The peer schema is an ad platform's (companies, campaigns, ads, clicks, impressions) with what the
sample lacks: composite primary keys (company_id, id), composite foreign keys, and jsonb, inet and
numeric columns in the large tables. It has no Alembic history (a user's own schema, created by SQL).
Each schema also says how an application writes a tenant of it (`writes`, for
migrator.testing.writer's `Workload`): the sample's tasks, the peer's clicks and impressions.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Hashable
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from migrator import config as configlib
from migrator.db import dsn as dsnlib
from migrator.local import pgserver, provision
from migrator.local.seed import TenantSpec, seed_fleet_stamp
from migrator.testing.writer import Tasks, Writes


@dataclass(frozen=True)
class BenchSchema:
    name: str
    tenancy: configlib.Tenancy
    create: Callable[[pgserver.LocalServer, str], str]  # a new database holding the schema; its DSN
    seed: Callable[[str, int, int], int]  # (dsn, tenant, about how many rows) -> the tenant's exact rows
    writes: Callable[[int, int], Writes]  # (tenant, seed) -> an application's writes to the tenant


def _seed_sample(dsn: str, tenant: int, rows: int) -> int:
    return seed_fleet_stamp(dsn, [TenantSpec(tenant, rows)])[tenant]


PEER_DDL = """
CREATE TABLE companies (id bigint PRIMARY KEY, name text NOT NULL, settings jsonb NOT NULL,
    created_at timestamptz NOT NULL);
CREATE TABLE campaigns (company_id bigint NOT NULL REFERENCES companies, id bigint NOT NULL,
    name text NOT NULL, budget numeric(14, 2) NOT NULL, starts_on date NOT NULL, PRIMARY KEY (company_id, id));
CREATE TABLE ads (company_id bigint NOT NULL, campaign_id bigint NOT NULL, id bigint NOT NULL,
    headline text NOT NULL, targeting jsonb NOT NULL, bid numeric(10, 4) NOT NULL, PRIMARY KEY (company_id, id),
    FOREIGN KEY (company_id, campaign_id) REFERENCES campaigns);
CREATE INDEX ads_campaign ON ads (company_id, campaign_id);
CREATE TABLE clicks (company_id bigint NOT NULL, ad_id bigint NOT NULL, id bigint NOT NULL,
    clicked_at timestamptz NOT NULL, ip inet NOT NULL, cost numeric(10, 6) NOT NULL, referrer text, meta jsonb,
    PRIMARY KEY (company_id, id), FOREIGN KEY (company_id, ad_id) REFERENCES ads);
CREATE INDEX clicks_ad ON clicks (company_id, ad_id);
CREATE TABLE impressions (company_id bigint NOT NULL, ad_id bigint NOT NULL, id bigint NOT NULL,
    shown_at timestamptz NOT NULL, ip inet NOT NULL, cost numeric(10, 6) NOT NULL, device text NOT NULL,
    PRIMARY KEY (company_id, id), FOREIGN KEY (company_id, ad_id) REFERENCES ads);
CREATE INDEX impressions_ad ON impressions (company_id, ad_id);
"""

PEER_SEED = """
INSERT INTO companies VALUES (%(t)s, 'Company ' || %(t)s, jsonb_build_object('tz', 'Europe/Berlin', 'tier', 3),
    timestamptz '2024-01-01 00:00:00+00');
INSERT INTO campaigns SELECT %(t)s, g, 'Campaign ' || g, round((g * 37.13)::numeric %% 100000, 2),
    date '2024-01-01' + g %% 365 FROM generate_series(1, %(campaigns)s) g;
INSERT INTO ads SELECT %(t)s, 1 + g %% %(campaigns)s, g, 'Ad ' || g || ' — grüße',
    jsonb_build_object('geo', ARRAY['DE', 'FR', 'JP'], 'age', jsonb_build_array(18 + g %% 30, 65)),
    round((g %% 997) / 101.0, 4) FROM generate_series(1, %(ads)s) g;
INSERT INTO clicks SELECT %(t)s, 1 + g %% %(ads)s, g, timestamptz '2024-03-01 00:00:00+00' + g * interval '1.37 s',
    ('10.' || (g >> 16) %% 256 || '.' || (g >> 8) %% 256 || '.' || g %% 256)::inet, round((g %% 9973) / 7919.0, 6),
    CASE WHEN g %% 5 = 0 THEN NULL ELSE 'https://example.com/p/' || g END,
    CASE WHEN g %% 3 = 0 THEN NULL ELSE jsonb_build_object('ua', 'Mozilla/5.0', 'n', g) END
    FROM generate_series(1, %(clicks)s) g;
INSERT INTO impressions SELECT %(t)s, 1 + g %% %(ads)s, g, timestamptz '2024-03-01 00:00:00+00' + g * interval '0.61 s',
    ('2001:db8::' || to_hex(g %% 65536))::inet, round((g %% 7919) / 104729.0, 6),
    (ARRAY['mobile', 'desktop', 'tablet'])[1 + g %% 3] FROM generate_series(1, %(impressions)s) g;
"""


def _create_peer(server: pgserver.LocalServer, name: str) -> str:
    dsn = provision.create_database(server, name)
    with dsnlib.connect(dsn, autocommit=True) as conn:
        conn.execute(PEER_DDL)
    return dsn


def _seed_peer(dsn: str, tenant: int, rows: int) -> int:
    campaigns, ads = max(1, rows // 2000), max(1, rows // 200)
    clicks = rows * 3 // 10
    impressions = max(0, rows - 1 - campaigns - ads - clicks)
    counts = {"t": tenant, "campaigns": campaigns, "ads": ads, "clicks": clicks, "impressions": impressions}
    with dsnlib.connect(dsn) as conn, conn.transaction():
        for statement in PEER_SEED.strip().split(";\n"):
            conn.execute(statement.rstrip(";"), counts)
        conn.execute("ANALYZE")
    return 1 + campaigns + ads + clicks + impressions


PEER_VALUES = {"clicks": "referrer", "impressions": "device"}  # the text column a writer sets, per table


@dataclass
class PeerWrites:
    """The peer application's writes (`Writes`): a company's clicks and impressions, keyed (table, id).

    The tables have no sequences, so the writer makes its ids: above every seeded id, a range of
    its own per seed, so writers of one company (and of successive moves) never collide. A
    primary-key change sets a new id of that range.
    """

    tenant: int
    seed: int
    ads: list[int] = field(default_factory=list)

    def _id(self, n: int) -> int:
        return 10**12 + self.seed * 10**8 + n

    def prepare(self, conn: psycopg.Connection[Any]) -> None:
        rows = conn.execute("SELECT id FROM ads WHERE company_id = %s ORDER BY id LIMIT 50", (self.tenant,))
        self.ads = [int(r[0]) for r in rows]
        assert self.ads, f"company {self.tenant} has no ads"

    def insert(self, conn: psycopg.Connection[Any], n: int, value: str) -> Hashable:
        ad = self.ads[n % len(self.ads)]
        if n % 2:
            statement = (
                "INSERT INTO clicks (company_id, ad_id, id, clicked_at, ip, cost, referrer, meta)"
                " VALUES (%s, %s, %s, now(), '10.0.0.1', 0.000125, %s, '{\"writer\": true}')"
            )
        else:
            statement = (
                "INSERT INTO impressions (company_id, ad_id, id, shown_at, ip, cost, device)"
                " VALUES (%s, %s, %s, now(), '2001:db8::1', 0.000011, %s)"
            )
        conn.execute(statement, (self.tenant, ad, self._id(n), value))
        return ("clicks" if n % 2 else "impressions", self._id(n))

    def update(self, conn: psycopg.Connection[Any], key: Hashable, value: str) -> bool:
        table, id_ = _peer_key(key)
        statement = sql.SQL("UPDATE {} SET {} = %s WHERE company_id = %s AND id = %s").format(
            sql.Identifier(table), sql.Identifier(PEER_VALUES[table])
        )
        return conn.execute(statement, (value, self.tenant, id_)).rowcount == 1

    def rekey(self, conn: psycopg.Connection[Any], key: Hashable, n: int) -> Hashable | None:
        table, id_ = _peer_key(key)
        statement = sql.SQL("UPDATE {} SET id = %s WHERE company_id = %s AND id = %s").format(sql.Identifier(table))
        return (table, self._id(n)) if conn.execute(statement, (self._id(n), self.tenant, id_)).rowcount else None

    def delete(self, conn: psycopg.Connection[Any], key: Hashable) -> bool:
        table, id_ = _peer_key(key)
        statement = sql.SQL("DELETE FROM {} WHERE company_id = %s AND id = %s").format(sql.Identifier(table))
        return conn.execute(statement, (self.tenant, id_)).rowcount == 1

    def read(self, conn: psycopg.Connection[Any], keys: Collection[Hashable]) -> dict[Hashable, str]:
        found: dict[Hashable, str] = {}
        for table, column in PEER_VALUES.items():
            ids = [_peer_key(k)[1] for k in keys if _peer_key(k)[0] == table]
            statement = sql.SQL("SELECT id, {} FROM {} WHERE company_id = %s AND id = ANY(%s)").format(
                sql.Identifier(column), sql.Identifier(table)
            )
            found.update(((table, id_), value) for id_, value in conn.execute(statement, (self.tenant, ids)))
        return found


def _peer_key(key: Hashable) -> tuple[str, int]:
    assert isinstance(key, tuple), key
    table, id_ = key
    return str(table), int(id_)


SCHEMAS = {
    "sample": BenchSchema("sample", configlib.Tenancy(), provision.stamp_database, _seed_sample, Tasks),
    "peer": BenchSchema(
        "peer", configlib.Tenancy(column="company_id", root_table="companies"), _create_peer, _seed_peer, PeerWrites
    ),
}
