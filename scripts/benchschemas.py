"""The schemas `scripts/bench move` can move a tenant of: the sample application's, and a peer's.

The peer schema is an ad platform's (companies, campaigns, ads, clicks, impressions) with what the
sample lacks: composite primary keys (company_id, id), composite foreign keys, and jsonb, inet and
numeric columns in the large tables. It has no Alembic history (a user's own schema, created by SQL).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from migrator import config as configlib
from migrator.db import dsn as dsnlib
from migrator.local import pgserver, provision
from migrator.local.seed import TenantSpec, seed_fleet_stamp


@dataclass(frozen=True)
class BenchSchema:
    name: str
    tenancy: configlib.Tenancy
    create: Callable[[pgserver.LocalServer, str], str]  # a new database holding the schema; its DSN
    seed: Callable[[str, int, int], int]  # (dsn, tenant, about how many rows) -> the tenant's exact rows


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


SCHEMAS = {
    "sample": BenchSchema("sample", configlib.Tenancy(), provision.stamp_database, _seed_sample),
    "peer": BenchSchema(
        "peer", configlib.Tenancy(column="company_id", root_table="companies"), _create_peer, _seed_peer
    ),
}
