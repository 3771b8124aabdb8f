"""Seeded sampling is reproducible when several captioner workers share a process (and a device)."""

from __future__ import annotations

import copy
from concurrent.futures import ThreadPoolExecutor

import pytest

from daemon.demo import encode_clip
from daemon.demo.tiny_qwen2vl import build_qwen2_vl
from stages.registry import stage_class
from tests.stages.captioners.conftest import TINY_CONFIG, record


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    root = tmp_path_factory.mktemp("seed-threads")
    return build_qwen2_vl(root / "qwen"), encode_clip(root / "clip.mp4", seed=1)


def test_seeded_captions_do_not_depend_on_other_workers(qwen):
    folder, video = qwen
    cls = stage_class("VideoCaptioner", "Qwen2VLCaptioner")

    def make(seed):
        settings = {
            **TINY_CONFIG,
            "model_path": str(folder),
            "backend": "transformers",
            "num_frames": 2,
            "max_new_tokens": 16,
        }
        stage = cls(cls.Config(**settings, temperature=1.0, top_k=0, seed=seed), "cpu")
        stage.load()
        return stage

    seeded, other_seeded, unseeded = make(7), make(7), make(None)
    prepared = seeded.prepare(record(video))
    (alone,) = seeded.process([copy.copy(prepared)])
    assert alone["text"]  # a caption of random tokens, but a caption
    # Unseeded sampling on the same device between two seeded calls must not move them.
    with ThreadPoolExecutor(3) as pool:
        runs = list(pool.map(lambda s: s.process([copy.copy(prepared)])[0], [seeded, unseeded, other_seeded] * 4))
    seeded_runs = [run for n, run in enumerate(runs) if n % 3 != 1]
    assert all(run["text"] == alone["text"] for run in seeded_runs), {r["text"] for r in seeded_runs}
    unseeded_texts = {run["text"] for n, run in enumerate(runs) if n % 3 == 1}
    assert len(unseeded_texts) > 1  # unseeded sampling still samples
    for stage in (seeded, other_seeded, unseeded):
        stage.close()
