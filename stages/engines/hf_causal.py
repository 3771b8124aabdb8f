"""The transformers backend of the text steps (stages/text/): a local causal LM loaded once per
device, one `generate` call for a batch of chats (left padding), with vLLM-style sampling
settings mapped onto transformers' generation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from stages.base import Device, StageError, require
from stages.engines import Generation, sampling_rng

DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class Sampling:
    """vLLM's SamplingParams, as far as transformers' `generate` can honour them."""

    max_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    n: int = 1
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    truncate_prompt_tokens: int | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)
    allowed_token_ids: list[int] | None = None
    # Honoured by the vLLM backend only (the configs refuse other values for transformers).
    best_of: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    spaces_between_special_tokens: bool = True


def resolve_device(configured: str | None, worker_device: str) -> str:
    """The device the model goes on: the worker's, unless the step pins one.

    `device: cpu` runs on the CPU; `device: cuda` means the worker's GPU (the runtime's
    `devices` choose which); `device: cuda:N` pins that GPU.
    """
    if configured in (None, "", "auto"):
        return worker_device
    if configured == "cuda":
        if worker_device.startswith("cuda"):
            return worker_device
        raise RuntimeError(
            f"the step sets device: cuda but its worker runs on {worker_device!r} (no GPU visible, or "
            "`devices` lists none); set devices: [cuda:0] or device: cpu"
        )
    return worker_device.on(configured) if isinstance(worker_device, Device) else configured


def load_causal_lm(
    model_path: str,
    device: str,
    *,
    dtype: str = "auto",
    cache_dir: str | None = None,
    trust_remote_code: bool = False,
    stage: str = "TextGenerator",
):
    """(model, tokenizer) resident on `device`, tokenizer padding on the left.

    `model_path` may also name a `.gguf` file: transformers reads its config and tokenizer
    from the file and dequantizes the weights (needs the `gguf` package).
    """
    require("torch", stage=stage, extra="text")
    transformers = require("transformers", stage=stage, extra="text")
    import torch

    kwargs: dict[str, Any] = {"cache_dir": cache_dir, "trust_remote_code": trust_remote_code}
    if model_path.endswith(".gguf"):
        require("gguf", stage=stage, extra="text")
        folder, _, name = model_path.rpartition("/")
        model_path, kwargs["gguf_file"] = folder or ".", name
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_path, **kwargs)
    tokenizer.padding_side = "left"
    tokenizer.truncation_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype, **kwargs)
    model.to(device).eval()
    return model, tokenizer


def render_chat(tokenizer, messages: list[dict[str, str]]) -> str:
    """The prompt text for one chat: the tokenizer's chat template, or plain turns when it has none."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "\n\n".join(m["content"] for m in messages) + "\n"


class _AllowedTokens:
    """A logits processor that keeps only the allowed token ids (vLLM's allowed_token_ids)."""

    def __init__(self, allowed: list[int], vocab_size: int):
        import torch

        self.mask = torch.full((vocab_size,), float("-inf"))
        self.mask[torch.tensor([i for i in allowed if 0 <= i < vocab_size], dtype=torch.long)] = 0.0

    def __call__(self, input_ids, scores):
        return scores + self.mask[: scores.shape[-1]].to(scores.device, scores.dtype)


