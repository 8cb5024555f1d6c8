"""Benchmark: a table reached through a foreign key against the same table carrying the tenant column.

Issue "Every row of a tenant, wherever it lives" asks that a path table copies and verifies at no
less than 0.7x the rows/s of a tenant-column table of the same shape and size. Two schemas, each
in two variants that differ only in how the large child table reaches its tenant:
- `orders`: `order_lines` (ROWS rows for the moved tenant, half as many for a neighbour on the same
  stamp) under `orders`, with `account_id` in the column variant, through `order_id` in the path one;
- `peer`: the ad platform of `scripts/bench move --schema peer` (one tenant), whose `clicks` carry
  `company_id` in the column variant and reach `ads` through a composite key `(ad_company, ad_id)`
  in the path one.

Each variant is one `migrator move` (online, --jobs 2) from a fresh source into a fresh target, then
`migrator verify --jobs 2`; the copy step is `seconds.copy` of `--json`. Prints rows/s and the
path/column ratios. Then the cost of another tenant's writes while a move's guard is installed:
WRITES single-row inserts into `order_lines` by the neighbour (one PL/pgSQL loop in the server, so
only the server's own work counts), without a guard and with the guard of a move of tenant 1, for
both variants: the path table's guard looks the row's tenant up through `orders`.
`scripts/bench paths [--rows N] [--schemas orders,peer] [--writes N]`. Every server is stopped at
the end; nothing is written to the repository.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import benchlib  # scripts/, the directory of this script
from benchschemas import PEER_DDL, PEER_SEED

from migrator import config as configlib
from migrator.db import dsn as dsnlib
from migrator.local import pgserver, provision
from migrator.move import fence
from migrator.stamps.discovery import discover

TENANT, NEIGHBOUR = 1, 2

ORDERS = """
CREATE TABLE accounts (id bigint PRIMARY KEY, name text NOT NULL);
CREATE TABLE orders (id bigint PRIMARY KEY, account_id bigint NOT NULL REFERENCES accounts,
    placed_at timestamptz NOT NULL);
CREATE INDEX orders_account ON orders (account_id);
CREATE TABLE order_lines (id bigint PRIMARY KEY, {tenant_column} order_id bigint NOT NULL REFERENCES orders,
    sku text NOT NULL, qty integer NOT NULL, price numeric(12, 2) NOT NULL);
CREATE INDEX order_lines_order ON order_lines (order_id);
"""
ORDERS_SEED = """
INSERT INTO accounts VALUES (%(t)s, 'account ' || %(t)s);
INSERT INTO orders SELECT %(t)s * 100000000 + g, %(t)s, timestamptz '2025-01-01 00:00:00+00' + g * interval '1 min'
    FROM generate_series(1, %(orders)s) g;
INSERT INTO order_lines SELECT %(t)s * 100000000 + g, {tenant_value} %(t)s * 100000000 + 1 + g %% %(orders)s,
    'sku-' || g %% 5000, 1 + g %% 7, round((g %% 9973) / 7.0, 2) FROM generate_series(1, %(lines)s) g;
