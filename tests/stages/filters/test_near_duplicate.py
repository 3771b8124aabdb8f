"""NearDuplicateFilter called directly (load/process) on embeddings built here, and after kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from stages.base import Filtered, StageError
from stages.filters.near_duplicate import NearDuplicateFilter, NearDuplicateFilterConfig
from stages.registry import stage_class
from tests.harness import REPO

DIM = 16


def _stage(tmp_path: Path, **config) -> NearDuplicateFilter:
    stage = NearDuplicateFilter(NearDuplicateFilterConfig(**config), "cpu")
    stage.load()
    return stage


def _record(rid: str, vector, job: str = "j", media: Path | None = None) -> dict:
    return {"id": rid, "_job": job, "_media_dir": media or Path("/nonexistent/media"), "embedding": list(vector)}


@pytest.fixture
def vectors():
    rng = np.random.default_rng(0)
    return rng.standard_normal((6, DIM)).astype(np.float32)


def test_registered():
    assert stage_class("VideoFilter", "NearDuplicateFilter") is NearDuplicateFilter


def test_near_copy_filtered_naming_kept_id_and_different_kept(tmp_path, vectors):
    stage = _stage(tmp_path, state_dir=tmp_path / "state")
    near = vectors[0] + 0.01 * np.random.default_rng(1).standard_normal(DIM)
    out = stage.process([_record("a", vectors[0]), _record("b", vectors[1])])
    assert out == [{}, {}]
    out = stage.process([_record("c", near), _record("d", vectors[2])])
    assert isinstance(out[0], Filtered) and out[1] == {}
    assert out[0].scores["duplicate_of"] == "a"
    assert 0.95 <= out[0].scores["similarity"] <= 1.0
    assert "'a'" in out[0].reason and str(out[0].scores["similarity"]) in out[0].reason


def test_within_one_batch_later_duplicates_earlier(tmp_path, vectors):
    stage = _stage(tmp_path, state_dir=tmp_path / "state")
    out = stage.process([_record("a", vectors[0]), _record("b", vectors[0] * 3.0), _record("c", vectors[1])])
    assert out[0] == {} and out[2] == {}
    assert isinstance(out[1], Filtered) and out[1].scores["duplicate_of"] == "a"


def test_scope_job_vs_outbox(tmp_path, vectors):
    job = _stage(tmp_path, scope="job", state_dir=tmp_path / "job")
    assert job.process([_record("a", vectors[0], job="one"), _record("b", vectors[0], job="two")]) == [{}, {}]
    outbox = _stage(tmp_path, scope="outbox", state_dir=tmp_path / "outbox")
    out = outbox.process([_record("a", vectors[0], job="one"), _record("b", vectors[0], job="two")])
    assert out[0] == {} and isinstance(out[1], Filtered) and out[1].scores["duplicate_of"] == "a"


def test_default_state_dir_is_beside_media(tmp_path, vectors):
    media = tmp_path / "outbox" / "media" / "j"
    stage = _stage(tmp_path)
    stage.process([_record("a", vectors[0], media=media)])
    assert (media.parent / ".near_duplicate" / "job-j.kept").stat().st_size > 0


def test_restart_replays_decisions_of_a_batch_already_written(tmp_path, vectors):
    state = tmp_path / "state"
    batch = [_record("a", vectors[0]), _record("b", vectors[0] + 1e-3), _record("c", vectors[1])]
    first = _stage(tmp_path, state_dir=state).process(batch)
    # a new instance over the same state: the batch is re-run as after a crash before the results were written
    again = _stage(tmp_path, state_dir=state).process(batch)
    assert again == first
    assert first[0] == {} and isinstance(first[1], Filtered) and first[2] == {}
    # and the rebuilt index still drops a new copy of a kept one
    later = _stage(tmp_path, state_dir=state).process([_record("d", vectors[1] * 2)])
    assert isinstance(later[0], Filtered) and later[0].scores["duplicate_of"] == "c"


def test_torn_tail_is_cut_and_appends_continue(tmp_path, vectors):
    state = tmp_path / "state"
    _stage(tmp_path, state_dir=state).process([_record("a", vectors[0])])
    path = state / "job-j.kept"
    size = path.stat().st_size
    with open(path, "ab") as f:  # half a frame, as a crash mid-write leaves it
        f.write(b"\x01\x05\x00\x00\x00\xff")
    stage = _stage(tmp_path, state_dir=state)
    out = stage.process([_record("b", vectors[0]), _record("c", vectors[1])])
    assert isinstance(out[0], Filtered) and out[1] == {}
    assert path.stat().st_size > size
    assert _stage(tmp_path, state_dir=state).process([_record("c", vectors[1])]) == [{}]


def test_ivf_beyond_exact_up_to_still_finds_copies(tmp_path):
    rng = np.random.default_rng(3)
    base = rng.standard_normal((300, DIM)).astype(np.float32)
    stage = _stage(tmp_path, state_dir=tmp_path / "s", exact_up_to=100, nlist=4, nprobe=4)
    assert all(r == {} for r in stage.process([_record(f"v{i}", v) for i, v in enumerate(base[:200])]))
    assert type(stage._scopes[tmp_path / "s" / "job-j.kept"].index.index).__name__ == "IndexIVFScalarQuantizer"
    out = stage.process([_record("copy", base[150] + 1e-3)])
    assert isinstance(out[0], Filtered) and out[0].scores["duplicate_of"] == "v150"


def test_bad_embeddings_are_record_errors(tmp_path, vectors):
    stage = _stage(tmp_path, state_dir=tmp_path / "s")
    npy = tmp_path / "e.npy"
    np.save(npy, vectors[3])
    out = stage.process(
        [
            {"id": "none", "_job": "j"},
            _record("zero", np.zeros(DIM)),
            {"id": "missing", "_job": "j", "embedding": str(tmp_path / "nope.npy")},
            {"id": "file", "_job": "j", "embedding": str(npy)},
            _record("short", vectors[0][:4]),
        ]
    )
    assert [type(r).__name__ for r in out] == ["StageError", "StageError", "StageError", "dict", "StageError"]
    assert isinstance(out[0], StageError) and "embedding" in out[0].message
    assert "norm" in out[1].message and "nope.npy" in out[2].message and "dimensions" in out[4].message


@pytest.mark.parametrize(
    "bad", [{"threshold": 0}, {"threshold": 1.5}, {"scope": "daemon"}, {"nprobe": 8, "nlist": 4}, {"exact_up_to": 0}]
)
def test_bad_config_refused(bad):
    with pytest.raises(ValidationError):
        NearDuplicateFilterConfig(**bad)


RUNNER = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path
    import numpy as np
    from stages.filters.near_duplicate import NearDuplicateFilter, NearDuplicateFilterConfig

    state, results, stop_after = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    rng = np.random.default_rng(7)
    base = rng.standard_normal((40, 16))
    stream = []
    for i in range(60):  # every third record a near copy of an earlier one
        v = base[i % 40] if i < 40 or i % 3 else base[i % 40] + 0.01 * rng.standard_normal(16)
        stream.append({"id": f"r{i}", "_job": "j", "embedding": v.tolist()})
    done = set()
    if results.exists():
        done = {json.loads(line)["id"] for line in results.read_text().splitlines()}
    stage = NearDuplicateFilter(NearDuplicateFilterConfig(state_dir=state), "cpu")
    stage.load()
    todo = [r for r in stream if r["id"] not in done]
    for n, start in enumerate(range(0, len(todo), 7)):
        batch = todo[start : start + 7]
        out = stage.process(batch)
        if n == stop_after:  # the state is fsynced, the results are not: the worst moment to die
            print("STATE_WRITTEN", flush=True)
            sys.stdin.readline()
        with open(results, "a") as f:
            for record, decision in zip(batch, out):
                line = {"id": record["id"], "dup": getattr(decision, "scores", {}).get("duplicate_of")}
                f.write(json.dumps(line) + "\\n")
            f.flush()
            os.fsync(f.fileno())
    """
)


