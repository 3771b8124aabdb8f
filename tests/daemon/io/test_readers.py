"""Readers: each format streams rows; a bad row is a RowProblem naming file and row; the rest goes on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from daemon.io.readers import RowProblem, UnreadableFile, _read_json_array, input_format, read_rows


def rows(path: Path, fmt: str | None = None) -> list[tuple[int, object]]:
    return list(read_rows(path, fmt or input_format(path), "video"))


def good(result) -> list[tuple[int, dict]]:
    return [(n, r) for n, r in result if not isinstance(r, RowProblem)]


def bad(result) -> list[tuple[int, RowProblem]]:
    return [(n, r) for n, r in result if isinstance(r, RowProblem)]


@pytest.mark.parametrize(
    ("name", "fmt"),
    [
        ("a.jsonl", "jsonl"),
        ("a.NDJSON", "jsonl"),
        ("a.json", "json"),
        ("a.csv", "csv"),
        ("a.tsv", "tsv"),
        ("a.parquet", "parquet"),
        ("a.MP4", "video"),
        ("a.webm", "video"),
        ("a.txt", None),
        ("a", None),
    ],
)
def test_input_format(name, fmt):
    assert input_format(Path(name)) == fmt


# --- jsonl -----------------------------------------------------------------------------------


def test_jsonl_bom_crlf_blank_broken_and_non_object_lines(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_bytes(
        b'\xef\xbb\xbf{"id": "a", "video": "x.mp4"}\r\n'  # 1: BOM + CRLF
        b"\r\n"  # 2: blank
        b'{"id": "b", "video": \r\n'  # 3: broken
        b"[1, 2]\n"  # 4: not an object
        b"   \n"  # 5: blank
        b'"just a string"\n'  # 6: not an object
        b'{"id": "c", "caption": "caf\xc3\xa9"}\n'  # 7: utf-8
        b"\xff\xfe{bad bytes}\n"  # 8: not utf-8
        b'{"id": "d"}'  # 9: no final newline
    )
    result = rows(path)
    assert good(result) == [
        (1, {"id": "a", "video": "x.mp4"}),
        (7, {"id": "c", "caption": "café"}),
        (9, {"id": "d"}),
    ]
    problems = dict(bad(result))
    assert sorted(problems) == [3, 4, 6, 8]
    assert problems[3].error_type == "BadJson"
    assert problems[3].message.startswith("m.jsonl: line 3 is not valid JSON")
    assert "expected one JSON object per line" in problems[3].message
    assert (
        problems[4].error_type == "NotAnObject"
        and "line 4 is a JSON list; expected a JSON object" in problems[4].message
    )
    assert "line 6 is a JSON str" in problems[6].message
    assert problems[8].error_type == "BadJson"


def test_jsonl_streams(tmp_path):
    """The reader is a generator over the open file: rows come out before the file is read whole."""
    path = tmp_path / "big.jsonl"
    with path.open("w") as handle:
        for n in range(5000):
            handle.write(json.dumps({"id": n}) + "\n")
    stream = read_rows(path, "jsonl", "video")
    assert next(stream) == (1, {"id": 0})
    path.write_text("")  # truncating under a streaming reader does not change what it already gave
    stream.close()


# --- json arrays -----------------------------------------------------------------------------


def test_json_array_with_nested_brackets_in_strings_and_chunk_boundaries(tmp_path):
    elements = [
        {"id": "a", "text": 'brackets ] } [ { and "quotes" and , commas'},
        {"id": "b", "nested": {"list": [1, [2, {"x": "]"}]]}, "text": "é" * 50},
        {"id": "c", "text": "x" * 300},
    ]
    path = tmp_path / "m.json"
    path.write_text("\ufeff \n[\r\n" + ",\r\n".join(json.dumps(e) for e in elements) + "\n]\n", encoding="utf-8")
    for chunk in (1, 3, 7, 64, 1 << 16):  # tiny chunks: every element spans many reads
        assert list(_read_json_array(path, "m.json", chunk_chars=chunk)) == [(i + 1, e) for i, e in enumerate(elements)]


def test_json_empty_array(tmp_path):
    path = tmp_path / "e.json"
    path.write_text("  [ ]  ")
    assert rows(path) == []


def test_json_non_object_elements_are_row_problems(tmp_path):
    path = tmp_path / "m.json"
    path.write_text('[{"id": 1}, 2, "three", null, {"id": 5}]')
    result = rows(path)
    assert good(result) == [(1, {"id": 1}), (5, {"id": 5})]
    problems = dict(bad(result))
    assert sorted(problems) == [2, 3, 4]
    assert problems[2].error_type == "NotAnObject"
    assert problems[2].message == "m.json: array element 2 is a JSON int; expected an object"


def test_json_truncated_inside_an_element(tmp_path):
    path = tmp_path / "t.json"
    path.write_text('[{"id": 1}, {"id": 2}, {"id": 3, "video": "x.m')
    result = rows(path)
    assert good(result) == [(1, {"id": 1}), (2, {"id": 2})]
    ((number, problem),) = bad(result)
    assert number == 3 and problem.error_type == "BadJson"
    assert "array element 3 is not valid JSON" in problem.message and "rest of the file" in problem.message


def test_json_truncated_between_elements(tmp_path):
    path = tmp_path / "t.json"
    path.write_text('[{"id": 1}, {"id": 2}')
    stream = read_rows(path, "json", "video")
    assert next(stream) == (1, {"id": 1})
    assert next(stream) == (2, {"id": 2})
    with pytest.raises(UnreadableFile, match=r"t.json: the JSON array ends early after element 2"):
        next(stream)


@pytest.mark.parametrize("text", ['{"id": 1}', "not json", "", '"[]"'])
def test_json_that_is_not_an_array_is_unreadable(tmp_path, text):
    path = tmp_path / "o.json"
    path.write_text(text)
    with pytest.raises(UnreadableFile, match=r"o.json: expected a JSON array of objects"):
        rows(path)


def test_json_not_utf8_is_unreadable(tmp_path):
    path = tmp_path / "b.json"
    path.write_bytes(b"\xff\xfe\x00[")
    with pytest.raises(UnreadableFile, match="not UTF-8"):
        rows(path)


def test_json_bad_bytes_mid_file_is_unreadable_not_a_crash(tmp_path):
    path = tmp_path / "b.json"
    path.write_bytes(b'[{"id": 1},\n' + b'{"id": 2, "x": "' + b"a" * 70000 + b'\xff"}]')
    stream = read_rows(path, "json", "video")
    assert next(stream) == (1, {"id": 1})
    with pytest.raises(UnreadableFile, match="not UTF-8"):
        list(stream)


# --- csv / tsv -------------------------------------------------------------------------------


def test_csv_quoted_newlines_bom_crlf_and_wrong_field_counts(tmp_path):
    path = tmp_path / "m.csv"
    path.write_bytes(
        b"\xef\xbb\xbfid, video ,caption\r\n"
        b'a,a.mp4,"first line\r\nsecond line, with a comma"\r\n'
        b"b,b.mp4\r\n"  # too few
        b'c,c.mp4,"say ""hi"""\r\n'
        b"\r\n"  # blank
        b"d,d.mp4,x,extra\r\n"  # too many
        b"e,e.mp4,\r\n"
    )
    result = rows(path)
    assert good(result) == [
        (1, {"id": "a", "video": "a.mp4", "caption": "first line\r\nsecond line, with a comma"}),
        (3, {"id": "c", "video": "c.mp4", "caption": 'say "hi"'}),
        (6, {"id": "e", "video": "e.mp4", "caption": ""}),
    ]
    problems = dict(bad(result))
    assert sorted(problems) == [2, 5]
    assert problems[2].message == (
        "m.csv: row 2 (line 4) has 2 fields; expected 3 like the header ['id', 'video', 'caption']"
    )
    assert "row 5 (line 7) has 4 fields" in problems[5].message