"""
# The peer schema's clicks reaching their company only through the ad they belong to.
PEER_PATH_CLICKS = (
    "CREATE TABLE clicks (ad_company bigint NOT NULL, ad_id bigint NOT NULL, id bigint NOT NULL,"
    "    clicked_at timestamptz NOT NULL, ip inet NOT NULL, cost numeric(10, 6) NOT NULL, referrer text, meta jsonb,"
    "    PRIMARY KEY (id), FOREIGN KEY (ad_company, ad_id) REFERENCES ads);\n"
    "CREATE INDEX clicks_ad ON clicks (ad_company, ad_id);"
)


def _peer_ddl(path: bool) -> str:
    if not path:
        return PEER_DDL
    start = PEER_DDL.index("CREATE TABLE clicks")
    end = PEER_DDL.index("CREATE TABLE impressions")
    return PEER_DDL[:start] + PEER_PATH_CLICKS + "\n" + PEER_DDL[end:]


def _create(server: pgserver.LocalServer, name: str, family: str, path: bool) -> str:
    dsn = provision.create_database(server, name)
    ddl = _peer_ddl(path) if family == "peer" else ORDERS.format(tenant_column="" if path else "account_id bigint,")
    with dsnlib.connect(dsn, autocommit=True) as conn:
        conn.execute(ddl)
    return dsn


def _seed(dsn: str, family: str, path: bool, rows: int) -> int:
    """The moved tenant's rows (and, in `orders`, a neighbour's half as many); returns the moved tenant's."""
    with dsnlib.connect(dsn) as conn, conn.transaction():
        if family == "peer":
            campaigns, ads = max(1, rows // 2000), max(1, rows // 200)
            clicks, impressions = rows * 3 // 10, rows // 10
            counts = {"t": TENANT, "campaigns": campaigns, "ads": ads, "clicks": clicks, "impressions": impressions}
            for statement in PEER_SEED.strip().split(";\n"):
                conn.execute(statement.rstrip(";"), counts)
            total = 1 + campaigns + ads + clicks + impressions
        else:
            seed = ORDERS_SEED.format(tenant_value="" if path else "%(t)s,")
            for tenant, lines in ((TENANT, rows), (NEIGHBOUR, rows // 2)):
                for statement in seed.strip().split(";\n"):
                    conn.execute(statement.rstrip(";"), {"t": tenant, "orders": max(1, lines // 10), "lines": lines})
            total = 1 + max(1, rows // 10) + rows
        conn.execute("ANALYZE")
    return total


def _tenancy(family: str) -> configlib.Tenancy:
    if family == "peer":
        return configlib.Tenancy(column="company_id", root_table="companies")
    return configlib.Tenancy(column="account_id", root_table="accounts")


def _run(argv: list[str]) -> tuple[float, str]:
    started = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv[3:])} failed: {done.stderr[-2000:]}")
    return time.monotonic() - started, done.stdout


def _variant(
    servers: list[pgserver.LocalServer], base: Path, family: str, path: bool, rows: int
) -> tuple[int, float, float, dict[str, str]]:
    """One move and one verify; returns the tenant's rows, copy seconds, verify seconds, how tables were found."""
    name = f"{family}_{'path' if path else 'column'}"
    source = _create(servers[0], f"source_{name}", family, path)
    target = _create(servers[1], f"target_{name}", family, path)
    print(f"seeding {name} ...", file=sys.stderr)
    total = _seed(source, family, path, rows)
    catalog, config = benchlib.catalog_with_config(servers[0], base, f"catalog_{name}", _tenancy(family))
    catalog.add_stamp("source", source)
    catalog.add_stamp("target", target)
    catalog.set_route(str(TENANT), "source")
    catalog.close()
    cli = [sys.executable, "-m", "migrator", "--config", str(config)]
    _, planned = _run([*cli, "move", str(TENANT), "--to", "target", "--dry-run", "--json"])
    print(f"moving {name} ...", file=sys.stderr)
    _, out = _run([*cli, "move", str(TENANT), "--to", "target", "--yes", "--json", "--jobs", "2"])
    copy_s = json.loads(out)["seconds"]["copy"]
    verify_s, out = _run(
        [*cli, "verify", str(TENANT), "--source", "source", "--target", "target", "--json", "--jobs", "2"]
    )
    assert json.loads(out)["equal"] is True
    return total, copy_s, verify_s, json.loads(planned)["reached"]


def _write_cost(server: pgserver.LocalServer, path: bool, writes: int) -> tuple[float, float]:
    """Microseconds per neighbour insert into order_lines, without and with a move's guard on tenant 1."""
    name = f"writes_{'path' if path else 'column'}"
    dsn = _create(server, name, "orders", path)
    _seed(dsn, "orders", path, 10_000)
    tenancy = _tenancy("orders")
    value = "" if path else f"{NEIGHBOUR},"
    loop = (
        f"DO $$ BEGIN FOR i IN 1..{writes} LOOP INSERT INTO order_lines VALUES "
        f"(900000000 + i + %s, {value} {NEIGHBOUR} * 100000000 + 1 + i %% 100, 'w', 1, 1); END LOOP; END $$"
    )
    timings = []
    with dsnlib.connect(dsn, autocommit=True) as conn:
        layout = discover(conn, tenancy)
        for guarded in (False, True):
            if guarded:
                fence.guard(conn, layout, (str(TENANT),), move_id=1, fenced=False, capture=True)
                conn.commit()
            started = time.monotonic()
            conn.execute(loop.replace("%s", str(writes if guarded else 0)).replace("%%", "%"))
            timings.append((time.monotonic() - started) / writes * 1e6)
    return timings[0], timings[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows of the large child table of the tenant")
    parser.add_argument("--schemas", default="orders,peer", help="schema families to run, comma-separated")
    parser.add_argument("--writes", type=int, default=50_000, help="neighbour inserts timed per guard state")
    args = parser.parse_args()
    results = []
    with benchlib.local_servers("migrator-bench-paths-", ["source", "target"]) as (base, servers):
        for family in args.schemas.split(","):
            column = _variant(servers, base, family, False, args.rows)
            path = _variant(servers, base, family, True, args.rows)
            results.append((family, column, path))
        print("timing a neighbour's writes under a move's guard ...", file=sys.stderr)
        writes = {variant: _write_cost(servers[0], variant == "path", args.writes) for variant in ("column", "path")}
    print("schema  variant  tenant rows  copy s   copy rows/s  verify s  verify rows/s  the child table found by")
    for family, column, path in results:
        child = "clicks" if family == "peer" else "order_lines"
        for variant, (total, copy_s, verify_s, reached) in (("column", column), ("path", path)):
            print(
                f"{family:7} {variant:7}  {total:11,}  {copy_s:6.2f}  {total / copy_s:12,.0f}  {verify_s:8.2f}"
                f"  {total / verify_s:13,.0f}  {reached.get(child)}"
            )
        print(
            f"{family:7} path/column: copy {column[1] / path[1]:.2f}x, verify {column[2] / path[2]:.2f}x"
            " the rows/s (target >= 0.7x)"
        )
    print()
    print(f"another tenant's insert into order_lines, {args.writes:,} in one server loop: us per insert")
    for variant, (bare, guarded) in writes.items():
        print(f"  {variant:7} no guard {bare:6.1f}   a move's guard installed {guarded:6.1f}   (+{guarded - bare:.1f})")


if __name__ == "__main__":
    main()
