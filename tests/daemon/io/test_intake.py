"""Row checks: ids, duplicates, required fields and types, safe paths, resume skips."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from daemon.io.intake import RowChecker, RowRules
from daemon.io.readers import RowProblem
from daemon.io.records import IdSet, duplicate_key, unreadable_row_key


@pytest.fixture
def root(tmp_path) -> Path:
    root = tmp_path / "meta"
    (root / "sub").mkdir(parents=True)
    for name in ("a.mp4", "sub/b.mp4"):
        (root / name).write_bytes(b"x")
    (tmp_path / "secret.mp4").write_bytes(b"x")
    return root.resolve()


def checker(root: Path, done: IdSet | None = None, required=None) -> RowChecker:
    rules = RowRules(
        required={"video": "video"} if required is None else required,
        path_keys=frozenset({"video", "image"}),
        roots=(root,),
        base=root,
    )
    return RowChecker("job", "m.jsonl", rules, done or IdSet(), root / "media")


@pytest.mark.parametrize(
    ("row", "number", "expected"),
    [
        ({"id": "abc"}, 1, "abc"),
        ({"id": 7}, 1, "7"),
        ({"id": 3.0}, 1, "3"),  # a float id from a parquet/json column of whole numbers
        ({"id": 2.5}, 1, "2.5"),
        ({"id": ""}, 4, "4"),  # empty: the row number
        ({"id": None}, 5, "5"),
        ({}, 6, "6"),
    ],
)
def test_record_ids(root, row, number, expected):
    checked = checker(root, required={}).check(number, row)
    assert checked.problem is None
    assert checked.record.id == expected == checked.record.key
    assert checked.record.fields["id"] == expected
    assert checked.record.fields["_job"] == "job" and checked.record.fields["_media_dir"] == root / "media"
    assert checked.record.row == row  # the input row is kept as read, for the result line


def test_duplicates_within_a_file(root):
    c = checker(root)
    assert c.check(1, {"id": "x", "video": "a.mp4"}).problem is None
    second = c.check(2, {"id": "x", "video": "a.mp4"})
    third = c.check(5, {"id": "x", "video": "sub/b.mp4"})
    for checked, row in ((second, 2), (third, 5)):
        assert checked.problem.error_type == "DuplicateId"
        assert checked.problem.message.startswith(f"m.jsonl: row {row}: id 'x' was already used by an earlier row")
        assert checked.record.key == duplicate_key("x", row)
    # an explicit id that equals another row's row-number id is a duplicate too
    assert c.check(3, {"video": "a.mp4"}).record.id == "3"
    assert c.check(4, {"id": 3, "video": "a.mp4"}).problem.error_type == "DuplicateId"


@pytest.mark.parametrize(
    ("row", "error_type", "fragment"),
    [
        ({"id": 1}, "MissingField", "missing required field 'video' (video); present fields: ['id']"),
        ({"id": 1, "video": ""}, "MissingField", "missing required field 'video'"),
        ({"id": 1, "video": None}, "MissingField", "missing required field 'video'"),
        ({"id": 1, "video": 42}, "WrongType", "field 'video' is a int; expected a string (video)"),
        ({"id": 1, "video": ["a.mp4"]}, "WrongType", "field 'video' is a list"),
        ({"id": 1, "video": "nope.mp4"}, "FileNotFound", "field 'video': file not found: "),
        ({"id": 1, "video": "sub"}, "NotAFile", "sub is a directory, not a regular file"),  # not a video
    ],
)
def test_required_field_problems(root, row, error_type, fragment):
    checked = checker(root).check(9, row)
    assert checked.problem.error_type == error_type
    assert checked.problem.message.startswith("m.jsonl: row 9: ")
    assert fragment in checked.problem.message


def test_a_named_pipe_as_a_video_is_refused_before_a_decoder_waits_on_it(root):
    # A decoder opening a FIFO blocks until something writes to it: for ever, in a prep thread.
    os.mkfifo(root / "pipe.mp4")
    checked = checker(root).check(9, {"id": 1, "video": "pipe.mp4"})
    assert checked.problem.error_type == "NotAFile"
    assert f"field 'video': {root / 'pipe.mp4'} is a named pipe (FIFO), not a regular file" in checked.problem.message


def test_paths_resolve_under_the_root(root):
    c = checker(root)
    ok = c.check(1, {"video": "sub/../a.mp4", "image": "sub/b.mp4"})
    assert ok.problem is None
    assert ok.record.fields["video"] == root / "a.mp4"
    assert ok.record.fields["image"] == root / "sub" / "b.mp4"  # optional path keys resolve too
    assert ok.record.row["video"] == "sub/../a.mp4"
    inside_absolute = c.check(2, {"video": str(root / "a.mp4")})
    assert inside_absolute.problem is None


def test_optional_path_key_is_not_required_to_exist_but_must_stay_inside(root):
    c = checker(root)
    assert c.check(1, {"video": "a.mp4", "image": "not-yet.png"}).problem is None
    out = c.check(2, {"video": "a.mp4", "image": "../secret.mp4"})
    assert out.problem.error_type == "PathOutsideRoot"


@pytest.mark.parametrize("value", ["../secret.mp4", "sub/../../secret.mp4", "/etc/passwd", "SECRET_ABS"])
def test_path_traversal_is_refused(root, value):
    value = str(root.parent / "secret.mp4") if value == "SECRET_ABS" else value
    checked = checker(root).check(3, {"id": "t", "video": value})
    assert checked.problem.error_type == "PathOutsideRoot"
    message = checked.problem.message
    assert message.startswith(f"m.jsonl: row 3: field 'video' = {value!r} points outside the allowed folders")
    assert str(root) in message and "must stay under meta_folder" in message


def test_symlink_escaping_the_root_is_refused(root):
    os.symlink(root.parent / "secret.mp4", root / "link.mp4")
    os.symlink(root.parent, root / "up")
    os.symlink(root / "a.mp4", root / "inner.mp4")
    c = checker(root)
    assert c.check(1, {"video": "link.mp4"}).problem.error_type == "PathOutsideRoot"
    assert c.check(2, {"video": "up/secret.mp4"}).problem.error_type == "PathOutsideRoot"
    inner = c.check(3, {"video": "inner.mp4"})
    assert inner.problem is None and inner.record.fields["video"] == root / "a.mp4"


def test_row_problems_become_records_that_fail(root):
    checked = checker(root).check(4, RowProblem("m.jsonl: line 4 is not valid JSON", "BadJson"))
    assert checked.problem.error_type == "BadJson"
    assert checked.record.id is None and checked.record.key == unreadable_row_key(4)
    assert checked.record.row_number == 4


def test_resume_skips_what_was_written(root):
    done = IdSet()
    for key in ("a", duplicate_key("a", 2), unreadable_row_key(3)):
        done.add(key)
    c = checker(root, done)
    assert c.check(1, {"id": "a", "video": "a.mp4"}) is None  # in results already
    assert c.check(2, {"id": "a", "video": "a.mp4"}) is None  # its duplicate is in errors already
    assert c.check(3, RowProblem("broken", "BadJson")) is None
    assert c.check(4, {"id": "a", "video": "a.mp4"}).problem.error_type == "DuplicateId"  # not written yet
    assert c.check(5, {"id": "b", "video": "a.mp4"}).problem is None


def test_idset_large_and_no_false_negatives():
    ids = IdSet()
    for n in range(50_000):
        assert ids.add(f"id-{n}")
    assert len(ids) == 50_000
    assert all(f"id-{n}" in ids for n in range(0, 50_000, 7))
    assert not any(f"other-{n}" in ids for n in range(1000))
    assert not ids.add("id-123")
    assert len(ids) == 50_000
