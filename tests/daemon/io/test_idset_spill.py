"""IdSet past its in-memory limit: the hashes move to an on-disk table and every answer stays the same."""

from __future__ import annotations

from daemon.io.records import IdSet


def test_answers_are_the_same_before_and_after_the_spill(tmp_path):
    ids = IdSet(memory_ids=100, spill_dir=str(tmp_path))
    assert all(ids.add(f"id-{n}") for n in range(100))
    assert not list(tmp_path.iterdir())  # still in memory
    assert ids.add("id-100")  # the 101st spills
    (spilled,) = tmp_path.iterdir()
    assert spilled.name.startswith("reelflow-ids-")
    assert len(ids) == 101
    assert all(f"id-{n}" in ids for n in range(101))
    assert "id-101" not in ids
    assert not ids.add("id-7") and not ids.add("id-100")  # duplicates from either side of the spill
    assert ids.add("id-200") and "id-200" in ids and len(ids) == 102
    assert all(ids.add(f"more-{n}") for n in range(1000)) and len(ids) == 1102
    assert "more-999" in ids and "more-1000" not in ids


def test_the_spill_file_goes_away_with_the_set(tmp_path):
    ids = IdSet(memory_ids=10, spill_dir=str(tmp_path))
    for n in range(20):
        ids.add(str(n))
    assert len(list(tmp_path.iterdir())) == 1
    del ids
    assert not list(tmp_path.iterdir())
