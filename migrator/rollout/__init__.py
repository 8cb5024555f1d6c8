"""Fleet-wide schema rollouts: one Alembic history applied to every stamp, canary first
(`runner`), one stamp's run under its lock in a worker process (`worker`), and where each stamp
stands against the history (`history`)."""
