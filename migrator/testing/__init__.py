"""Test tooling, kept out of the wheel (pyproject's package excludes `migrator.testing`), as Alembic
and SQLAlchemy keep theirs in a `testing` package apart from what users run.

`writer`: an application's writer through `migrator.router` (the sample's tasks, or another
schema's `Writes`), and the oracle that says which of its acknowledged writes a stamp contradicts
(`Workload.lost_writes`). `chaos`: the chaos engine,
many online moves under a writer, each maybe hit by a fault (`scripts/chaos`).

Used from a checkout (an editable install): the tests, `scripts/bench`, `scripts/chaos` and
`scripts/demo`. Nothing in the product imports it (`tests/test_layers.py`); `fleet up` and the rest
of `migrator.local` stay in the wheel.
"""
