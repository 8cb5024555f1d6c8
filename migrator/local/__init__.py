"""Local-fleet tooling, apart from the product: real PostgreSQL servers on this machine (`pgserver`),
databases provisioned on them (`provision`), a local fleet (`fleet`), and the sample stamp
application with its data (`sample_app/`, `seed`). Used by `migrator fleet`, the tests, the
benchmarks; never by a move (the writer and the chaos engine are `migrator.testing`, in no wheel)."""