def _generation_kwargs(model, tokenizer, sampling: Sampling) -> dict[str, Any]:
    import copy

    config = copy.deepcopy(model.generation_config)
    greedy = sampling.temperature <= 0
    eos = config.eos_token_id if config.eos_token_id is not None else tokenizer.eos_token_id
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    updates: dict[str, Any] = {
        "max_new_tokens": sampling.max_tokens,
        "min_new_tokens": sampling.max_tokens if sampling.ignore_eos else sampling.min_tokens or None,
        "do_sample": not greedy,
        "temperature": None if greedy else sampling.temperature,
        "top_p": None if greedy or sampling.top_p >= 1 else sampling.top_p,
        "top_k": None if greedy or sampling.top_k <= 0 else sampling.top_k,
        "min_p": None if greedy or sampling.min_p <= 0 else sampling.min_p,
        "repetition_penalty": None if sampling.repetition_penalty == 1 else sampling.repetition_penalty,
        "num_return_sequences": sampling.n,
        "eos_token_id": list(dict.fromkeys(eos_ids + list(sampling.stop_token_ids))) or None,
        "pad_token_id": tokenizer.pad_token_id,
        "stop_strings": list(sampling.stop) or None,
        "sequence_bias": {(int(t),): float(b) for t, b in sampling.logit_bias.items()} or None,
    }
    for key, value in updates.items():
        setattr(config, key, value)
    kwargs: dict[str, Any] = {"generation_config": config}
    if sampling.stop:
        kwargs["tokenizer"] = tokenizer
    if sampling.allowed_token_ids:
        from transformers import LogitsProcessorList

        vocab = model.get_output_embeddings().weight.shape[0]
        kwargs["logits_processor"] = LogitsProcessorList([_AllowedTokens(sampling.allowed_token_ids, vocab)])
    return kwargs


def _cut_at_stop(text: str, stop: list[str], keep: bool) -> str:
    hits = [(text.find(s), s) for s in stop if s and s in text]
    if not hits:
        return text
    at, which = min(hits)
    return text[: at + len(which)] if keep else text[:at]


def generate(model, tokenizer, chats: list[list[dict[str, str]]], sampling: Sampling) -> list[Generation]:
    """One batched `generate` over the chats (left-padded); n answers per chat."""
    import torch

    prompts = [render_chat(tokenizer, chat) for chat in chats]
    plain = not getattr(tokenizer, "chat_template", None)
    limit = sampling.truncate_prompt_tokens
    inputs = tokenizer(
        prompts, return_tensors="pt", padding=True, add_special_tokens=plain, truncation=bool(limit), max_length=limit
    )
    inputs = inputs.to(model.device)
    kwargs = _generation_kwargs(model, tokenizer, sampling)
    with sampling_rng(str(model.device), sampling.seed), torch.inference_mode():
        output = model.generate(**inputs, **kwargs)
    prompt_len = inputs["input_ids"].shape[1]
    prompt_tokens = inputs["attention_mask"].sum(dim=1).tolist()
    stops = set(kwargs["generation_config"].eos_token_id or [])
    results = []
    for i, tokens_in in enumerate(prompt_tokens):
        texts, tokens_out = [], 0
        for row in output[i * sampling.n : (i + 1) * sampling.n, prompt_len:].tolist():
            ends = [j for j, token in enumerate(row) if token in stops]
            row = row[: ends[0] + 1] if ends else row
            while row and not ends and row[-1] == tokenizer.pad_token_id:  # finished on a stop string
                row.pop()
            tokens_out += len(row)
            text = tokenizer.decode(row, skip_special_tokens=sampling.skip_special_tokens)
            texts.append(_cut_at_stop(text, sampling.stop, sampling.include_stop_str_in_output))
        results.append(Generation(texts, int(tokens_in), tokens_out))
    return results


class CausalLM:
    """A resident causal LM as a text backend: `generate` blocks, so it runs in the worker's thread.

    `agenerate` exists so that a caller on an event loop can use any backend alike; it runs the
    blocking call in a thread, one at a time (a lock), since one model generates one batch at once.
    """

    asynchronous = False

    def __init__(self, model_path: str, device: str, *, stage: str, **load_options: Any):
        import threading

        self.model_path, self.device, self.stage, self.load_options = model_path, device, stage, load_options
        self.model: Any = None
        self.tokenizer: Any = None
        self._lock = threading.Lock()

    def load(self) -> None:
        self.model, self.tokenizer = load_causal_lm(self.model_path, self.device, stage=self.stage, **self.load_options)

    def generate(self, chats: list[list[dict[str, str]]], sampling: Sampling) -> list[Generation | StageError]:
        with self._lock:
            return list(generate(self.model, self.tokenizer, chats, sampling))

    async def agenerate(self, chats: list[list[dict[str, str]]], sampling: Sampling) -> list[Generation | StageError]:
        import asyncio

        return await asyncio.to_thread(self.generate, chats, sampling)

    def close(self) -> None:
        self.model = self.tokenizer = None
