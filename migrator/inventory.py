"""Read-only views across the fleet: tenants per stamp, ad-hoc verify, leftovers (`doctor`)."""

from __future__ import annotations

from typing import Any

from migrator import fence, stamps
from migrator.context import Context
from migrator.discovery import discover
from migrator.errors import BadInput
from migrator.sizes import measure
from migrator.verify import Report, verify_tenant


def list_tenants(ctx: Context, stamp_name: str | None = None, sizes: bool = False) -> list[dict[str, Any]]:
    """Every tenant found on the stamps with its row count, and whether the catalog routes it there.

    With `sizes` (flag --sizes) also the payload bytes, total and per table: the sum of
    `pg_column_size` over the tenant's rows (see `migrator.sizes`), which costs a scan per table.
    """
    catalog = ctx.catalog
    chosen = [catalog.stamp(stamp_name)] if stamp_name else catalog.stamps()
    routes = {r.tenant: r.stamp for r in catalog.routes()}
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
            }
            if sizes:
                row["bytes"] = size.bytes
                row["table_bytes"] = {table: nbytes for table, (_, nbytes) in size.tables.items()}
            rows.append(row)
    return rows


def verify_between(ctx: Context, tenant: str, source_name: str, target_name: str) -> Report:
    """`migrator verify`: compare a tenant on two stamps, using the source's layout."""
    source, target = ctx.catalog.stamp(source_name), ctx.catalog.stamp(target_name)
    if source.name == target.name:
        raise BadInput("source and target are the same stamp")
    with stamps.connect(source) as src, stamps.connect(target):  # an unreachable stamp is named, masked
        layout = discover(src, ctx.config.tenancy)
    return verify_tenant(source.dsn, target.dsn, layout, tenant)


def leftovers(ctx: Context, stamp_name: str | None = None) -> dict[str, list[str]]:
    """migrator objects left on stamps, by stamp name; empty lists are omitted."""
    chosen = [ctx.catalog.stamp(stamp_name)] if stamp_name else ctx.catalog.stamps()
    found = {}
    for stamp in chosen:
        with stamps.connect(stamp) as conn:
            items = fence.leftovers(conn)
        if items:
            found[stamp.name] = items
    return found
