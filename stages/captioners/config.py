"""The captioners' shared config keys and frame budget, checked before anything loads.

`CaptionerConfig` holds the seed's keys plus the backend and frame settings; each stage's
Config subclass says what a video costs its model in tokens (`video_cost`), read from the
checkpoint's JSON files when `model_path` is a local folder, else the released checkpoints'
sizes. The validator refuses a `num_frames` that cannot fit `max_model_len` together with the
prompt and `max_new_tokens`, and says how many would. It also refuses candidate and
structured-caption settings that cannot work together (sampled candidates under greedy
decoding, a `select` with one candidate, `judge` without its config, JSON without a schema).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from stages.base import StageConfig
from stages.text.gpt import GPTTextGeneratorConfig
from stages.video.decoders import DecoderKey

TEMPLATE_TOKENS = 40  # chat-template tokens (roles, system turn) assumed before the model is loaded
MIN_PIXELS_FLOOR = 28 * 28


class CaptionerConfig(StageConfig, DecoderKey):  # DecoderKey: the `decoder` key (frame decoding)
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
    # -- candidates and selection (stages/captioners/select.py) ---------------------------
    num_candidates: int = Field(
        1, ge=1, le=16, description="Captions sampled per clip (candidate k uses seed + k); 1 = one caption."
    )
    select: Literal["first", "longest", "clip_score", "judge"] = Field(
        "first",
        description="Which candidate becomes the caption: the first, the longest, the best CLIP match "
        "with the clip's frames, or the one a judge model picks (see `judge`).",
    )
    select_model_path: str = Field(
        "openai/clip-vit-large-patch14", description="select: clip_score: the CLIP model (folder or hub id)."
    )
    judge: GPTTextGeneratorConfig | None = Field(
        None,
        description="select: judge: a GPTTextGenerator config (backend, model, base_url, prompt, ...); its "
        "prompt may use {candidates} (numbered list), {num_candidates} and the record's fields.",
    )
    # -- structured captions (stages/captioners/structured.py) ----------------------------
    output_format: Literal["text", "json"] = Field(
        "text", description="json: the caption is a JSON object that must match `json_schema`."
    )
    json_schema: dict[str, Any] | None = Field(
        None, description="output_format: json: the JSON Schema of a caption (e.g. subject, action, camera)."
    )
    json_retries: int = Field(
        2, ge=0, le=10, description="output_format: json: new samples for an invalid caption (needs temperature > 0)."
    )

    heavy_keys: ClassVar[frozenset[str]] = StageConfig.heavy_keys | {
        "max_model_len",
        "max_num_seqs",
        "gpu_memory_utilization",
        "engine_args",
        "select",
        "select_model_path",
        "judge",
    }

    @field_validator("json_schema")
    @classmethod
    def _schema(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            from stages.captioners.structured import check_schema

            check_schema(value)
        return value

    @model_validator(mode="after")
    def _candidates_and_format(self):
        n = self.num_candidates
        if n > 1 and self.temperature == 0:
            raise ValueError(
                f"num_candidates={n} with temperature 0 (greedy decoding) gives {n} identical captions; "
                "set temperature > 0 (e.g. 0.7) to sample distinct candidates, or num_candidates: 1"
            )
        if self.select != "first" and n == 1:
            raise ValueError(
                f"select: {self.select} chooses among candidates but num_candidates is 1; "
                "set num_candidates > 1 or select: first"
            )
        if self.select == "judge" and self.judge is None:
            raise ValueError(
                "select: judge needs a `judge:` block, a GPTTextGenerator config, e.g. "
                "{backend: openai, model: gpt-4o-mini, base_url: http://127.0.0.1:8000/v1}"
            )
        if self.judge is not None and self.select != "judge":
            raise ValueError(f"`judge` is set but select is {self.select}; set select: judge or remove `judge`")
        if self.output_format == "json" and self.json_schema is None:
            raise ValueError(
                "output_format: json needs `json_schema`, e.g. {type: object, properties: {subject: {type: string}}, "
                "required: [subject]}"
            )
        if self.json_schema is not None and self.output_format != "json":
            raise ValueError("`json_schema` is set but output_format is text; set output_format: json")
        return self

    def full_prompt(self) -> str:
        """`prompt` plus, for structured captions, the schema the answer must follow."""
        if self.output_format != "json" or self.json_schema is None:
            return self.prompt
        from stages.captioners.structured import schema_instruction

        return self.prompt + schema_instruction(self.json_schema)

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
        text = estimate_text_tokens(self.full_prompt())
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
