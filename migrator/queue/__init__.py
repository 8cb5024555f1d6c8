"""Plans run by a pool of `migrator worker` processes sharing a job queue in the catalog's database.

The queue is procrastinate's (SKIP LOCKED claiming, LISTEN/NOTIFY wake-up, queueing locks,
worker heartbeats), its tables created by the catalog's Alembic revision 0007: the catalog's
PostgreSQL stays the one shared piece, no broker. `app` is what is about the queue itself (task
names, retries, slots, procrastinate's tables); `enqueue` sends a plan's entries (cohorts) or a
rollout's steps as jobs; `tasks` runs one on a worker through the same executor a local run uses
(`plans.execute.execute_entry`, `rollout.worker.run_stamp_step`); `follow` is the one loop of
`plan wait` (and `apply --queue --wait`) and `schema upgrade --queue --wait`; `worker` is the process.

The catalog stays the truth: the tenants' move locks and the open-move index keep two moves of a
tenant apart whoever runs them, the per-stamp limit is a set of advisory-lock slots in the
catalog (fleet-wide, released with a dead worker's session), and each entry's status, failures
and move are in `plan_moves` whatever the queue says.
"""
