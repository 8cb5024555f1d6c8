"""Database plumbing every job shares: connections with pinned settings and masked secrets (`dsn`),
retry policies (`retry`), advisory locks (`locks`) and Alembic driven in-process (`alembic`)."""
