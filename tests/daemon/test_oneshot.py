"""One-shot mode: `reelflow run` / `python run_pipeline.py` through the same engine, results in the
input's own format, intermediate per-step files under base_folder, a summary, exit codes, resume."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import pytest

from daemon.io.readers import RowProblem, read_rows
from tests.harness import ECHO, PYTHON, REPO, read_jsonl, run_oneshot, write_config
from tests.stages_for_tests import ENV

pytestmark = pytest.mark.timeout(120)

ROWS = [{"id": f"r{n}", "caption": f"cap, {n}\nwith a second line"} for n in range(6)]
STEPS = [
    {**ECHO, "config": {"fail_ids": ["r3"], "batch_size": 4}},
    {**ECHO, "config": {"output_key": "echo2", "source": "caption"}},
]


def write_meta(path: Path, fmt: str, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":
        path.write_text(json.dumps(rows, indent=1))
    elif fmt in ("csv", "tsv"):
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]), delimiter="," if fmt == "csv" else "\t")
            writer.writeheader()
            writer.writerows(rows)
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=4)
    return path


def read_back(path: Path, fmt: str) -> list[dict]:
    rows = [row for _, row in read_rows(path, fmt, "video")]
    assert not any(isinstance(r, RowProblem) for r in rows), rows
    return rows


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "tsv", "parquet"])
def test_run_writes_results_in_the_input_format_and_resumes(tmp_path, fmt):
    write_meta(tmp_path / "data" / f"meta.{fmt}", fmt, ROWS)
    config = write_config(
        tmp_path,
        {"meta_path": f"data/meta.{fmt}", "base_folder": "work", "save_folder": "out", "steps": STEPS},
    )
    result = run_oneshot(config, env=ENV)
    assert result.returncode == 0, result.stderr
    assert "done: 5 ok, 1 errors, 0 filtered, 0 skipped" in result.stdout
    assert (
        f"results: {(tmp_path / 'out' / f'meta.{fmt}').resolve()}" in result.stdout
        and "meta.errors.jsonl" in result.stdout
    )

    final = tmp_path / "out" / f"meta.{fmt}"
    rows = read_back(final, fmt)
    assert [r["id"] for r in rows] == ["r0", "r1", "r2", "r4", "r5"]
    by_id = {r["id"]: r for r in rows}
    assert by_id["r4"]["caption"] == "cap, 4\nwith a second line"  # quoted newlines survive csv/tsv
    assert by_id["r4"]["echo"] == "r4" and by_id["r4"]["echo2"] == "cap, 4\nwith a second line"
    (error,) = read_jsonl(tmp_path / "out" / "meta.errors.jsonl")
    assert error["id"] == "r3" and error["step"] == "step_0_Test_Echo" and error["error"] == "Refused"
    assert error["record"] == next(r for r in read_back(tmp_path / "data" / f"meta.{fmt}", fmt) if r["id"] == "r3")
    work = tmp_path / "work"
    assert len(read_jsonl(work / "step_0_Test_Echo.jsonl")) == 5
    assert [r["echo2"] for r in read_jsonl(work / "step_1_Test_Echo.jsonl")] == [r["caption"] for r in rows]
    assert sorted(p.name for p in tmp_path.joinpath("out").iterdir()) == sorted([f"meta.{fmt}", "meta.errors.jsonl"])

    again = run_oneshot(config, env=ENV)
    assert again.returncode == 0, again.stderr
    assert "done: 0 ok, 0 errors, 0 filtered, 6 skipped" in again.stdout
    assert read_back(final, fmt) == rows
    assert len(read_jsonl(tmp_path / "out" / "meta.errors.jsonl")) == 1


def test_run_pipeline_py_with_a_seed_style_save_path_and_a_progress_bar(tmp_path, videos):
    (tmp_path / "data").mkdir()
    rows = [{"id": "bikes", "video": "bikes.mp4"}, {"id": "bad", "video": "garbage.mp4"}]
    write_meta(tmp_path / "data" / "m.csv", "csv", rows)
    config = write_config(
        tmp_path,
        {
            "meta_path": "data/m.csv",
            "meta_folder": str(videos["bikes"].parent),
            "base_folder": "work",
            "save_folder": "results/final.csv",
            "steps": [{"type": "VideoProcessor", "name": "VideoProbe"}],
        },
    )
    result = subprocess.run(
        [PYTHON, str(REPO / "run_pipeline.py"), "--config", str(config)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "done: 1 ok, 1 errors" in result.stdout
    assert "rec" in result.stderr  # the progress bar
    (row,) = read_back(tmp_path / "results" / "final.csv", "csv")
    assert row["id"] == "bikes" and json.loads(row["probe"])["num_frames"] == 250
    assert read_jsonl(tmp_path / "results" / "m.errors.jsonl")[0]["error"] == "VideoDecodeError"
    assert (tmp_path / "work" / "step_0_VideoProcessor_VideoProbe.jsonl").exists()


def test_run_on_a_single_video(tmp_path, videos):
    config = write_config(
        tmp_path,
        {
            "meta_path": str(videos["mkv"]),
            "save_folder": "out",
            "steps": [{"type": "VideoProcessor", "name": "FrameSampler", "config": {"num_frames": 3}}],
        },
    )
    result = run_oneshot(config, env=ENV)
    assert result.returncode == 0, result.stderr
    (row,) = read_jsonl(tmp_path / "out" / "bars.jsonl")
    assert row["video"] == "bars.mkv" and len(row["frames"]) == 3
    assert all((tmp_path / "out" / f).is_file() for f in row["frames"])


@pytest.mark.parametrize(
    ("config", "fragment"),
    [
        ({"save_folder": "out", "steps": [ECHO]}, "meta_path: required for `reelflow run`"),
        ({"meta_path": "nope.jsonl", "save_folder": "out", "steps": [ECHO]}, "meta_path: no such file"),
        ({"meta_path": "m.jsonl", "steps": [ECHO]}, "save_folder: required"),
        ({"meta_path": "m.txt", "save_folder": "out", "steps": [ECHO]}, "unsupported type"),
        ({"meta_path": "m.jsonl", "save_folder": ".", "steps": [ECHO]}, "which is meta_path itself"),
        ({"meta_path": "m.jsonl", "base_folder": ".", "save_folder": "o", "steps": [ECHO]}, "which is meta_path"),
        ({"meta_path": "m.jsonl", "save_folder": "out", "steps": [{"type": "Test", "name": "Ech"}]}, "Did you mean"),
    ],
)
def test_config_errors_exit_2(tmp_path, config, fragment):
    (tmp_path / "m.jsonl").write_text('{"id": 1}\n')
    (tmp_path / "m.txt").write_text("x")
    result = run_oneshot(write_config(tmp_path, config), env=ENV)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert fragment in result.stderr
    assert (tmp_path / "m.jsonl").read_text() == '{"id": 1}\n'  # the input is never touched


def test_unreadable_input_exits_1(tmp_path):
    (tmp_path / "m.json").write_text('{"not": "an array"}')
    config = write_config(tmp_path, {"meta_path": "m.json", "save_folder": "out", "steps": [ECHO]})
    result = run_oneshot(config, env=ENV)
    assert result.returncode == 1
    assert "m.json: expected a JSON array of objects" in result.stderr


@pytest.mark.parametrize("fmt", ["parquet", "csv", "json", "jsonl"])
def test_export_keeps_columns_that_only_later_rows_have(tmp_path, monkeypatch, fmt):
    from daemon import oneshot

    monkeypatch.setattr(oneshot, "PARQUET_ROWS", 4)  # several row groups, each with its own inferred types
    rows = [{"id": str(n), "a": None if n < 5 else "x", **({"late": [n, 1]} if n > 7 else {})} for n in range(12)]
    results = tmp_path / "r.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    oneshot.export_results(results, fmt, tmp_path / f"out.{fmt}")
    back = read_back(tmp_path / f"out.{fmt}", fmt)
    assert [r["id"] for r in back] == [str(n) for n in range(12)]
    late = back[-1]["late"]
    assert (json.loads(late) if fmt == "csv" else late) == [11, 1]
    assert back[0].get("late") in (None, "")