def test_tsv(tmp_path):
    path = tmp_path / "m.tsv"
    path.write_text('id\tvideo\tcaption\n1\ta.mp4\thas, commas\n2\tb.mp4\t"quoted\ttab"\n3\tc.mp4\n')
    result = rows(path)
    assert good(result) == [
        (1, {"id": "1", "video": "a.mp4", "caption": "has, commas"}),
        (2, {"id": "2", "video": "b.mp4", "caption": "quoted\ttab"}),
    ]
    assert [n for n, _ in bad(result)] == [3]


def test_csv_header_only_and_empty(tmp_path):
    (tmp_path / "h.csv").write_text("id,video\n")
    (tmp_path / "e.csv").write_text("")
    assert rows(tmp_path / "h.csv") == [] and rows(tmp_path / "e.csv") == []


def test_csv_header_not_utf8_is_unreadable(tmp_path):
    path = tmp_path / "l.csv"
    path.write_bytes("id,caf\xe9\n1,x\n".encode("latin-1"))
    with pytest.raises(UnreadableFile, match=r"l.csv: the header \(line 1\) is not UTF-8"):
        rows(path)


def test_csv_row_not_utf8_costs_that_row_only(tmp_path):
    path = tmp_path / "l.csv"
    path.write_bytes(b'id,caption\n1,ok\n2,"caf\xe9\nsecond line"\n3,fine\n')
    result = rows(path)
    assert good(result) == [(1, {"id": "1", "caption": "ok"}), (3, {"id": "3", "caption": "fine"})]
    [(number, problem)] = bad(result)
    assert number == 2 and problem.error_type == "BadEncoding"
    assert problem.message.startswith("l.csv: row 2 (line 3) is not UTF-8 text")


# --- parquet ---------------------------------------------------------------------------------


def test_parquet_multiple_row_groups(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"id": [f"r{i}" for i in range(2500)], "video": [f"{i}.mp4" for i in range(2500)]})
    path = tmp_path / "m.parquet"
    pq.write_table(table, path, row_group_size=1000)
    assert pq.ParquetFile(path).num_row_groups == 3
    result = rows(path)
    assert len(result) == 2500
    assert result[0] == (1, {"id": "r0", "video": "0.mp4"})
    assert result[-1] == (2500, {"id": "r2499", "video": "2499.mp4"})
    assert [n for n, _ in result] == list(range(1, 2501))


def test_parquet_garbage_is_unreadable(tmp_path):
    path = tmp_path / "g.parquet"
    path.write_bytes(b"PAR1 this is not parquet at all")
    with pytest.raises(UnreadableFile, match="g.parquet: not a readable Parquet file"):
        rows(path)


# --- raw videos and missing files --------------------------------------------------------------


def test_raw_video_is_one_record(tmp_path):
    path = tmp_path / "clip.mp4"
    path.write_bytes(b"anything")
    assert list(read_rows(path, "video", "clip_path", display_name="My Clip.mp4")) == [
        (1, {"clip_path": "My Clip.mp4"})
    ]


def test_missing_file_is_unreadable(tmp_path):
    with pytest.raises(UnreadableFile, match="gone.jsonl: cannot read the file"):
        rows(tmp_path / "gone.jsonl", "jsonl")
