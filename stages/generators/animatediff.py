"""Text to video with AnimateDiff (a motion adapter on a Stable Diffusion 1.5 base).

`model_path` may name either half, as the two seeds do: the motion adapter (the seed's table:
guoyww/animatediff-motion-adapter-v1-5-2) or the SD 1.5 base model (DataFlow-Gen's config:
emilianJR/epiCRealism). Which one it is comes from the checkpoint itself: a `MotionAdapter`
config.json or a pipeline's model_index.json. The other half comes from `base_model_path` or
`motion_adapter_path`. The scheduler defaults to AnimateDiff's recommended DDIM setup. The
shared path: `_base.DiffusersGenerator`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from stages.base import Requirements
from stages.generators import _checkpoints as checkpoints
from stages.generators import _common as common
from stages.generators._base import DiffusersGenerator, Samples

BASE_PIPELINES = ("StableDiffusionPipeline", "AnimateDiffPipeline")
DEFAULT_ADAPTER = "guoyww/animatediff-motion-adapter-v1-5-2"
DEFAULT_BASE = "emilianJR/epiCRealism"
Kind = Literal["adapter", "base"]
KNOWN_KINDS: dict[str, Kind] = {DEFAULT_ADAPTER: "adapter", DEFAULT_BASE: "base"}


def kind_of(model_path: str, fetch: bool = False) -> Kind | None:
    """ "adapter" (MotionAdapter config.json), "base" (a pipeline's model_index.json), or None if unknown."""
    read = checkpoints.fetch_json if fetch else checkpoints.checkpoint_json
    config = read(model_path, "config.json")
    if config is not None and config.get("_class_name") == "MotionAdapter":
        return "adapter"
    if read(model_path, "model_index.json") is not None:
        return "base"
    return None


class AnimateDiffConfig(common.VideoGeneratorConfig, common.Guided, common.ClipSkip, common.DecodeChunks):
    # No `pipeline`: model_path may be either half, so _checkpoints below tells them apart.
    side_multiple = 8
    defaults = dict(negative_prompt="bad quality, worse quality", scheduler="DDIMScheduler")
    notes = dict(num_frames="at most the adapter's motion_max_seq_length, 32", scheduler="AnimateDiff: DDIM")

    model_path: str = Field(
        DEFAULT_ADAPTER, description="The motion adapter or the SD 1.5 base model (told apart by the checkpoint)."
    )
    motion_adapter_path: str = Field(DEFAULT_ADAPTER, description="Motion adapter, when model_path is the base.")
    base_model_path: str = Field(DEFAULT_BASE, description="SD 1.5 base model, when model_path is the adapter.")
    scheduler_config: dict[str, Any] = Field(
        default_factory=lambda: {
            "clip_sample": False,
            "timestep_spacing": "linspace",
            "beta_schedule": "linear",
            "steps_offset": 1,
        },
        description="Scheduler config overrides (AnimateDiff's recommended DDIM setup by default).",
    )

    @field_validator("motion_adapter_path", "base_model_path")  # model_path: GeneratorConfig's check
    @classmethod
    def _path(cls, value: str, info) -> str:
        return checkpoints.check_model_path(value, info.field_name)

    def halves(self, kind: Kind) -> tuple[str, str]:
        """(adapter, base) for a model_path of this kind."""
        return (
            (self.model_path, self.base_model_path)
            if kind == "adapter"
            else (self.motion_adapter_path, self.model_path)
        )

    @model_validator(mode="after")
    def _checkpoints(self):
        kind = kind_of(self.model_path) or KNOWN_KINDS.get(self.model_path)
        if kind is None:
            if Path(self.model_path).expanduser().is_dir():
                raise ValueError(
                    f"model_path {self.model_path!r} is neither a motion adapter (config.json with _class_name "
                    f"MotionAdapter) nor a Stable Diffusion 1.5 pipeline (model_index.json)"
                )
            check_adapter(self.model_path, self.num_frames)  # a hub id not downloaded yet: told apart at load
            return self
        adapter, base = self.halves(kind)
        key = "base_model_path" if kind == "adapter" else "model_path"
        checkpoints.check_pipeline_class(base, BASE_PIPELINES, f"{self.stage} (base model)", key)
        check_adapter(adapter, self.num_frames)
        return self


def check_adapter(adapter: str, num_frames: int, fetch: bool = False) -> int:
    """Refuse what is not a MotionAdapter, and more frames than it was trained for; the limit."""
    config = (checkpoints.fetch_json if fetch else checkpoints.checkpoint_json)(adapter, "config.json")
    if config is None and Path(adapter).expanduser().is_dir():
        raise ValueError(f"motion adapter {adapter!r} has no config.json; it is not a MotionAdapter checkpoint")
    if config is None:
        limit = 32  # not on disk yet; every published AnimateDiff adapter (guoyww v1-4 to v1-5-3, AnimateLCM)
    elif config.get("_class_name") != "MotionAdapter":
        raise ValueError(
            f"motion adapter {adapter!r} holds a {config.get('_class_name')}, not a MotionAdapter; "
            f"set motion_adapter_path to an AnimateDiff motion adapter"
        )
    else:
        limit = int(config.get("motion_max_seq_length", 32))
    if num_frames > limit:
        raise ValueError(
            f"num_frames must be at most {limit} for motion adapter {adapter!r} (its motion_max_seq_length), "
            f"got {num_frames}"
        )
    return limit


class AnimateDiffGenerator(DiffusersGenerator):
    registered_as = ("VideoGenerator",)
    Config = AnimateDiffConfig
    half_dtype = "float16"

    @classmethod
    def requirements(cls, config: AnimateDiffConfig) -> Requirements:
        # The other half is checked when set: its default serves one kind of model_path only.
        halves = {key: getattr(config, key) for key in ("base_model_path", "motion_adapter_path")}
        return super().requirements(config) | Requirements.of(
            "generators", **{key: value for key, value in halves.items() if key in config.model_fields_set}
        )

    def load_pipeline(self, dtype):
        config = self.config
        kind = kind_of(config.model_path, fetch=True)
        if kind is None:
            raise ValueError(
                f"{self.name}: model_path {config.model_path!r} has neither a MotionAdapter config.json "
                f"nor a model_index.json; give the motion adapter or the SD 1.5 base model"
            )
        adapter_path, base_path = config.halves(kind)
        check_adapter(adapter_path, config.num_frames, fetch=True)
        checkpoints.ensure_pipeline_class(base_path, BASE_PIPELINES, f"{self.name} (base model)")
        adapter = common.diffusers_class("MotionAdapter").from_pretrained(adapter_path, dtype=dtype)
        self.max_frames = adapter.config.motion_max_seq_length
        # `variant` applies to the base model: adapters are published in one precision.
        return self.from_pretrained("AnimateDiffPipeline", base_path, dtype, motion_adapter=adapter)

    def call_args(self, samples: Samples) -> dict[str, Any]:
        if self.config.num_frames > self.max_frames:  # after a hot reload
            raise ValueError(f"num_frames must be at most {self.max_frames} for this motion adapter")
        return {}
