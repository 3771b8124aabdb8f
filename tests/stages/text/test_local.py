"""The local text steps on the tiny Qwen2 model: GPTTextGenerator's `backend: transformers`
and DataFlow-Gen's LocalModelGenerator (its sampling keys honoured or refused by name)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from stages.base import StageError
from stages.engines.hf_causal import CausalLM
from stages.registry import stage_class

GPT = stage_class("TextGenerator", "GPTTextGenerator")
LOCAL = stage_class("TextGenerator", "LocalModelGenerator")

# DataFlow-Gen's examples/TextGenerator.yaml config block, as it stands (its commented keys left out).
SEED_EXAMPLE = {
    "n": 1,
    "best_of": None,
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "repetition_penalty": 1,
    "temperature": 0.7,
    "top_p": 0.9,
    "top_k": -1,
    "min_p": 0,
    "seed": None,
    "stop": None,
    "stop_token_ids": None,
    "ignore_eos": False,
    "max_tokens": 4096,
    "min_tokens": 0,
    "logprobs": None,
    "prompt_logprobs": None,
    "detokenize": True,
    "skip_special_tokens": True,
    "spaces_between_special_tokens": True,
    "logits_processors": None,
    "include_stop_str_in_output": False,
    "truncate_prompt_tokens": None,
    "allowed_token_ids": None,
    "download_dir": "ckpr/models/",
    "prompt": "You are a helpful assistant",
}

TEXTS = ["a cat", "the camera pans across a city street at night with cars and lights", "a rabbit wakes up"]


def rows(texts=TEXTS) -> list[dict]:
    return [{"id": str(i), "text": t, "_job": "t", "_media_dir": Path("/tmp")} for i, t in enumerate(texts)]


@pytest.fixture(scope="module")
def local(text_lm_dir):
    """One resident LocalModelGenerator; each test sets the keys it needs on its config."""
    stage = LOCAL(LOCAL.Config(model_path=str(text_lm_dir), temperature=0, max_tokens=8), "cpu")
    stage.load()
    baseline = stage.config.model_copy()
    yield stage
    stage.config = baseline


def run(stage, texts=TEXTS, **settings):
    stage.config = LOCAL.Config(
        **{"model_path": stage.config.model_path, "temperature": 0, "max_tokens": 8, **settings}
    )
    out = stage.process(rows(texts))
    return [o["text"] for o in out]


async def test_transformers_backend_matches_the_served_model(text_lm_dir, lm_server):
    """Same tiny model, same chat template, greedy: the batched, left-padded local answers equal
    what `transformers serve` answers one request at a time."""
    common = {"model": str(text_lm_dir), "sys_prompt": "You write prompts.", "prompt": "Rewrite:", "max_tokens": 8}
    local = GPT(GPT.Config(backend="transformers", temperature=0, **common), "cpu")
    assert not GPT.resources(local.config).asynchronous  # one generate at a time (issue 12 item 9)
    local.load()
    assert isinstance(local.lm, CausalLM)
    served = GPT(GPT.Config(base_url=lm_server.base_url, temperature=0, **common), "cpu")
    served.load()
    mine = local.process(rows())
    theirs = await served.aprocess(rows())
    # The server's response parser (its Qwen2 response template) trims the answer's whitespace.
    assert [m["text"].strip() for m in mine] == [t["text"] for t in theirs]
    assert len({m["text"] for m in mine}) == len(TEXTS)  # different prompts, different answers
    usage_local, usage_served = local.take_usage(), served.take_usage()
    assert usage_local["tokens_out"] == usage_served["tokens_out"] == 8 * len(TEXTS)
    assert usage_local["tokens_in"] == usage_served["tokens_in"]  # same prompt tokens, padding not counted
    # A record without text is an error in its own slot; JSON mode rejects the (random) answers.
    local.config = GPT.Config(backend="transformers", temperature=0, response_format="json_object", **common)
    out = local.process([{"id": "x", "_job": "t", "_media_dir": Path("/tmp")}, *rows(TEXTS[:1])])
    assert out[0].error_type == "MissingField" and out[1].error_type == "InvalidJSON"


def test_batched_equals_one_by_one(local):
    together = run(local)
    alone = [run(local, [text])[0] for text in TEXTS]
    assert together == alone


def test_seed_example_validates_and_refusals_name_the_key(text_lm_dir):
    config = LOCAL.Config(model_path=str(text_lm_dir), **SEED_EXAMPLE)
    assert config.prompt == "You are a helpful assistant" and config.max_tokens == 4096
    refused = {
        "presence_penalty": 0.5,
        "frequency_penalty": 1.0,
        "logprobs": 5,
        "prompt_logprobs": 1,
        "detokenize": False,
        "spaces_between_special_tokens": False,
        "logits_processors": ["my.module:Processor"],
    }
    with pytest.raises(ValidationError) as caught:
        LOCAL.Config(model_path="m", **refused)
    errors = {e["loc"][0]: e["msg"] for e in caught.value.errors()}
    assert set(errors) == set(refused)
    for key, message in errors.items():
        assert f"cannot honour {key}=" in message
    with pytest.raises(ValidationError, match="cannot honour best_of=3"):
        LOCAL.Config(model_path="m", n=2, best_of=3)
    assert LOCAL.Config(model_path="m", n=2, best_of=2).best_of == 2


def test_n_seed_and_top_k(local):
    greedy = run(local)
    sampled = run(local, temperature=1.0, n=3, seed=7)
    assert all(isinstance(answers, list) and len(answers) == 3 for answers in sampled)
    assert run(local, temperature=1.0, n=3, seed=7) == sampled  # the seed makes sampling reproducible
    assert run(local, temperature=1.0, n=3, seed=8) != sampled
    assert any(len(set(answers)) > 1 for answers in sampled)  # n samples, not n copies
    assert run(local, temperature=1.0, top_k=1, seed=3) == greedy  # top_k=1 is greedy


def test_stop_strings(local):
    greedy = run(local, max_tokens=12)
    stop = greedy[1][4:7]
    cut = run(local, max_tokens=12, stop=stop)
    assert cut[1] == greedy[1][: greedy[1].index(stop)]
    kept = run(local, max_tokens=12, stop=[stop], include_stop_str_in_output=True)
    assert kept[1] == greedy[1][: greedy[1].index(stop) + len(stop)]


def test_stop_token_ids_min_tokens_and_ignore_eos(local):
    tokenizer = local.tokenizer
    answer_ids = tokenizer(run(local, TEXTS[:1])[0], add_special_tokens=False)["input_ids"]
    stop_id = answer_ids[1]
    first = answer_ids.index(stop_id)
    local.take_usage()
    run(local, TEXTS[:1], stop_token_ids=[stop_id])
    assert local.take_usage()["tokens_out"] == first + 1
    run(local, TEXTS[:1], stop_token_ids=[stop_id], ignore_eos=True)
    assert local.take_usage()["tokens_out"] == 8
    run(local, TEXTS[:1], stop_token_ids=[stop_id], min_tokens=first + 2)
    assert local.take_usage()["tokens_out"] > first + 1


def test_penalty_bias_allowed_tokens_truncation(local):
    greedy = run(local)
    assert run(local, repetition_penalty=2.0) != greedy
    x = local.tokenizer.convert_tokens_to_ids("x")
    assert run(local, logit_bias={x: 100.0}) == ["x" * 8] * len(TEXTS)
    allowed = [local.tokenizer.convert_tokens_to_ids(t) for t in ("a", "b")]
    assert all(set(text) <= {"a", "b"} and len(text) == 8 for text in run(local, allowed_token_ids=allowed))
    local.take_usage()
    run(local, truncate_prompt_tokens=5)
    assert local.take_usage()["tokens_in"] == 5 * len(TEXTS)


def test_user_prompt_template_and_system_prompt(local):
    a = run(local, ["ignored"], user_prompt="Describe {text}", prompt="Be brief.")
    b = run(local, ["ignored"], user_prompt="Describe {text}", prompt="Be verbose.")
    assert a != b  # the system prompt reaches the model
    local.config = LOCAL.Config(model_path=local.config.model_path, user_prompt="About {topic}")
    out = local.process(rows(["x"]))
    assert isinstance(out[0], StageError) and out[0].error_type == "MissingField"


def test_device_key(text_lm_dir):
    with pytest.raises(RuntimeError, match="device: cuda but its worker runs on 'cpu'"):
        LOCAL(LOCAL.Config(model_path=str(text_lm_dir), device="cuda"), "cpu").load()
    stage = LOCAL(LOCAL.Config(model_path=str(text_lm_dir), device="cpu"), "cpu")
    stage.load()
    assert stage.lm.model.device.type == "cpu"


@pytest.mark.gpu
def test_resident_on_the_workers_gpu(text_lm_dir):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")

    # The two classes build different prompts (LocalModelGenerator's `prompt` is a system prompt),
    # so each is compared with itself on the CPU: greedy, float32, the same text on both devices.
    def answers(cls, on, **settings):
        stage = cls(cls.Config(temperature=0, max_tokens=8, dtype="float32", **settings), on)
        stage.load()
        return stage, [o["text"] for o in stage.process(rows())]

    gpu, out = answers(LOCAL, "cuda:0", model_path=str(text_lm_dir), device="cuda")
    assert gpu.lm.model.device == torch.device("cuda:0")
    assert all(isinstance(text, str) and text for text in out)
    assert gpu.take_usage()["tokens_out"] == 8 * len(TEXTS)
    assert out == answers(LOCAL, "cpu", model_path=str(text_lm_dir))[1]
    backend, backend_out = answers(GPT, "cuda:0", model=str(text_lm_dir), backend="transformers")
    assert backend.lm.model.device.type == "cuda"
    assert backend_out == answers(GPT, "cpu", model=str(text_lm_dir), backend="transformers")[1]


def test_backend_decides_what_is_refused_and_auto_stays_transformers_on_cpu(text_lm_dir, caplog):
    """The keys only vLLM honours pass with backend: vllm and are refused otherwise (auto may
    fall back to transformers); backend: auto on the CPU builds the transformers backend."""
    vllm_only = {
        "presence_penalty": 0.5,
        "frequency_penalty": 1.0,
        "logprobs": 5,
        "prompt_logprobs": 1,
        "spaces_between_special_tokens": False,
    }
    config = LOCAL.Config(model_path="m", backend="vllm", **vllm_only)
    assert config.sampling().presence_penalty == 0.5 and config.sampling().logprobs == 5
    assert LOCAL.Config(model_path="m").backend == "transformers"
    for backend in ("transformers", "auto"):
        with pytest.raises(ValidationError) as caught:
            LOCAL.Config(model_path="m", backend=backend, **vllm_only)
        errors = {e["loc"][0]: e["msg"] for e in caught.value.errors()}
        assert set(errors) == set(vllm_only)
        assert all("set backend: vllm" in message for message in errors.values())
    for key, value in {"logits_processors": ["m:P"], "detokenize": False}.items():
        with pytest.raises(ValidationError, match=f"the vllm backend cannot honour {key}="):
            LOCAL.Config(model_path="m", backend="vllm", **{key: value})
    for cls, key in ((LOCAL, "model_path"), (GPT, "model")):
        with pytest.raises(ValidationError, match="tensor_parallel_size=2 splits the model over GPUs"):
            cls.Config(**{key: "m", "backend": "auto", "tensor_parallel_size": 2})
        assert cls.Config(**{key: "m", "backend": "vllm", "tensor_parallel_size": 2}).tensor_parallel_size == 2
    with pytest.raises(ValidationError, match="backend: vllm runs the model locally and cannot use base_url"):
        GPT.Config(model="m", backend="vllm", base_url="http://x/v1")

    with caplog.at_level("INFO", logger="stages.engines"):
        stage = GPT(GPT.Config(model=str(text_lm_dir), backend="auto"), "cpu")
        stage.load()
        assert isinstance(stage.lm, CausalLM) and not GPT.resources(stage.config).asynchronous
        local = LOCAL(LOCAL.Config(model_path=str(text_lm_dir), backend="auto", temperature=0, max_tokens=4), "cpu")
        local.load()
    assert local.backend_name == "transformers" and isinstance(local.lm, CausalLM)
    assert sum("backend auto -> transformers" in r.getMessage() for r in caplog.records) == 2
    assert GPT.resources(GPT.Config(model="m", backend="auto")).accelerators == 1  # no vLLM here: transformers
    api = GPT.resources(GPT.Config(model="m", max_num_seqs=6))  # backend openai: a CPU step, its slots the API's
    assert (api.accelerators, api.concurrency_slots, api.asynchronous) == (0, 6, True)


def test_seeded_answers_do_not_depend_on_other_workers(text_lm_dir):
    """Two LocalModelGenerator workers in one process (same device): an unseeded one sampling between
    the seeded one's batches must not move the seeded answers, and is not fixed by them (issue 12 item 9)."""
    from concurrent.futures import ThreadPoolExecutor

    def make(seed):
        stage = LOCAL(LOCAL.Config(model_path=str(text_lm_dir), temperature=1.0, max_tokens=8, seed=seed), "cpu")
        stage.load()
        return stage

    seeded, unseeded = make(5), make(None)
    alone = [o["text"] for o in seeded.process(rows())]
    with ThreadPoolExecutor(2) as pool:
        runs = list(pool.map(lambda s: [o["text"] for o in s.process(rows())], [seeded, unseeded] * 4))
    assert all(run == alone for run in runs[0::2])
    assert len({tuple(run) for run in runs[1::2]}) > 1  # the unseeded worker still samples
    for stage in (seeded, unseeded):
        stage.close()