def _run(tmp_path: Path, name: str, stop_after: int) -> dict[str, str | None]:
    script = tmp_path / "runner.py"
    script.write_text(RUNNER)
    results = tmp_path / f"{name}.jsonl"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = [sys.executable, str(script), str(tmp_path / f"{name}-state"), str(results)]
    if stop_after >= 0:
        child = subprocess.Popen([*args, str(stop_after)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        assert child.stdout.readline().strip() == b"STATE_WRITTEN"
        child.send_signal(signal.SIGKILL)
        child.wait()
        assert child.returncode == -signal.SIGKILL
    subprocess.run([*args, "-1"], check=True, env=env, timeout=120)
    decisions = [json.loads(line) for line in results.read_text().splitlines()]
    assert len({d["id"] for d in decisions}) == len(decisions) == 60
    return {d["id"]: d["dup"] for d in decisions}


def test_kill_9_then_rerun_decides_as_an_uninterrupted_run(tmp_path):
    straight = _run(tmp_path, "straight", -1)
    assert sum(v is not None for v in straight.values()) > 0
    for stop in (0, 4):  # the first batch, and one mid-stream
        assert _run(tmp_path, f"killed{stop}", stop) == straight, f"killed after batch {stop}"


def test_restart_past_ivf_rebuilds_decides_as_an_uninterrupted_run(tmp_path):
    """nlist auto rebuilds the IVF at each doubling of exact_up_to; a restart builds it at once
    from the state file and must still keep and drop what the uninterrupted run did."""
    rng = np.random.default_rng(7)
    base = rng.standard_normal((900, DIM)).astype(np.float32)
    base[5::9] = base[0::9] + 0.01 * rng.standard_normal((100, DIM)).astype(np.float32)  # near copies
    batches = [[_record(f"v{i}", base[i]) for i in range(s, s + 100)] for s in range(0, 900, 100)]
    straight = _stage(tmp_path, state_dir=tmp_path / "straight", exact_up_to=64, nprobe=4)
    want = [repr(d) for b in batches for d in straight.process(b)]
    index = straight._scopes[tmp_path / "straight" / "job-j.kept"].index
    assert type(index.index).__name__ == "IndexIVFScalarQuantizer" and index.trained_on(index.ntotal) == 512
    assert sum("near duplicate" in d for d in want) >= 90
    for stop in (2, 6):
        state = tmp_path / f"killed{stop}"
        first = _stage(tmp_path, state_dir=state, exact_up_to=64, nprobe=4)
        got = [repr(d) for b in batches[:stop] for d in first.process(b)]
        again = _stage(tmp_path, state_dir=state, exact_up_to=64, nprobe=4)  # as after kill -9
        replayed = [repr(d) for d in again.process(batches[stop - 1])]  # the last batch, re-run
        assert replayed == got[-100:]
        got += [repr(d) for b in batches[stop:] for d in again.process(b)]
        assert got == want, f"restarted after batch {stop}"


def _write_outbox_job(outbox: Path, job: str, vectors: dict[str, np.ndarray]) -> None:
    """Results of an earlier run, written by the daemon's own JobWriter (vectors in <job>.embeddings.parquet)."""
    from daemon.io.outbox import JobWriter, OutboxLayout
    from daemon.io.records import Record
    from stages.embedding import Embedding

    writer = JobWriter(job, OutboxLayout.daemon(outbox).for_job(job), outbox)
    writer.open()
    records = []
    for rid, vector in vectors.items():
        record = Record(id=rid, job=job, row_number=1, row={"id": rid}, fields={}, key=rid)
        record.outputs["embedding"] = Embedding.of(vector)
        records.append(record)
    writer.write_results(records)
    writer.close()


def test_outbox_scope_starts_from_the_embeddings_already_in_the_outbox(tmp_path, vectors):
    from stages.base import OUTBOX_DIR
    from stages.filters.near_duplicate import read_vectors

    outbox = tmp_path / "outbox"
    _write_outbox_job(outbox, "earlier", {"a": vectors[0], "b": vectors[1]})
    ids, rows = read_vectors(outbox / "earlier.embeddings.parquet", "embedding")
    assert ids == ["a", "b"] and rows.shape == (2, DIM)
    stage = _stage(tmp_path, scope="outbox", state_dir=tmp_path / "state")

    def rec(rid, vector, job="now"):
        return {**_record(rid, vector, job=job), OUTBOX_DIR: outbox}

    out = stage.process([rec("a", vectors[0] * 2), rec("x", vectors[2]), rec("y", vectors[1] + 1e-3)])
    assert out[1] == {}
    for dropped, original in ((out[0], "a"), (out[2], "b")):
        assert isinstance(dropped, Filtered)
        assert dropped.scores["duplicate_of"] == original and dropped.scores["duplicate_of_job"] == "earlier"
    # scope: job reads only the record's own job's dataset
    job_stage = _stage(tmp_path, scope="job", state_dir=tmp_path / "job-state")
    assert job_stage.process([rec("a", vectors[0])]) == [{}]
    assert isinstance(job_stage.process([rec("z", vectors[1], job="earlier")])[0], Filtered)


def test_same_id_in_two_jobs_is_two_records_in_outbox_scope(tmp_path, vectors):
    stage = _stage(tmp_path, scope="outbox", state_dir=tmp_path / "state")
    assert stage.process([_record("1", vectors[0], job="one")]) == [{}]
    # row-number ids repeat across jobs: job two's "1" is not job one's "1" replayed
    assert stage.process([_record("1", vectors[1], job="two")]) == [{}]
    again = stage.process([_record("2", vectors[1], job="three")])
    assert isinstance(again[0], Filtered) and again[0].scores == {
        "similarity": again[0].scores["similarity"],
        "duplicate_of": "1",
        "duplicate_of_job": "two",
    }
