"""Reading a stamp: connecting to it, its tenant tables (`discovery`), its rows, the privileges
migrator's role has there (`privileges`) and the tenants it holds (`inventory`)."""

from migrator.stamps.access import connect, layout, tenant_rows

__all__ = ["connect", "layout", "tenant_rows"]
