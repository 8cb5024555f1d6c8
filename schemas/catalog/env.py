"""Alembic environment of the catalog: the shared body lives in migrator.alembic_env."""

from alembic import context

from migrator.alembic_env import run_env

run_env(context)
