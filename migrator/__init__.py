"""migrator: move tenants between deployment stamps without losing a row."""

__version__ = "0.1.0"
