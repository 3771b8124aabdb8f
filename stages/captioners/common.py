"""What the video captioners share: the stage flow (config keys and frame budget: `config.py`).

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
- `process` / `aprocess`: caption the batch. With `num_candidates: 1` and text output that is
  one generate call; otherwise candidates are sampled in rounds (seed + k, re-sampling answers
  that fail `json_schema`: candidates.py, structured.py) and one is chosen (select.py).

Backends. One stage class serves both; the backend is chosen in `load()` (`backend: auto`
picks vLLM when it is installed and the stage's device is a GPU, else transformers; the
choice is logged). Captioners declare themselves async (`resources`) on either backend, so
the runtime always awaits `aprocess`: with the vLLM
backend it submits every record of the batch to the engine at once (continuous batching
inside vLLM; the runtime keeps max_num_seqs / batch_size batches in flight); with the
transformers backend it runs the blocking `process` (one batched `generate`, one at a time
per model) in a worker thread, so the event loop never blocks. `process` works for both
backends, for callers without an event loop (benchmarks, plain loops).
"""

from __future__ import annotations

import asyncio
import json
import logging
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

from stages.base import Requirements, Resources, Stage, StageError, format_prompt
from stages.captioners.candidates import Captioned, sample_candidates
from stages.captioners.config import CaptionerConfig, VideoCost
from stages.captioners.select import SELECT_FRAME_COUNT, SELECT_FRAMES, CandidateSelector
from stages.captioners.structured import StructuredCaptions, schema_instruction
from stages.engines import choose_backend

log = logging.getLogger(__name__)

PREPARED = "_caption_input"  # the key prepare() adds to a record
FRAME_TIMES = "_frame_times_s"  # and the sampled frames' times in the video (seconds)


