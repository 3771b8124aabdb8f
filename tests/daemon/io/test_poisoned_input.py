"""A poisoned row costs that row alone: each one ends as one error line naming the file and the row,
every other row is processed, and a second run over the same outbox skips them all (resume keys)."""

from __future__ import annotations

import json

import pytest

from daemon.config import parse_config
from daemon.io.outbox import OutboxLayout
from daemon.io.readers import RowProblem, read_rows
from daemon.metrics import Metrics
from daemon.runtime.engine import Engine, JobInput
from tests.harness import ECHO, DaemonProcess, daemon_config, read_jsonl
from tests.stages_for_tests import ENV

pytestmark = pytest.mark.timeout(120)

CONFIG = "steps:\n  - {type: Test, name: Echo, config: {needs: {video: video}}}\n"


async def _run(tmp_path, name: str, fmt: str):
    engine = Engine(parse_config(CONFIG), OutboxLayout.daemon(tmp_path / "out"), Metrics())
    await engine.start()
    try:
        return await engine.run_job(JobInput("m", tmp_path / name, fmt, name, tmp_path))
    finally:
        await engine.stop()


def _poisoned_jsonl(tmp_path) -> dict[int, str]:
    """Good rows around every kind of poison; returns {line: what its message must say}."""
    (tmp_path / "ok.mp4").write_bytes(b"not decoded by Echo")
    good = json.dumps({"id": "good-{}", "video": "ok.mp4"})
    poison = {
        2: ('{"id": "big", "video": "ok.mp4", "n": ' + "9" * 5000 + "}", "5000 digits"),
        4: ('{"id": "deep", "video": "ok.mp4", "x": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply"),
        6: (json.dumps({"id": "nul", "video": "ok\x00.mp4"}), "embedded null byte"),
        8: (json.dumps({"id": "long", "video": "v" * 300 + ".mp4"}), "File name too long"),
        10: (json.dumps({"id": "huge", "video": "d/" * 5000 + "x.mp4"}), "File name too long"),
        12: (json.dumps({"id": {"a": 1}, "video": "ok.mp4"}), "field 'id' is a dict"),
        14: (json.dumps({"id": "wide", "video": "ok.mp4", "n": 2**64}), "fits in 64 bits"),
        16: ('{"id": "nest300", "video": "ok.mp4", "x": ' + "[" * 300 + "]" * 300 + "}", "more than 200 levels"),
    }
    lines = []
    for number in range(1, 19):
        lines.append(poison[number][0] if number in poison else good.replace("{}", str(number)))
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    return {number: said for number, (_, said) in poison.items()}


async def test_each_poisoned_jsonl_row_is_one_error_line_and_the_rest_runs(tmp_path):
    expected = _poisoned_jsonl(tmp_path)
    run = await _run(tmp_path, "m.jsonl", "jsonl")
    assert (run.ok, run.errors) == (18 - len(expected), len(expected))
    results = read_jsonl(tmp_path / "out" / "m.jsonl")
    assert sorted(r["id"] for r in results) == sorted(f"good-{n}" for n in range(1, 19) if n not in expected)
    errors = {e["row"]: e for e in read_jsonl(tmp_path / "out" / "m.errors.jsonl")}
    assert sorted(errors) == sorted(expected)
    for row, said in expected.items():
        message = errors[row]["message"]
        assert message.startswith("m.jsonl: ") and (f"line {row}" in message or f"row {row}" in message), message
        assert said in message, message
        assert "expected" in message, message
        assert len(message) < 600, f"a 10 kB path must not be repeated whole: {len(message)} characters"
    # Rows with no readable id carry their row number as id (an int); the rest keep theirs.
    assert errors[2]["id"] == 2 and errors[4]["id"] == 4 and errors[12]["id"] == 12
    assert errors[6]["id"] == "nul" and errors[8]["id"] == "long"

    again = await _run(tmp_path, "m.jsonl", "jsonl")  # resume: every row is already settled
    assert (again.ok, again.errors, again.skipped) == (0, 0, 18)
    assert len(read_jsonl(tmp_path / "out" / "m.errors.jsonl")) == len(expected)


def _delimited(path, delimiter: str, rows: int, bad_row: int) -> None:
    lines = [f"id{delimiter}video{delimiter}caption\n".encode()]
    for number in range(1, rows + 1):
        caption = b"caf\xe9" if number == bad_row else f"caption {number}".encode()
        lines.append(f"r{number}{delimiter}ok.mp4{delimiter}".encode() + caption + b"\n")
    path.write_bytes(b"".join(lines))


def test_the_reader_names_row_10001_of_20001_and_reads_on(tmp_path):
    _delimited(tmp_path / "m.csv", ",", 20001, 10001)
    rows = list(read_rows(tmp_path / "m.csv", "csv", "video"))
    problems = [(n, r) for n, r in rows if isinstance(r, RowProblem)]
    assert len(rows) == 20001 and [n for n, _ in problems] == [10001]
    assert problems[0][1].message.startswith("m.csv: row 10001 (line 10002) is not UTF-8 text")
    assert rows[-1] == (20001, {"id": "r20001", "video": "ok.mp4", "caption": "caption 20001"})


@pytest.mark.parametrize(("delimiter", "suffix"), [(",", "csv"), ("\t", "tsv")])
async def test_an_undecodable_byte_mid_file_costs_its_row_and_the_job_goes_on(tmp_path, delimiter, suffix):
    (tmp_path / "ok.mp4").write_bytes(b"x")
    name = f"m.{suffix}"
    _delimited(tmp_path / name, delimiter, 301, 151)
    run = await _run(tmp_path, name, suffix)
    assert (run.ok, run.errors) == (300, 1)
    [error] = read_jsonl(tmp_path / "out" / "m.errors.jsonl")
    assert error["row"] == 151 and error["id"] == 151 and error["error"] == "BadEncoding"
    assert error["message"].startswith(f"{name}: row 151 (line 152) is not UTF-8 text")
    results = read_jsonl(tmp_path / "out" / "m.jsonl")
    assert len(results) == 300 and "r151" not in {r["id"] for r in results}
    assert results[-1]["id"] == "r301"


async def test_poison_in_a_json_array_names_the_element(tmp_path):
    (tmp_path / "ok.mp4").write_bytes(b"x")
    text = '[{"id": "a", "video": "ok.mp4"}, {"id": "b", "video": "ok.mp4", "n": ' + "1" * 5000 + "}]"
    (tmp_path / "m.json").write_text(text)
    run = await _run(tmp_path, "m.json", "json")
    assert (run.ok, run.errors) == (1, 1)
    [error] = read_jsonl(tmp_path / "out" / "m.errors.jsonl")
    assert error["row"] == 2 and "m.json: array element 2" in error["message"] and "5000 digits" in error["message"]


def test_the_daemon_finishes_a_poisoned_file_and_keeps_serving(tmp_path):
    media = tmp_path / "media"
    media.mkdir()
    expected = _poisoned_jsonl(media)  # writes media/ok.mp4 and media/m.jsonl
    config = daemon_config(tmp_path, [{**ECHO, "config": {"needs": {"video": "video"}}}], meta_folder=media)
    with DaemonProcess(config, env=ENV) as daemon:
        daemon.drop(media / "m.jsonl", "poisoned.jsonl")
        state = daemon.wait_for_job("poisoned")
        assert (state["state"], state["ok"], state["errors"]) == ("done", 18 - len(expected), len(expected))
        assert not list((daemon.inbox / ".work").iterdir())
        daemon.drop_text("after.jsonl", json.dumps({"id": "z", "video": "ok.mp4"}) + "\n")
        assert daemon.wait_for_job("after")["ok"] == 1
        assert sorted(e["row"] for e in daemon.errors("poisoned")) == sorted(expected)
        assert "never retrieved" not in daemon.log()
