"""The vLLM backend of the local text steps: one `AsyncLLM` engine per device (group).

Same pattern as the captioners' engine (stages/captioners/vllm_backend.py), whose host-wide
start lock and device masking it shares: the engine lives on an event loop of its own in a
daemon thread, `generate` hands a batch over with `run_coroutine_threadsafe`, every record
becomes one request (a semaphore keeps at most `max_num_seqs` in flight) and vLLM's
scheduler batches them continuously.

Prompts go in as token ids: the chat is rendered with the tokenizer's chat template and
tokenized exactly as the transformers backend does (local_lm.py), so both backends see the
same tokens. Answers are decoded with that tokenizer too, except when stop strings are set
(vLLM then needs to detokenize to find them, and its text is used).

When the engine dies, every request in flight gets an `EngineDead` error, the engine is shut
down and a new one is built; later batches go to the new engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import itertools
import logging
import threading
from typing import Any

from stages.base import StageError, require
from stages.captioners.vllm_backend import one_engine_starting_per_host, visible_devices_only
from stages.text.local_lm import Generated, Sampling

log = logging.getLogger(__name__)


def choose_backend(wanted: str, device: str, stage: str) -> str:
    """`auto`: vLLM when it is importable and the device is a GPU, else transformers (logged)."""
    if wanted != "auto":
        return wanted
    has_vllm = importlib.util.find_spec("vllm") is not None
    chosen = "vllm" if device.startswith("cuda") and has_vllm else "transformers"
    log.info(
        "%s: backend auto -> %s (device %s, vllm %s)",
        stage,
        chosen,
        device,
        "installed" if has_vllm else "not installed",
    )
    return chosen


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


class VLLMTextLM:
    """An AsyncLLM engine on its own loop thread, rebuilt when it dies."""

    def __init__(self, engine_args: dict, device: str, max_num_seqs: int, stage: str, tokenizer):
        self.engine_args = dict(engine_args)
        self.device = device
        self.max_num_seqs = max_num_seqs
        self.stage = stage
        self.tokenizer = tokenizer
        self.engine: Any = None
        self.restarts = 0
        self.last_params: Any = None  # the SamplingParams of the latest batch (tests, debugging)
        self._ids = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._slots: asyncio.Semaphore | None = None
        self._rebuild_lock: asyncio.Lock | None = None

    # -- life cycle -------------------------------------------------------------------
    def load(self) -> None:
        require("vllm", stage=self.stage, extra="vllm")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"{self.stage}-vllm", daemon=True)
        self._thread.start()
        self.engine = self._call(self._start())

    async def _start(self):
        self._slots = asyncio.Semaphore(self.max_num_seqs)
        self._rebuild_lock = asyncio.Lock()
        return self._build_engine()  # on the engine's own loop: AsyncLLM binds to the loop it is built in

    def _build_engine(self):
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = AsyncEngineArgs(**self.engine_args)
        with one_engine_starting_per_host(), visible_devices_only(self.device):
            log.info("%s: starting vLLM engine for %s on %s", self.stage, self.engine_args["model"], self.device)
            return AsyncLLM.from_engine_args(args)

    def close(self) -> None:
        engine, self.engine = self.engine, None
        if engine is not None:
            engine.shutdown()
        if self._loop is not None:
            self._call(self._cancel_tasks())
            self._loop.call_soon_threadsafe(self._loop.stop)
            if self._thread is not None:
                self._thread.join(timeout=10)
            self._loop.close()
            self._loop = None

    @staticmethod
    async def _cancel_tasks() -> None:
        tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _call(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    # -- generation -------------------------------------------------------------------
    def generate(self, chats: list[list[dict[str, str]]], sampling: Sampling) -> list[Generated | StageError]:
        """n answers per chat, or an error in the chat's slot (from a plain thread)."""
        return self._call(self._run_all(self._prompts(chats, sampling), sampling))

    async def agenerate(self, chats: list[list[dict[str, str]]], sampling: Sampling) -> list[Generated | StageError]:
        """The same, awaited from another event loop (the runtime's)."""
        future = asyncio.run_coroutine_threadsafe(self._run_all(self._prompts(chats, sampling), sampling), self._loop)
        return await asyncio.wrap_future(future)

    def _prompts(self, chats: list[list[dict[str, str]]], sampling: Sampling) -> list[list[int]]:
        """Token ids of each chat, made as the transformers backend makes them."""
        from stages.text.local_lm import render_chat

        tokenizer = self.tokenizer
        plain = not getattr(tokenizer, "chat_template", None)
        limit = sampling.truncate_prompt_tokens
        return [
            tokenizer(render_chat(tokenizer, chat), add_special_tokens=plain, truncation=bool(limit), max_length=limit)[
                "input_ids"
            ]
            for chat in chats
        ]

    async def _run_all(self, prompts: list[list[int]], sampling: Sampling) -> list[Generated | StageError]:
        from vllm.v1.engine.exceptions import EngineDeadError

        engine = self.engine
        params = self.last_params = sampling_params(sampling, detokenize=bool(sampling.stop))
        outcomes = await asyncio.gather(
            *(self._run_one(engine, prompt, params, sampling) for prompt in prompts), return_exceptions=True
        )
        died = engine.errored or any(isinstance(o, EngineDeadError) for o in outcomes)
        results: list[Generated | StageError] = []
        for outcome in outcomes:
            if isinstance(outcome, Generated):
                results.append(outcome)
            elif died:
                results.append(
                    StageError(
                        f"the vLLM engine died while this record was in flight ({outcome!r}); the engine is "
                        "being restarted: submit the record again (if it keeps happening, see the daemon log "
                        "for the engine's own error, e.g. out of GPU memory: lower max_model_len or max_num_seqs)",
                        error_type="EngineDead",
                    )
                )
            else:
                results.append(_request_error(outcome))
        if died:
            await self._rebuild(engine)
        return results

    async def _run_one(self, engine, prompt: list[int], params, sampling: Sampling) -> Generated:
        final = None
        async with self._slots:
            async for output in engine.generate(
                {"prompt_token_ids": prompt}, params, f"{self.stage}-{next(self._ids)}"
            ):
                final = output
        texts, tokens_out = [], 0
        for completion in sorted(final.outputs, key=lambda c: c.index):
            tokens = list(completion.token_ids)
            tokens_out += len(tokens)
            if params.detokenize:
                texts.append(completion.text)
            else:
                texts.append(self.tokenizer.decode(tokens, skip_special_tokens=sampling.skip_special_tokens))
        return Generated(texts, len(prompt), tokens_out)

    async def _rebuild(self, dead_engine) -> None:
        async with self._rebuild_lock:
            if self.engine is not dead_engine:
                return  # another batch already rebuilt it
            log.error("%s: the vLLM engine died; shutting it down and starting a new one", self.stage)
            with contextlib.suppress(Exception):
                dead_engine.shutdown()
            self.engine = await asyncio.to_thread(self._build_engine)
            self.restarts += 1


def _request_error(exc: BaseException) -> StageError:
    cause = exc.__cause__ if exc.__cause__ is not None else exc
    return StageError(
        f"vLLM refused or failed this request: {type(cause).__name__}: {cause}",
        error_type=type(cause).__name__,
    )


def load_tokenizer(model_path: str, *, cache_dir: str | None = None, trust_remote_code: bool = False, stage: str):
    """The model's tokenizer, configured as load_causal_lm configures it (chat template, decoding)."""
    transformers = require("transformers", stage=stage, extra="text")
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        model_path, cache_dir=cache_dir, trust_remote_code=trust_remote_code
    )
    tokenizer.truncation_side = "left"
    return tokenizer