class VideoCaptioner(Stage):
    """Shared flow of the captioners; subclasses set `Config` and the hooks below."""

    Config: ClassVar[type[CaptionerConfig]] = CaptionerConfig
    config: CaptionerConfig
    accelerated: ClassVar[bool] = True  # one worker per GPU by default, on either backend

    @classmethod
    def resources(cls, config: CaptionerConfig) -> Resources:
        # One vLLM engine spans tensor_parallel_size GPUs and keeps max_num_seqs requests in
        # flight; the transformers backend runs behind the same `aprocess`, in a thread.
        slots = config.max_num_seqs
        return Resources(config.tensor_parallel_size, concurrency_slots=slots, asynchronous=True, prepares=True)

    @classmethod
    def out_of_memory_advice(cls, config: CaptionerConfig) -> str:
        return "lower max_pixels/num_frames or use a larger device"

    @classmethod
    def requirements(cls, config: CaptionerConfig) -> Requirements:
        needs = Requirements.of("captioners", "torch", "torchvision", "transformers", model_path=config.model_path)
        if config.backend == "vllm":
            needs |= Requirements.of("vllm", "vllm")
        if config.select == "clip_score":
            needs |= Requirements.of("captioners", select_model_path=config.select_model_path)
        if config.judge is not None:
            from stages.text.gpt import GPTTextGenerator

            needs |= GPTTextGenerator.requirements(config.judge).nested("judge")
        return needs

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
        self.selector: CandidateSelector | None = None
        self._validator: StructuredCaptions | None = None
        self._schema_key: str | None = None

    def load(self) -> None:
        from stages.engines.hf_vision import TransformersVideoLM

        self.backend_name = choose_backend(self.config.backend, self.device, type(self).__name__)
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
        self.selector = CandidateSelector(self.config, self.device, type(self).__name__)
        self.selector.load()
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
        if self.selector is not None:
            self.selector.close()
        self.lm = self.selector = None

    # -- per record ------------------------------------------------------------------------
    def prepare(self, record: dict[str, Any]) -> dict[str, Any]:
        from stages.video.frames import clip_window, record_video, sample_frames

        c, name = self.config, type(self).__name__
        path = record_video(record, c.video_key, name)
        instruction = format_prompt(c.prompt, record, where=name)
        if c.output_format == "json":  # after the placeholders: the schema's braces are not fields
            instruction += schema_instruction(c.json_schema)
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
            window = clip_window(record)  # a clip of the source (ShotSplitter): caption only the clip
            sample_frames = partial(sample_frames, decoder=c.decoder, device=self.device)  # the `decoder` key
            if c.fps is not None:
                sampled = sample_frames(
                    path, fps=c.fps, max_frames=fits, size=self.decode_size, over_max_frames="error", window=window
                )
            else:
                sampled = sample_frames(path, num_frames=c.num_frames or fits, size=self.decode_size, window=window)
        except StageError as bad:
            raise _explain(bad, name, c, fits) from None
        frames = _whole_groups(sampled.frames, cost.group)
        metadata = {
            "fps": sampled.fps,
            "duration": sampled.duration_s,
            "total_num_frames": sampled.total_frames,
            # The model sees the clip, so its frame numbers count from the clip's start.
            "frames_indices": _whole_groups_list([i - sampled.first_frame for i in sampled.indices], cost.group),
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
        out = {**record, PREPARED: prepared, FRAME_TIMES: sampled.timestamps_s}
        if c.select == "clip_score":
            step = max(1, len(sampled.frames) // SELECT_FRAME_COUNT)
            out[SELECT_FRAMES] = sampled.frames[::step][:SELECT_FRAME_COUNT]
        return out

    def chat_text(self, instruction: str) -> str:
        messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": instruction}]}]
        return self.hf.thread_processor().apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    # -- per batch -------------------------------------------------------------------------
    def _prepared_records(self, batch: list[dict[str, Any]]) -> list[dict[str, Any] | StageError]:
        """Each record prepared (the runtime usually did it; the others are prepared here)."""
        out: list[dict[str, Any] | StageError] = []
        for record in batch:
            if PREPARED in record:
                out.append(record)
                continue
            try:
                out.append(self.prepare(record))
            except StageError as bad:
                out.append(bad)
        return out

    def _sampling(self, seed_offset: int = 0):
        from stages.engines.hf_vision import CaptionSampling

        c = self.config
        seed = None if c.seed is None else c.seed + seed_offset
        schema = c.json_schema if c.output_format == "json" else None
        return CaptionSampling(c.max_new_tokens, c.temperature, c.top_p, c.top_k, c.repetition_penalty, seed, schema)

    def _plain(self) -> bool:
        """One text caption per record: the path that predates candidates and structured captions."""
        return self.config.num_candidates == 1 and self.config.output_format == "text"

    def process(self, batch: list[dict[str, Any]]) -> list[dict[str, Any] | StageError]:
        outcomes: list[Any] = self._prepared_records(batch)
        ready = [i for i, p in enumerate(outcomes) if not isinstance(p, StageError)]
        if ready:
            for i, outcome in zip(ready, self._caption([outcomes[i] for i in ready]), strict=True):
                outcomes[i] = outcome
        return self._results(outcomes, len(ready))

    async def aprocess(self, batch: list[dict[str, Any]]) -> list[dict[str, Any] | StageError]:
        # Candidates, retries and selection are rounds of blocking calls (the vLLM backend's
        # `generate` waits on its engine's own loop), so they run in a worker thread as well.
        if self.backend_name != "vllm" or not self._plain():
            return await asyncio.to_thread(self.process, batch)
        prepared: list[Any] = (
            await asyncio.to_thread(self._prepared_records, batch)
            if any(PREPARED not in r for r in batch)
            else list(batch)  # a copy: the answers replace its items, the runtime's batch stays as it is
        )
        ready = [i for i, p in enumerate(prepared) if not isinstance(p, StageError)]
        if ready:
            captions = await self.lm.agenerate([prepared[i][PREPARED] for i in ready], self._sampling())
            for i, caption in zip(ready, captions, strict=True):
                prepared[i] = caption
        return self._results(prepared, len(ready))

    def _caption(self, records: list[dict[str, Any]]) -> list[Any]:
        """A Generation (plain), a Captioned or a StageError per prepared record."""
        c, name = self.config, type(self).__name__
        inputs = [r[PREPARED] for r in records]
        if self._plain():
            return self.lm.generate(inputs, self._sampling())
        n, structured = c.num_candidates, self._structured(c)
        sampled = c.temperature > 0
        tries = 1 + (c.json_retries if structured is not None and sampled else 0)
        found, invalid, failed = sample_candidates(
            partial(self._generate_round, inputs), len(records), n, structured, tries, self.usage
        )
        outcomes: list[Any] = [None] * len(records)
        choose: list[int] = []
        for i in range(len(records)):
            if failed[i] is not None:
                outcomes[i] = failed[i]
            elif not found[i]:
                outcomes[i] = structured.error(name, invalid[i][min(invalid[i])], tries, sampled)
            elif n == 1:
                outcomes[i] = Captioned(found[i][0])
            else:
                choose.append(i)
        if choose:
            options = [[found[i][k] for k in sorted(found[i])] for i in choose]
            picks = self.selector.pick(c, [records[i] for i in choose], options)
            for i, candidates, pick in zip(choose, options, picks, strict=True):
                if isinstance(pick, StageError):
                    outcomes[i] = pick
                    continue
                selection = pick.as_dict()
                if invalid[i]:  # candidates still invalid after the retries, left out of the choice
                    selection["invalid_candidates"] = [
                        {"candidate": k, "field": bad.field, "error": bad.message}
                        for k, bad in sorted(invalid[i].items())
                    ]
                outcomes[i] = Captioned(candidates[pick.index], candidates, selection)
        return outcomes

    def _generate_round(self, inputs: list[Any], items: list[tuple[int, int]]) -> list[Any]:
        """A Generation or StageError per (record, seed offset), in order."""
        if self.backend_name == "vllm":  # every request at once, each with its own seed
            return self.lm.generate([inputs[i] for i, _ in items], [self._sampling(o) for _, o in items])
        out: list[Any] = [None] * len(items)
        by_offset: dict[int, list[int]] = {}
        for position, (_, offset) in enumerate(items):
            by_offset.setdefault(offset, []).append(position)
        for offset, positions in sorted(by_offset.items()):  # one batched generate per seed
            generations = self.lm.generate([inputs[items[p][0]] for p in positions], self._sampling(offset))
            for position, generation in zip(positions, generations, strict=True):
                out[position] = generation
        return out

    def _structured(self, config: CaptionerConfig) -> StructuredCaptions | None:
        if config.output_format != "json":
            return None
        key = json.dumps(config.json_schema, sort_keys=True)
        if self._schema_key != key:  # built once per schema (a hot reload may change it)
            self._validator, self._schema_key = StructuredCaptions(config.json_schema), key
        return self._validator

    def take_usage(self):
        used = super().take_usage()
        if self.selector is not None:
            used.update(self.selector.take_usage())
        return used

    def _results(self, outcomes: list[Any], requests: int) -> list[dict[str, Any] | StageError]:
        key = self.config.caption_key
        results: list[dict[str, Any] | StageError] = []
        self.usage["captions"] += requests
        for outcome in outcomes:
            if isinstance(outcome, StageError):
                results.append(outcome)
            elif isinstance(outcome, Captioned):
                results.append(outcome.result(key))
            else:
                self.usage["tokens_out"] += outcome.tokens_out
                self.usage["tokens_in"] += outcome.tokens_in
                results.append({key: outcome.text})
        return results


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
