"""Alembic environment of the stamp: the shared body lives in migrator.db.alembic."""

from alembic import context

from migrator.db.alembic import run_env

run_env(context)
