"""The vLLM backend of the video captioners: one `AsyncLLM` engine per device group.

The engine lives on an event loop of its own (a daemon thread owned by this object), so
that it is bound to one loop for its whole life whoever calls it: `agenerate` is awaited
from the runtime's loop and hands the work over with `run_coroutine_threadsafe`; `generate`
does the same from a plain thread. Every record of a batch becomes one request, submitted
at once; a semaphore keeps at most `max_num_seqs` requests in flight per engine, and vLLM's
scheduler batches them continuously.

Videos go in as `multi_modal_data={"video": (frames, metadata)}`: uint8 frames T x H x W x 3
already decoded and sampled by the stage, and a metadata dict (`fps`, `duration`,
`total_num_frames`, `frames_indices`, `do_sample_frames=False`) as vLLM's own multimodal
parser takes it (Qwen2.5-VL needs it for its time encoding; the others ignore it).

When the engine dies (`EngineDeadError`, or the engine reports itself errored), every
request that was in flight gets an `EngineDead` error, the engine is shut down and a new
one is built; later batches go to the new engine. Engines on one host start one at a
time (a thread lock plus a file lock), since two vLLM engines profiling memory at once on
one GPU each see the other's allocations.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import itertools
import logging
import os
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stages.base import StageError, require
from stages.captioners.hf_backend import Sampling

log = logging.getLogger(__name__)

_START_LOCK = threading.Lock()
_START_LOCK_FILE = Path(tempfile.gettempdir()) / "reelflow-vllm-start.lock"


@dataclass
class VideoRequest:
    """One record's prompt (chat template applied, with the model's video placeholder) and video."""

    prompt: str
    frames: Any  # numpy uint8, T x H x W x 3
    metadata: dict
    processor_kwargs: dict = field(default_factory=dict)


@contextlib.contextmanager
def one_engine_starting_per_host():
    with _START_LOCK, open(_START_LOCK_FILE, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def gpu_indices(device: str) -> str | None:
    """ "cuda:1" -> "1"; a tensor-parallel group "cuda:0,cuda:1" (or "cuda:0,1") -> "0,1"; else None."""
    if not device.startswith("cuda:"):
        return None
    return ",".join(part.strip().removeprefix("cuda:") for part in device.split(","))


@contextlib.contextmanager
def visible_devices_only(device: str):
    """Show the engine only its own GPUs while it starts its workers (they inherit the variable)."""
    indices = gpu_indices(device)
    if indices is None:
        yield
        return
    previous = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = indices
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = previous


class VLLMVideoLM:
    """An AsyncLLM engine on its own loop thread, rebuilt when it dies."""

    def __init__(self, engine_args: dict, device: str, max_num_seqs: int, stage: str, decode):
        self.engine_args = dict(engine_args)
        # Token ids -> text with the model's own tokenizer, as the transformers backend does
        # (vLLM's incremental detokenizer drops a trailing partial UTF-8 character).
        self.decode = decode
        self.device = device
        self.max_num_seqs = max_num_seqs
        self.stage = stage
        self.engine: Any = None
        self.restarts = 0
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
        # Built on the engine's own loop (blocking it while the engine starts, which nothing
        # else needs yet): AsyncLLM binds its output handler to the loop it is built in, and
        # load() may be called from a thread that runs another loop.
        return self._build_engine()

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
            self._call(self._cancel_tasks())  # the engine's output tasks end before their loop does
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
    def generate(self, requests: list[VideoRequest], sampling: Sampling) -> list[tuple[str, int, int] | StageError]:
        return self._call(self._run_all(requests, sampling))

    async def agenerate(
        self, requests: list[VideoRequest], sampling: Sampling
    ) -> list[tuple[str, int, int] | StageError]:
        future = asyncio.run_coroutine_threadsafe(self._run_all(requests, sampling), self._loop)
        return await asyncio.wrap_future(future)

    async def _run_all(
        self, requests: list[VideoRequest], sampling: Sampling
    ) -> list[tuple[str, int, int] | StageError]:
        from vllm.v1.engine.exceptions import EngineDeadError

        engine = self.engine
        params = _sampling_params(sampling)
        outcomes = await asyncio.gather(
            *(self._run_one(engine, request, params) for request in requests), return_exceptions=True
        )
        died = engine.errored or any(isinstance(o, EngineDeadError) for o in outcomes)
        results: list[tuple[str, int, int] | StageError] = []
        for outcome in outcomes:
            if isinstance(outcome, tuple):
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

    async def _run_one(self, engine, request: VideoRequest, params) -> tuple[str, int, int]:
        prompt: dict[str, Any] = {
            "prompt": request.prompt,
            "multi_modal_data": {"video": (request.frames, request.metadata)},
        }
        if request.processor_kwargs:
            prompt["mm_processor_kwargs"] = request.processor_kwargs
        final = None
        async with self._slots:
            async for output in engine.generate(prompt, params, f"{self.stage}-{next(self._ids)}"):
                final = output
        completion = final.outputs[0]
        tokens = list(completion.token_ids)
        return self.decode(tokens).strip(), len(tokens), len(final.prompt_token_ids or ())

    async def _rebuild(self, dead_engine) -> None:
        async with self._rebuild_lock:
            if self.engine is not dead_engine:
                return  # another batch already rebuilt it
            log.error("%s: the vLLM engine died; shutting it down and starting a new one", self.stage)
            with contextlib.suppress(Exception):
                dead_engine.shutdown()
            # Built in a thread with no loop, AsyncLLM starts its output handler on the first
            # request, which is made here, on the engine's own loop.
            self.engine = await asyncio.to_thread(self._build_engine)
            self.restarts += 1


def _sampling_params(sampling: Sampling):
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(
        max_tokens=sampling.max_new_tokens,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k if sampling.top_k > 0 else 0,
        repetition_penalty=sampling.repetition_penalty,
        seed=sampling.seed if sampling.temperature > 0 else None,
        output_kind=RequestOutputKind.FINAL_ONLY,
        detokenize=False,  # decoded once at the end, see VLLMVideoLM.decode
    )


def _request_error(exc: BaseException) -> StageError:
    cause = exc.__cause__ if exc.__cause__ is not None else exc
    return StageError(
        f"vLLM refused or failed this request: {type(cause).__name__}: {cause}",
        error_type=type(cause).__name__,
    )
