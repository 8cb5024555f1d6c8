"""Alembic environment of the stamp: the shared body lives in migrator.alembic_env."""

from alembic import context

from migrator.alembic_env import run_env

run_env(context)
