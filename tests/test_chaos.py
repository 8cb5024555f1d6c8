"""The chaos engine (`migrator.testing.chaos`, run by scripts/chaos) in small: every fault kind strikes
once, no invariant breaks."""

from __future__ import annotations

from migrator.testing import chaos


def test_every_fault_kind_once_breaks_no_invariant() -> None:
    report = chaos.run(moves=6, seed=2, small=2, medium=1, cover_all=True)
    print(report.table())
    assert report.problems == []
    assert all(count == 0 for count in report.invariants.values()), report.table()
    assert {kind for kind, count in report.faults.items() if count} == set(chaos.KINDS), report.table()
    assert report.flipped + report.aborted == report.moves


def test_oracle_counts_what_it_must() -> None:
    """The invariant checks are not vacuous: a lost, changed or extra row and a lost write are all counted."""
    before = {"tasks": {"{1,1}": "a", "{1,2}": "b"}, "tenants": {"{1}": "t"}}
    after = {"tasks": {"{1,1}": "a", "{1,2}": "B", "{1,3}": "c"}, "tenants": {}}
    assert chaos.compare_rows(before, after) == (2, 1)  # {1,2} changed and {1} lost; {1,3} extra
    acked = chaos.Acked(project=1, alive={10: "u1", 11: "w2"}, deleted={12}, doubt_keys={13}, doubt_titles={"w9"})
    # 10 is stale, 12 came back, 13 is in doubt (either way is fine), 14 carries an in-doubt insert's title,
    # 15 is a row nobody acknowledged.
    rows = {10: "w0", 11: "w2", 12: "x", 13: "y", 14: "w9", 15: "z"}
    assert chaos.check_writes(acked, rows) == (2, 1)
