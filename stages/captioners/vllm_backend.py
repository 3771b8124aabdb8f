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

The engine's life cycle (own loop thread, one start at a time per host, rebuild on death)
is `stages/engines/vllm.py`'s, shared with the text steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from stages.base import StageError
from stages.captioners.structured import vllm_structured_params
from stages.engines import Generation
from stages.engines.hf_vision import CaptionSampling
from stages.engines.vllm import EngineThread

Sampling = CaptionSampling | list[CaptionSampling]


@dataclass
class VideoRequest:
    """One record's prompt (chat template applied, with the model's video placeholder) and video."""

    prompt: str
    frames: Any  # numpy uint8, T x H x W x 3
    metadata: dict
    processor_kwargs: dict = field(default_factory=dict)


class VLLMVideoLM(EngineThread):
    """An AsyncLLM engine on its own loop thread, rebuilt when it dies."""

    def __init__(self, engine_args: dict, device: str, max_num_seqs: int, stage: str, decode):
        super().__init__(engine_args, device, max_num_seqs, stage)
        # Token ids -> text with the model's own tokenizer, as the transformers backend does
        # (vLLM's incremental detokenizer drops a trailing partial UTF-8 character).
        self.decode = decode

    # -- generation -------------------------------------------------------------------
    def generate(self, requests: list[VideoRequest], sampling: Sampling) -> list[Generation | StageError]:
        """`sampling`: one for all requests, or one per request (candidates differ by seed)."""
        return self._call(self._run_all(requests, sampling))

    async def agenerate(self, requests: list[VideoRequest], sampling: Sampling) -> list[Generation | StageError]:
        return await self._on_loop(self._run_all(requests, sampling))

    async def _run_all(self, requests: list[VideoRequest], sampling: Sampling) -> list[Generation | StageError]:
        each = sampling if isinstance(sampling, list) else [sampling] * len(requests)
        built: dict[int, Any] = {}  # one SamplingParams per distinct settings object
        params = [built[id(s)] if id(s) in built else built.setdefault(id(s), _sampling_params(s)) for s in each]
        pairs = list(zip(requests, params, strict=True))
        return await self._gather(lambda engine, pair: self._run_one(engine, *pair), pairs, Generation)

    async def _run_one(self, engine, request: VideoRequest, params) -> Generation:
        prompt: dict[str, Any] = {
            "prompt": request.prompt,
            "multi_modal_data": {"video": (request.frames, request.metadata)},
        }
        if request.processor_kwargs:
            prompt["mm_processor_kwargs"] = request.processor_kwargs
        final = None
        async for output in engine.generate(prompt, params, self._request_id()):
            final = output
        completion = final.outputs[0]
        tokens = list(completion.token_ids)
        return Generation([self.decode(tokens).strip()], len(final.prompt_token_ids or ()), len(tokens))


def _sampling_params(sampling: CaptionSampling):
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    structured = {} if sampling.json_schema is None else vllm_structured_params(sampling.json_schema)
    return SamplingParams(
        max_tokens=sampling.max_new_tokens,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k if sampling.top_k > 0 else 0,
        repetition_penalty=sampling.repetition_penalty,
        seed=sampling.seed if sampling.temperature > 0 else None,
        output_kind=RequestOutputKind.FINAL_ONLY,
        detokenize=False,  # decoded once at the end, see VLLMVideoLM.decode
        **structured,
    )
