"""Alembic environment of the catalog: the shared body lives in migrator.db.alembic."""

from alembic import context

from migrator.db.alembic import run_env

run_env(context)
