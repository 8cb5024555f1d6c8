"""The SQLSTATEs migrator's own triggers raise on stamps, defined once.

Read by the guard trigger that raises them (`migrator.move.fence`) and by the applications' router
that retries on them (`migrator.router`); nothing is imported here, so the router stays psycopg-only.
"""

FENCED_SQLSTATE = "MGF01"  # a write of a tenant fenced for a move (applications re-read the route and retry)
