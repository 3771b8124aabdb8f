"""What the video captioners share: their config keys, the frame budget, and the stage flow.

A captioner stage (one module per model family) subclasses `VideoCaptioner` and fills in
a few hooks: how many tokens its frames cost, the size frames are decoded at, and the
kwargs its processor takes. Nothing here branches on the model family.

Flow of one record:

- `prepare` (the runtime's CPU thread pool): fill the prompt's `{field}` placeholders, apply
  the model's chat template, choose the frame count (explicit `num_frames`, `fps`, or as many
  as fit `max_model_len` with the prompt and `max_new_tokens`, capped at `max_frames`),
  decode only those frames with `stages.video.frames.sample_frames` at the size the model's
  processor wants, then (transformers backend) run the processor, or (vLLM backend) hand
  frames plus metadata to vLLM. A record whose tokens do not fit `max_model_len` fails here.
- `process` / `aprocess`: caption the batch.

Backends. One stage class serves both; the backend is chosen in `load()` (`backend: auto`
picks vLLM when it is installed and the stage's device is a GPU, else transformers; the
choice is logged). The runtime picks sync or async by whether a stage has `aprocess`, which
a class must decide before it loads, so captioners always define `aprocess`: with the vLLM
backend it submits every record of the batch to the engine at once (continuous batching
inside vLLM); with the transformers backend it runs the blocking `process` (one batched
`generate`) in a worker thread, so the event loop never blocks. `process` works for both
backends, for callers without an event loop (benchmarks, plain loops).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from stages.base import Stage, StageConfig, StageError, format_prompt

log = logging.getLogger(__name__)

PREPARED = "_caption_input"  # the key prepare() adds to a record
TEMPLATE_TOKENS = 40  # chat-template tokens (roles, system turn) assumed before the model is loaded
MIN_PIXELS_FLOOR = 28 * 28


class CaptionerConfig(StageConfig):
    """The seed's captioner keys, with their meaning, plus the backend and frame settings."""

    model_path: str = Field(description="Local model folder or hub id, loaded with from_pretrained.")
    backend: Literal["auto", "vllm", "transformers"] = Field(
        "auto", description="auto: vLLM when installed and the device is a GPU, else transformers."
    )
    trust_remote_code: bool = Field(False, description="Allow the checkpoint's own Python code.")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per vLLM engine.")
    max_model_len: int = Field(2048, ge=64, description="Model context length in tokens (vLLM's meaning).")
    max_num_seqs: int = Field(16, ge=1, description="Requests in flight per vLLM engine.")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="vLLM: share of GPU memory to use.")
    temperature: float = Field(0.0, ge=0, description="0 = greedy decoding.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    top_k: int = Field(-1, ge=-1, description="Top-k sampling; -1 or 0 = off.")
    repetition_penalty: float = Field(1.0, gt=0, description="1.0 = none.")
    seed: int | None = Field(None, description="Sampling seed (only used when temperature > 0).")
    max_new_tokens: int = Field(256, ge=1, description="Caption length limit in tokens.")
    prompt: str = Field(
        "Describe this video in detail.", description="Instruction; may use {field} placeholders from the record."
    )
    num_frames: int | None = Field(None, ge=1, description="Frames per video, spread evenly; default: automatic.")
    fps: float | None = Field(None, gt=0, description="Sample this many frames per second instead of num_frames.")
    max_frames: int = Field(32, ge=1, description="Cap on the automatic frame count and on fps sampling.")
    max_pixels: int | None = Field(
        None, ge=MIN_PIXELS_FLOOR, description="Pixel budget per frame (default: the model's own, see each stage)."
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="auto: bfloat16 on GPU, float32 on CPU."
    )
    output_key: str | None = Field(None, description="Where the caption goes (default: text_key).")
    engine_args: dict[str, Any] = Field(
        default_factory=dict, description="Extra vLLM AsyncEngineArgs, e.g. {enforce_eager: true}."
    )

    heavy_keys: ClassVar[frozenset[str]] = StageConfig.heavy_keys | {
        "max_model_len",
        "max_num_seqs",
        "gpu_memory_utilization",
        "engine_args",
    }

    def input_fields(self):
        return {self.video_key: "video"}

    @property
    def caption_key(self) -> str:
        return self.output_key or self.text_key

    # -- frame budget (checked before anything loads) -------------------------------------
    def video_cost(self) -> VideoCost:
        """Upper bound of what frames cost this model; each stage's Config overrides it."""
        raise NotImplementedError

    @model_validator(mode="after")
    def _frames_fit(self):
        if self.num_frames is not None and self.fps is not None:
            raise ValueError(f"give num_frames or fps, not both (got num_frames={self.num_frames}, fps={self.fps})")
        cost = self.video_cost()
        text = estimate_text_tokens(self.prompt)
        room = self.max_model_len - self.max_new_tokens - text
        fits = cost.frames_within(room, self.max_frames)
        where = f"max_model_len={self.max_model_len} with max_new_tokens={self.max_new_tokens} and a prompt of ~{text} tokens"
        if fits < cost.group:
            raise ValueError(
                f"{where} leaves room for no video: a frame costs {cost.describe()}; raise max_model_len, "
                "lower max_new_tokens or max_pixels, or shorten the prompt"
            )
        if self.num_frames is not None:
            if self.num_frames % cost.group:
                raise ValueError(
                    f"num_frames={self.num_frames}: this model takes frames in groups of {cost.group}; "
                    f"use {self.num_frames + cost.group - self.num_frames % cost.group} or "
                    f"{self.num_frames - self.num_frames % cost.group or cost.group}"
                )
            needed = cost.tokens(self.num_frames)
            if needed > room:
                most = cost.frames_within(room, 10**6)
                raise ValueError(
                    f"num_frames={self.num_frames} does not fit: {self.num_frames} frames cost {needed} tokens "
                    f"({cost.describe()}) and {where} leaves {room}; at most {most} frames fit: set num_frames: "
                    f"{most} (or leave it out for the automatic count), lower max_pixels, or raise max_model_len"
                )
        return self


@dataclass(frozen=True)
class VideoCost:
    """Tokens a video of n frames costs: `per_group` per `group` frames, plus `fixed`."""

    per_group: int
    group: int = 1
    fixed: int = 0

    def tokens(self, frames: int) -> int:
        return math.ceil(frames / self.group) * self.per_group + self.fixed

    def frames_within(self, budget: int, cap: int) -> int:
        groups = max(0, budget - self.fixed) // self.per_group if self.per_group else cap
        frames = min(groups * self.group, cap)
        return frames - frames % self.group

    def describe(self) -> str:
        unit = "frame" if self.group == 1 else f"{self.group} frames"
        extra = f" + {self.fixed} per video" if self.fixed else ""
        return f"{self.per_group} tokens per {unit}{extra}"


def estimate_text_tokens(prompt: str) -> int:
    """Before the tokenizer is loaded: ~3 characters per token plus the chat template."""
    return len(prompt) // 3 + TEMPLATE_TOKENS


def model_settings(model_path: str) -> dict[str, Any]:
    """config.json and the processor JSON files of a local checkpoint, merged (empty for a hub id).

    Used before loading to estimate frame costs; keys are looked up flat and under the
    `vision_config` / `video_processor` sub-dicts.
    """
    folder = Path(model_path).expanduser()
    merged: dict[str, Any] = {}
    if not folder.is_dir():
        return merged
    for name in ("config.json", "preprocessor_config.json", "video_preprocessor_config.json", "processor_config.json"):
        path = folder / name
        if path.is_file():
            try:
                merged[name] = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
    return merged


def setting(settings: dict[str, Any], *paths: str, default: Any) -> Any:
    """The first of `paths` ("file:key.sub") present in `settings`, else `default`."""
    for path in paths:
        name, _, dotted = path.partition(":")
        value: Any = settings.get(name)
        for part in dotted.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if value is not None:
            return value
    return default


class VideoCaptioner(Stage):
    """Shared flow of the captioners; subclasses set `Config` and the hooks below."""

    Config: ClassVar[type[CaptionerConfig]] = CaptionerConfig
    config: CaptionerConfig
    accelerated: ClassVar[bool] = True  # one worker per GPU by default, on either backend

    # -- hooks -----------------------------------------------------------------------------
    def loaded_cost(self) -> VideoCost:
        """Frame cost read from the loaded processor (defaults to the Config's estimate)."""
        return self.config.video_cost()

    def decode_size(self, width: int, height: int) -> tuple[int, int]:
        """The frame size (width, height) to decode at, given the upright video size."""
        return width, height

    def processor_kwargs(self) -> dict[str, Any]:
        """Extra kwargs for the processor call (both backends)."""
        return {}

    # -- life cycle ------------------------------------------------------------------------
    def __init__(self, config: CaptionerConfig, device: str = "cpu"):
        super().__init__(config, device)
        self.backend_name: str | None = None
        self.lm: Any = None

    def load(self) -> None:
        from stages.captioners.hf_backend import TransformersVideoLM

        self.backend_name = choose_backend(self.config.backend, self.device)
        log.info(
            "%s: backend %s on %s (backend: %s)",
            type(self).__name__,
            self.backend_name,
            self.device,
            self.config.backend,
        )
        # The processor (chat template, tokenizer, frame sizes) is needed by both backends.
        hf = TransformersVideoLM(
            self.config.model_path, self.device, self.config.dtype, self.config.trust_remote_code, type(self).__name__
        )
        if self.backend_name == "transformers":
            hf.load()
            self.lm = hf
        else:
            from stages.captioners.vllm_backend import VLLMVideoLM

            hf.load_processor()
            decode = partial(hf.processor.decode, skip_special_tokens=True)
            self.lm = VLLMVideoLM(
                self._engine_args(), self.device, self.config.max_num_seqs, type(self).__name__, decode
            )
            self.lm.load()
        self.hf = hf
        self.processor = hf.processor
        log.info("%s: video cost %s", type(self).__name__, self.loaded_cost().describe())

    def _engine_args(self) -> dict[str, Any]:
        c = self.config
        args = dict(
            model=c.model_path,
            trust_remote_code=c.trust_remote_code,
            tensor_parallel_size=c.tensor_parallel_size,
            max_model_len=c.max_model_len,
            max_num_seqs=c.max_num_seqs,
            dtype=c.dtype,
            gpu_memory_utilization=c.gpu_memory_utilization,
            limit_mm_per_prompt={"video": 1, "image": 0},
            disable_log_stats=True,
        )
        if c.seed is not None:
            args["seed"] = c.seed
        return {**args, **c.engine_args}

    def close(self) -> None:
        if self.lm is not None:
            self.lm.close()
        self.lm = None

    # -- per record ------------------------------------------------------------------------
    def prepare(self, record: dict[str, Any]) -> dict[str, Any]:
        from stages.video.frames import sample_frames

        c, name = self.config, type(self).__name__
        path = record.get(c.video_key)
        if path is None:
            raise StageError(
                f"{name}: the record has no {c.video_key!r} field (video_key); fields: "
                f"{sorted(k for k in record if not k.startswith('_'))}",
                error_type="MissingField",
            )
        instruction = format_prompt(c.prompt, record, where=name)
        text = self.chat_text(instruction)
        text_tokens = len(self.hf.thread_processor().tokenizer(text)["input_ids"])
        cost = self.loaded_cost()  # per call: max_pixels may change on a hot reload
        room = c.max_model_len - c.max_new_tokens - text_tokens
        fits = cost.frames_within(room, c.max_frames)
        if fits < cost.group:
            raise StageError(
                f"{name}: the prompt takes {text_tokens} tokens, which with max_new_tokens={c.max_new_tokens} "
                f"leaves no room for video frames in max_model_len={c.max_model_len}; shorten the prompt "
                "(or the record fields it uses) or raise max_model_len",
                error_type="PromptTooLong",
            )
        try:
            if c.fps is not None:
                sampled = sample_frames(
                    path, fps=c.fps, max_frames=fits, size=self.decode_size, over_max_frames="error"
                )
            else:
                sampled = sample_frames(path, num_frames=c.num_frames or fits, size=self.decode_size)
        except StageError as bad:
            raise _explain(bad, name, c, fits) from None
        frames = _whole_groups(sampled.frames, cost.group)
        metadata = {
            "fps": sampled.fps,
            "duration": sampled.duration_s,
            "total_num_frames": sampled.total_frames,
            "frames_indices": _whole_groups_list(sampled.indices, cost.group),
            "width": int(frames.shape[2]),
            "height": int(frames.shape[1]),
        }
        self.usage["sampled_frames"] += int(frames.shape[0])
        if self.backend_name == "vllm":
            from stages.captioners.vllm_backend import VideoRequest

            tokens = text_tokens + cost.tokens(frames.shape[0])
            prepared: Any = VideoRequest(
                text, frames, {**metadata, "video_backend": "pyav", "do_sample_frames": False}, self.processor_kwargs()
            )
        else:
            prepared = self.hf.encode(text, frames, metadata, self.processor_kwargs())
            tokens = int(prepared["input_ids"].shape[1])
        if tokens + c.max_new_tokens > c.max_model_len:
            raise StageError(
                f"{name}: {Path(path).name} with {frames.shape[0]} frames takes {tokens} tokens; with "
                f"max_new_tokens={c.max_new_tokens} that is over max_model_len={c.max_model_len}; lower num_frames, "
                "fps or max_pixels, or raise max_model_len",
                error_type="VideoTooLong",
            )
        return {**record, PREPARED: prepared}

    def chat_text(self, instruction: str) -> str:
        messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": instruction}]}]
        return self.hf.thread_processor().apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    # -- per batch -------------------------------------------------------------------------
    def _prepared(self, batch: list[dict[str, Any]]) -> list[Any]:
        """Prepared inputs per record; records the runtime did not prepare are prepared here."""
        out: list[Any] = []
        for record in batch:
            if PREPARED in record:
                out.append(record[PREPARED])
                continue
            try:
                out.append(self.prepare(record)[PREPARED])
            except StageError as bad:
                out.append(bad)
        return out

    def _sampling(self):
        from stages.captioners.hf_backend import Sampling

        c = self.config
        return Sampling(c.max_new_tokens, c.temperature, c.top_p, c.top_k, c.repetition_penalty, c.seed)

    def process(self, batch: list[dict[str, Any]]) -> list[dict[str, Any] | StageError]:
        prepared = self._prepared(batch)
        ready = [i for i, p in enumerate(prepared) if not isinstance(p, StageError)]
        if ready:
            captions = self.lm.generate([prepared[i] for i in ready], self._sampling())
            for i, caption in zip(ready, captions, strict=True):
                prepared[i] = caption
        return self._results(prepared, len(ready))

    async def aprocess(self, batch: list[dict[str, Any]]) -> list[dict[str, Any] | StageError]:
        if self.backend_name != "vllm":
            return await asyncio.to_thread(self.process, batch)
        prepared = (
            await asyncio.to_thread(self._prepared, batch)
            if any(PREPARED not in r for r in batch)
            else [r[PREPARED] for r in batch]
        )
        ready = [i for i, p in enumerate(prepared) if not isinstance(p, StageError)]
        if ready:
            captions = await self.lm.agenerate([prepared[i] for i in ready], self._sampling())
            for i, caption in zip(ready, captions, strict=True):
                prepared[i] = caption
        return self._results(prepared, len(ready))

    def _results(self, outcomes: list[Any], requests: int) -> list[dict[str, Any] | StageError]:
        key = self.config.caption_key
        results: list[dict[str, Any] | StageError] = []
        self.usage["captions"] += requests
        for outcome in outcomes:
            if isinstance(outcome, StageError):
                results.append(outcome)
                continue
            text, tokens_out, tokens_in = outcome
            self.usage["tokens_out"] += tokens_out
            self.usage["tokens_in"] += tokens_in
            results.append({key: text})
        return results


def choose_backend(wanted: str, device: str) -> str:
    if wanted != "auto":
        return wanted
    if device.startswith("cuda") and importlib.util.find_spec("vllm") is not None:
        return "vllm"
    return "transformers"


def _whole_groups(frames, group: int):
    """Pad a short clip to whole frame groups by repeating its last frame (Qwen takes pairs)."""
    import numpy as np

    short = -frames.shape[0] % group
    return np.concatenate([frames, np.repeat(frames[-1:], short, axis=0)]) if short else frames


def _whole_groups_list(indices: list[int], group: int) -> list[int]:
    short = -len(indices) % group
    return indices + indices[-1:] * short


def _explain(bad: StageError, name: str, config: CaptionerConfig, fits: int) -> StageError:
    """Add to a frame sampler error what the user can change."""
    fixes = {
        "VideoNotFound": "check the path in the input row (video_key) and meta_folder",
        "NoVideoStream": "this file holds no video (audio-only?); remove it from the input",
        "EmptyVideo": "the file holds no frames; re-encode or remove it",
        "VideoDecodeError": "the file is corrupt or truncated; re-encode it (ffmpeg -i in.mp4 -c:v libx264 out.mp4) "
        "or remove it from the input",
        "TooManyFrames": f"this is too long for max_model_len={config.max_model_len} (at most {fits} frames fit with "
        f"the prompt and max_new_tokens={config.max_new_tokens}); lower fps, set num_frames instead, lower "
        "max_pixels, or raise max_model_len",
    }
    fix = fixes.get(bad.error_type, "check the file")
    error_type = "VideoTooLong" if bad.error_type == "TooManyFrames" else bad.error_type
    return StageError(f"{name}: {bad.message}; {fix}", error_type=error_type)
