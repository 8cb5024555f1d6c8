"""Read-only view across the fleet: the tenants each stamp holds, and whether the catalog routes them there."""

from __future__ import annotations

from typing import Any

from migrator import stamps
from migrator.catalog.policy import placements
from migrator.context import Context
from migrator.stamps.discovery import discover
from migrator.stamps.sizes import measure


def list_tenants(ctx: Context, stamp_name: str | None = None, sizes: bool = False) -> list[dict[str, Any]]:
    """Every tenant found on the stamps with its row count, and whether the catalog routes it there.

    With `sizes` (flag --sizes) also the payload bytes, total and per table: the sum of
    `pg_column_size` over the tenant's rows (see `migrator.sizes`), which costs a scan per table.
    """
    catalog = ctx.catalog
    chosen = [catalog.stamp(stamp_name)] if stamp_name else catalog.stamps()
    routes = {r.tenant: r.stamp for r in catalog.routes()}
    attributes = placements(catalog)
    rows = []
    for stamp in chosen:
        with stamps.connect(stamp) as conn:
            layout = discover(conn, ctx.config.tenancy)
            found = measure(conn, layout, stamp.name, with_bytes=sizes)
        for tenant in sorted(found, key=lambda t: (len(t), t)):
            size = found[tenant]
            row: dict[str, Any] = {
                "stamp": stamp.name,
                "tenant": tenant,
                "rows": size.rows,
                "tables": {table: count for table, (count, _) in size.tables.items()},
                "routed": routes.get(tenant) == stamp.name,
                "residency": list(attributes[tenant].residency or ()) if tenant in attributes else None,
                "tier": attributes[tenant].tier if tenant in attributes else "shared",
            }
            if sizes:
                row["bytes"] = size.bytes
                row["table_bytes"] = {table: nbytes for table, (_, nbytes) in size.tables.items()}
            rows.append(row)
    return rows
