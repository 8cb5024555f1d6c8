"""`python -m migrator` is the same as the `migrator` console script."""

from migrator.cli import main

main()
