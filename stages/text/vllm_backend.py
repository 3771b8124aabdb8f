"""The vLLM backend of the local text steps: one `AsyncLLM` engine per device (group).

The engine's life cycle is `stages/engines/vllm.py`'s, shared with the captioners: the engine
lives on an event loop of its own in a daemon thread, `generate` hands a batch over to it,
every record becomes one request (a semaphore keeps at most `max_num_seqs` in flight) and
vLLM's scheduler batches them continuously; engines on one host start one at a time.

Prompts go in as token ids: the chat is rendered with the tokenizer's chat template and
tokenized exactly as the transformers backend does (stages/engines/hf_causal.py), so both backends see the
same tokens. Answers are decoded with that tokenizer too, except when stop strings are set
(vLLM then needs to detokenize to find them, and its text is used).

When the engine dies, every request in flight gets an `EngineDead` error, the engine is shut
down and a new one is built; later batches go to the new engine.
"""

from __future__ import annotations

import logging
from typing import Any

from stages.base import StageError, require
from stages.engines import Generation
from stages.engines.hf_causal import Sampling, render_chat
from stages.engines.vllm import EngineThread

log = logging.getLogger(__name__)


def sampling_params(sampling: Sampling, *, detokenize: bool):
    """vLLM's SamplingParams for one batch's settings (one answer set of n per request)."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    greedy = sampling.temperature <= 0
    return SamplingParams(
        n=sampling.n,
        presence_penalty=sampling.presence_penalty,
        frequency_penalty=sampling.frequency_penalty,
        repetition_penalty=sampling.repetition_penalty,
        temperature=sampling.temperature,
        top_p=1.0 if greedy else sampling.top_p,
        top_k=0 if greedy or sampling.top_k <= 0 else sampling.top_k,
        min_p=0.0 if greedy else sampling.min_p,
        seed=sampling.seed,
        stop=list(sampling.stop) or None,
        stop_token_ids=list(sampling.stop_token_ids) or None,
        ignore_eos=sampling.ignore_eos,
        max_tokens=sampling.max_tokens,
        min_tokens=sampling.min_tokens,
        logprobs=sampling.logprobs,
        prompt_logprobs=sampling.prompt_logprobs,
        include_stop_str_in_output=sampling.include_stop_str_in_output,
        skip_special_tokens=sampling.skip_special_tokens,
        spaces_between_special_tokens=sampling.spaces_between_special_tokens,
        logit_bias=dict(sampling.logit_bias) or None,
        allowed_token_ids=sampling.allowed_token_ids,
        output_kind=RequestOutputKind.FINAL_ONLY,
        detokenize=detokenize,
    )


class VLLMTextLM(EngineThread):
    """An AsyncLLM engine on its own loop thread, rebuilt when it dies; an asynchronous text backend."""

    asynchronous = True

    def __init__(self, engine_args: dict, device: str, max_num_seqs: int, stage: str, tokenizer):
        super().__init__(engine_args, device, max_num_seqs, stage)
        self.tokenizer = tokenizer
        self.last_params: Any = None  # the SamplingParams of the latest batch (tests, debugging)

    # -- generation -------------------------------------------------------------------
    def generate(self, chats: list[list[dict[str, str]]], sampling: Sampling) -> list[Generation | StageError]:
        """n answers per chat, or an error in the chat's slot (from a plain thread)."""
        return self._call(self._run_all(self._prompts(chats, sampling), sampling))

    async def agenerate(self, chats: list[list[dict[str, str]]], sampling: Sampling) -> list[Generation | StageError]:
        """The same, awaited from another event loop (the runtime's)."""
        return await self._on_loop(self._run_all(self._prompts(chats, sampling), sampling))

    def _prompts(self, chats: list[list[dict[str, str]]], sampling: Sampling) -> list[list[int]]:
        """Token ids of each chat, made as the transformers backend makes them."""
        tokenizer = self.tokenizer
        plain = not getattr(tokenizer, "chat_template", None)
        limit = sampling.truncate_prompt_tokens
        return [
            tokenizer(render_chat(tokenizer, chat), add_special_tokens=plain, truncation=bool(limit), max_length=limit)[
                "input_ids"
            ]
            for chat in chats
        ]

    async def _run_all(self, prompts: list[list[int]], sampling: Sampling) -> list[Generation | StageError]:
        params = self.last_params = sampling_params(sampling, detokenize=bool(sampling.stop))
        return await self._gather(
            lambda engine, prompt: self._run_one(engine, prompt, params, sampling), prompts, Generation
        )

    async def _run_one(self, engine, prompt: list[int], params, sampling: Sampling) -> Generation:
        final = None
        async for output in engine.generate({"prompt_token_ids": prompt}, params, self._request_id()):
            final = output
        texts, tokens_out = [], 0
        for completion in sorted(final.outputs, key=lambda c: c.index):
            tokens = list(completion.token_ids)
            tokens_out += len(tokens)
            if params.detokenize:
                texts.append(completion.text)
            else:
                texts.append(self.tokenizer.decode(tokens, skip_special_tokens=sampling.skip_special_tokens))
        return Generation(texts, len(prompt), tokens_out)


def load_tokenizer(model_path: str, *, cache_dir: str | None = None, trust_remote_code: bool = False, stage: str):
    """The model's tokenizer, configured as load_causal_lm configures it (chat template, decoding)."""
    transformers = require("transformers", stage=stage, extra="text")
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        model_path, cache_dir=cache_dir, trust_remote_code=trust_remote_code
    )
    tokenizer.truncation_side = "left"
    return tokenizer
