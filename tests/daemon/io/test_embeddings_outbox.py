"""The job's embeddings dataset (daemon/io/embeddings.py) as JobWriter writes and repairs it.

Crash states are made for real: a part renamed in whose result lines never came, a results
batch torn after its first line, a results path that is a directory (the append fails).
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from daemon.io.outbox import JobWriter, OutboxLayout
from daemon.io.records import Record
from stages.base import InFlight
from stages.embedding import Embedding
from tests.harness import read_jsonl

DIM = 8


def record(n: int, vector: bool = True) -> Record:
    rec = Record(id=f"r{n}", job="job", row_number=n, row={"id": f"r{n}"}, fields={}, key=f"r{n}")
    if vector:
        rec.outputs["embedding"] = Embedding.of(np.full(DIM, n, np.float32))
        rec.outputs["_frames"] = InFlight(np.zeros((4, DIM)))
    rec.outputs["score"] = 0.5
    return rec


def writer_for(outbox) -> JobWriter:
    paths = OutboxLayout.daemon(outbox).for_job("job")
    writer = JobWriter("job", paths, outbox)
    writer.open()
    return writer


def dataset(outbox):
    table = pq.read_table(outbox / "job.embeddings.parquet")
    return table.column("id").to_pylist(), table.column("embedding").to_pylist()


def test_vectors_go_to_parquet_and_lines_hold_their_row(tmp_path):
    writer = writer_for(tmp_path)
    writer.write_results([record(0), record(1, vector=False), record(2)])
    writer.write_results([record(3)])
    writer.close()
    lines = read_jsonl(tmp_path / "job.jsonl")
    ids, vectors = dataset(tmp_path)
    assert ids == ["r0", "r2", "r3"]
    for line in lines:
        assert "embedding" not in line and "_frames" not in line and line["score"] == 0.5
        if line["id"] == "r1":
            assert "embedding_index" not in line
        else:
            row = line["embedding_index"]
            assert ids[row] == line["id"] and vectors[row] == [float(line["id"][1:])] * DIM
    assert b'embedding": [' not in (tmp_path / "job.jsonl").read_bytes()


def test_filtered_and_intermediate_lines_leave_vectors_out(tmp_path):
    from stages.base import Filtered

    writer = writer_for(tmp_path)
    dropped = record(5)
    dropped.filtered = Filtered("near duplicate", {"similarity": 1.0})
    writer.write_filtered([(dropped, "step_1")])
    writer.write_intermediate("step_0_VideoEmbedder_CLIPEmbedder", [record(6)])
    writer.close()
    [line] = read_jsonl(tmp_path / "job.filtered.jsonl")
    assert "embedding" not in line["record"] and "_frames" not in line["record"]
    [step] = read_jsonl(tmp_path / "intermediate" / "job" / "step_0_VideoEmbedder_CLIPEmbedder.jsonl")
    assert "embedding" not in step and "embedding_index" not in step
    assert not (tmp_path / "job.embeddings.parquet").exists()


def test_a_part_whose_lines_never_came_is_removed_on_open(tmp_path):
    writer = writer_for(tmp_path)
    writer.write_results([record(0), record(1)])
    # the crash: the next batch's part is durable, its lines were never written
    writer.embeddings.append(["r2", "r3"], {"embedding": [np.zeros(DIM), np.ones(DIM)]})
    assert dataset(tmp_path)[0] == ["r0", "r1", "r2", "r3"]
    writer = writer_for(tmp_path)  # the restart
    assert dataset(tmp_path)[0] == ["r0", "r1"]
    writer.write_results([record(2), record(3)])  # the re-run batch
    writer.close()
    ids, _ = dataset(tmp_path)
    assert ids == ["r0", "r1", "r2", "r3"]
    assert {line["id"]: line["embedding_index"] for line in read_jsonl(tmp_path / "job.jsonl")} == {
        "r0": 0,
        "r1": 1,
        "r2": 2,
        "r3": 3,
    }


def test_a_torn_results_batch_cuts_its_part_to_the_lines_written(tmp_path):
    writer = writer_for(tmp_path)
    writer.write_results([record(0)])
    writer.close()
    writer.embeddings.append(["r1", "r2", "r3"], {"embedding": [np.ones(DIM)] * 3})
    with open(tmp_path / "job.jsonl", "ab") as handle:  # r1's line whole, r2's torn mid-way
        handle.write(json.dumps({"id": "r1", "embedding_index": 1}).encode() + b"\n" + b'{"id": "r2", "emb')
    (tmp_path / "job.embeddings.parquet" / ".part-00000009.parquet.tmp").write_bytes(b"PAR1 half")
    writer = writer_for(tmp_path)
    ids, _ = dataset(tmp_path)
    assert ids == ["r0", "r1"]
    assert not list((tmp_path / "job.embeddings.parquet").glob(".*.tmp"))
    writer.write_results([record(2), record(3)])
    writer.close()
    lines = read_jsonl(tmp_path / "job.jsonl")
    ids, _ = dataset(tmp_path)
    assert [line["id"] for line in lines] == ids == ["r0", "r1", "r2", "r3"]
    assert [line["embedding_index"] for line in lines] == [0, 1, 2, 3]


def test_a_failed_results_append_leaves_no_rows_and_the_retry_writes_them_once(tmp_path):
    writer = writer_for(tmp_path)
    writer.write_results([record(0)])
    writer.close()
    (tmp_path / "job.jsonl").rename(tmp_path / "kept.jsonl")
    (tmp_path / "job.jsonl").mkdir()  # a directory where the results file should be
    with pytest.raises(OSError) as failed:
        writer.write_results([record(1), record(2)])
    assert str(tmp_path / "job.jsonl") in str(failed.value)
    assert dataset(tmp_path)[0] == ["r0"]
    (tmp_path / "job.jsonl").rmdir()
    (tmp_path / "kept.jsonl").rename(tmp_path / "job.jsonl")
    writer.write_results([record(1), record(2)])
    writer.close()
    assert dataset(tmp_path)[0] == ["r0", "r1", "r2"]
    assert [line["embedding_index"] for line in read_jsonl(tmp_path / "job.jsonl")] == [0, 1, 2]


def test_one_shot_writes_the_dataset_beside_the_final_results(tmp_path):
    layout = OutboxLayout.one_shot(tmp_path / "base", tmp_path / "save")
    assert layout.for_job("meta").embeddings == tmp_path / "save" / "meta.embeddings.parquet"


def test_close_compacts_the_parts_keeping_every_row_and_index(tmp_path):
    writer = writer_for(tmp_path)
    for n in range(0, 12, 2):
        writer.write_results([record(n), record(n + 1)])
    folder = tmp_path / "job.embeddings.parquet"
    assert len(list(folder.glob("part-*.parquet"))) == 6
    writer.close()
    assert [p.name for p in folder.iterdir()] == ["part-00000000.parquet"]
    ids, vectors = dataset(tmp_path)
    assert ids == [f"r{n}" for n in range(12)] and vectors[5] == [5.0] * DIM
    # a later run of the job appends after the compacted rows, and compacts again
    writer = writer_for(tmp_path)
    writer.write_results([record(12)])
    writer.write_results([record(13)])
    writer.close()
    ids, _ = dataset(tmp_path)
    assert ids == [f"r{n}" for n in range(14)]
    assert [line["embedding_index"] for line in read_jsonl(tmp_path / "job.jsonl")] == list(range(14))


def test_a_crash_mid_compaction_leaves_no_row_twice(tmp_path):
    import shutil

    writer = writer_for(tmp_path)
    for n in range(4):
        writer.write_results([record(n)])
    folder = tmp_path / "job.embeddings.parquet"
    saved = tmp_path / "saved"
    shutil.copytree(folder, saved)
    writer.close()  # compacts; then put the covered parts back, as a crash before their removal leaves them
    for part in sorted(saved.glob("part-*.parquet"))[1:]:
        shutil.copy(part, folder / part.name)
    assert len(dataset(tmp_path)[0]) == 7  # without the repair a reader would see rows twice
    writer = writer_for(tmp_path)
    assert dataset(tmp_path)[0] == ["r0", "r1", "r2", "r3"]
    writer.write_results([record(4)])
    assert sorted(p.name for p in folder.glob("part-*.parquet")) == ["part-00000000.parquet", "part-00000004.parquet"]
    writer.close()
    assert dataset(tmp_path)[0] == [f"r{n}" for n in range(5)]
