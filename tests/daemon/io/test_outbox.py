"""The outbox writer: line formats, torn-line repair and the resume ledger read back from the files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from daemon.io.outbox import JobWriter, OutboxLayout, _truncate_torn_line
from daemon.io.records import Record, duplicate_key, unreadable_row_key


def rec(rid: str | None, row_number: int, row: dict | None = None, key: str | None = None) -> Record:
    row = row if row is not None else {"id": rid}
    return Record(id=rid, job="j", row_number=row_number, row=row, fields=dict(row), key=key or str(rid))


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_layouts(tmp_path):
    daemon = OutboxLayout.daemon(tmp_path / "out").for_job("clips")
    assert daemon.results == tmp_path / "out" / "clips.jsonl"
    assert daemon.errors == tmp_path / "out" / "clips.errors.jsonl"
    assert daemon.media == tmp_path / "out" / "media" / "clips"
    assert daemon.intermediate == tmp_path / "out" / "intermediate" / "clips"
    one_shot = OutboxLayout.one_shot(tmp_path / "base", tmp_path / "save").for_job("clips")
    assert one_shot.results == tmp_path / "base" / "clips.jsonl"
    assert one_shot.errors == tmp_path / "save" / "clips.errors.jsonl"
    assert one_shot.media == tmp_path / "save" / "media"
    assert one_shot.intermediate == tmp_path / "base"


def test_result_error_and_intermediate_lines(tmp_path):
    layout = OutboxLayout.daemon(tmp_path)
    writer = JobWriter("j", layout.for_job("j"), tmp_path, config_digest="abc123")
    assert len(writer.open()) == 0
    good = rec("1", 1, {"id": 1, "video": "a.mp4"})
    good.merge({"frames": [tmp_path / "media" / "j" / "1" / "f.jpg"], "score": np.float32(0.5), "shape": (2, 3)})
    good.merge({"outside": Path("/elsewhere/x.jpg")})
    writer.write_intermediate("step_0_A_B", [good])
    writer.write_results([good])
    writer.write_errors([(rec("2", 2, {"id": "2", "x": [1]}), "step_0_A_B", "Refused", "no")])
    writer.close()
    (result,) = lines(tmp_path / "j.jsonl")
    assert result == {
        "id": "1",  # the id as a string, replacing the row's own
        "video": "a.mp4",
        "frames": ["media/j/1/f.jpg"],  # generated files relative to the outbox
        "score": 0.5,
        "shape": [2, 3],
        "outside": "/elsewhere/x.jpg",
        "_config_hash": "abc123",
    }
    (error,) = lines(tmp_path / "j.errors.jsonl")
    assert error == {
        "id": "2",
        "job": "j",
        "row": 2,
        "step": "step_0_A_B",
        "error": "Refused",
        "message": "no",
        "record": {"id": "2", "x": [1]},
    }
    assert lines(tmp_path / "intermediate" / "j" / "step_0_A_B.jsonl")[0]["frames"] == ["media/j/1/f.jpg"]
    assert writer.results_written == 1 and writer.errors_written == 1


def test_reopen_reads_the_ledger_and_repairs_a_torn_line(tmp_path):
    paths = OutboxLayout.daemon(tmp_path).for_job("j")
    writer = JobWriter("j", paths, tmp_path)
    writer.open()
    writer.write_results([rec("a", 1), rec("b", 2)])
    writer.write_errors(
        [
            (rec("c", 3), "step_0_A_B", "Refused", "no"),
            (rec("a", 4, key=duplicate_key("a", 4)), "read", "DuplicateId", "dup"),
            (rec(None, 5, {}, key=unreadable_row_key(5)), "read", "BadJson", "broken"),
        ]
    )
    writer.close()
    with paths.results.open("ab") as handle:
        handle.write(b'{"id": "torn", "video": "x.m')  # a crash mid-line
    again = JobWriter("j", paths, tmp_path)
    done = again.open()
    assert paths.results.read_bytes().endswith(b"\n")
    assert [line["id"] for line in lines(paths.results)] == ["a", "b"]
    assert again.results_written == 2 and again.errors_written == 3
    for key in ("a", "b", "c", duplicate_key("a", 4), unreadable_row_key(5)):
        assert key in done
    assert "torn" not in done and duplicate_key("a", 9) not in done and len(done) == 5


def test_truncate_torn_line_edge_cases(tmp_path):
    path = tmp_path / "f.jsonl"
    path.write_bytes(b"no newline at all")
    _truncate_torn_line(path)
    assert path.read_bytes() == b""
    big = b'{"a": 1}\n' + b"x" * 200_000  # the torn tail is longer than one read block
    path.write_bytes(big)
    _truncate_torn_line(path)
    assert path.read_bytes() == b'{"a": 1}\n'
    _truncate_torn_line(tmp_path / "missing.jsonl")  # nothing to do
