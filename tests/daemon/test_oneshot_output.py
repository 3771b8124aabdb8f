"""What `reelflow run` prints and writes beyond the rows: absolute paths, a progress total, `_config_hash`."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from daemon.oneshot import row_total
from tests.harness import ECHO, read_jsonl, run_oneshot, write_config
from tests.stages_for_tests import ENV


def test_summary_paths_are_absolute_and_results_carry_the_config_hash(tmp_path):
    (tmp_path / "meta.jsonl").write_text("".join(json.dumps({"id": str(i), "text": "t"}) + "\n" for i in range(3)))
    config = write_config(
        tmp_path,
        {
            "meta_path": "meta.jsonl",
            "save_folder": "out",
            "steps": [{**ECHO, "config": {"fail_ids": ["1"]}}],
        },
    )
    done = run_oneshot(config, env=ENV)
    assert done.returncode == 0, done.stderr
    printed = dict(line.split(":", 1) for line in done.stdout.splitlines() if line.startswith(("results", "errors")))
    assert Path(printed["results"].strip()) == (tmp_path / "out" / "meta.jsonl").resolve()
    assert Path(printed["errors"].strip()) == (tmp_path / "out" / "meta.errors.jsonl").resolve()
    rows = read_jsonl(tmp_path / "out" / "meta.jsonl")
    assert len(rows) == 2 and all(len(row["_config_hash"]) == 12 for row in rows)


def test_row_total_is_cheap_and_right(tmp_path):
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text('{"a": 1}\n{"a": 2}\n{"a": 3}')  # no newline after the last row
    assert row_total(jsonl, "jsonl") == 3
    csv = tmp_path / "a.csv"
    csv.write_text("a,b\n1,2\n3,4\n")
    assert row_total(csv, "csv") == 2
    table = tmp_path / "a.parquet"
    pq.write_table(pa.table({"a": list(range(7))}), table)
    assert row_total(table, "parquet") == 7
    assert row_total(tmp_path / "a.json", "json") is None
