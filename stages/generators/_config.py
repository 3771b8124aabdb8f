"""The generators' config keys, each written once: the ones every diffusers generator takes
(`GeneratorConfig`, `ImageGeneratorConfig`, `VideoGeneratorConfig`) and the groups only some
pipelines take (`Guided`, `ClipSkip`, `DecodeChunks`), with their checks.

A generator's config picks the groups its pipeline takes, gives its model's defaults in one
`defaults` mapping and what is particular to the model in `notes` (added to those keys'
descriptions, as `reelflow steps NAME` prints them), and declares only the keys that are its
own. For example:

    class ModelScopeT2VConfig(common.VideoGeneratorConfig, common.Guided, common.ClipSkip):
        pipeline = "TextToVideoSDPipeline"
        side_multiple = 8
        defaults = dict(model_path="damo-vilab/text-to-video-ms-1.7b", guidance_scale=9.0, height=256)
        notes = dict(height="trained at 256")

The class attributes say what the shared checks need to know of the model (its pipeline class,
the multiple its sides must be, the inputs it reads). Nothing here imports torch or diffusers.
"""

from __future__ import annotations

import copy
import string
from typing import Any, ClassVar, Literal

from pydantic import AliasChoices, BaseModel, Field, field_validator

from stages.base import StageConfig
from stages.generators._checkpoints import check_model_path, check_pipeline_class, multiple_of

DType = Literal["auto", "float32", "float16", "bfloat16"]
SIDES = ("height", "width")


class GeneratorConfig(StageConfig):
    """Keys every diffusers generator takes. Each stage adds its model's own, with its defaults.

    The class attributes say what the shared checks below need to know of the model.
    """

    # The stage's name, for messages; set from the stage's class name (`_base.DiffusersGenerator`).
    stage: ClassVar[str] = "a diffusers generator"
    # The diffusers pipeline class the checkpoint at `model_path` must hold (None: the stage
    # checks its checkpoints itself).
    pipeline: ClassVar[str | None] = None
    # Height and width must be multiples of it (None: any size).
    side_multiple: ClassVar[int | None] = None
    needs_prompt: ClassVar[bool] = True  # a text prompt per record (from `prompt` or `text_key`)
    needs_image: ClassVar[bool] = False  # a conditioning image per record (from `image_key`)
    # This model's defaults for keys declared above it, and its notes on them (see the module).
    defaults: ClassVar[dict[str, Any]] = {}
    notes: ClassVar[dict[str, str]] = {}
    # The keys a class adds that the pipeline call takes under the same name: as they are
    # (`call_keys`), or once per sample (`per_sample_keys`, e.g. negative_prompt). Each class
    # names only its own keys; `pipeline_keys` gathers them from the whole hierarchy.
    call_keys: ClassVar[tuple[str, ...]] = ()
    per_sample_keys: ClassVar[tuple[str, ...]] = ()

    heavy_keys: ClassVar[frozenset[str]] = StageConfig.heavy_keys | {
        "variant",
        "cpu_offload",
        "subfolder",
        "motion_adapter_path",
        "base_model_path",
    }

    model_path: str = Field(description="Checkpoint folder or hub id.")
    num_inference_steps: int = Field(25, ge=1, description="Denoising steps.")
    prompt: str | None = Field(
        None,
        description="Prompt template with {field} placeholders filled from the record; "
        "default: the record's `text_key` field.",
    )
    seed: int = Field(
        42,
        ge=0,
        description="Base seed. Each record's generator is seeded from (seed, record id, video index), "
        "so the same record and seed give the same output whatever else is in the batch.",
    )
    dtype: DType = Field(
        "auto",
        description="Weights dtype. `auto`: the model's recommended half precision on a GPU, float32 on CPU.",
    )
    variant: str | None = Field(None, description="Weights variant to load, e.g. `fp16` (files `*.fp16.safetensors`).")
    cpu_offload: bool = Field(
        False,
        description="Keep sub-models on the CPU and move each to the GPU only while it runs "
        "(diffusers' enable_model_cpu_offload). Needs a CUDA device.",
    )
    scheduler: str | None = Field(
        None,
        description="A diffusers scheduler class name (e.g. DPMSolverMultistepScheduler) built from the "
        "checkpoint's scheduler config; default: the checkpoint's own (or the model's recommended one).",
    )
    scheduler_config: dict[str, Any] = Field(
        default_factory=dict,
        description="Overrides for the scheduler's config, e.g. {timestep_spacing: trailing, beta_schedule: linear}.",
    )
    output_key: str | None = Field(
        None,
        description="Record field for the generated file's path; default `video_key` (videos) or `image_key` (images).",
    )
    filename: str | None = Field(
        None,
        description="File name template without extension, with {id}, {job} and record fields; default `{id}`, "
        "or `{id}~<output_key>` when output_key is set to a key of its own.",
    )

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        """Apply this class's own `defaults` and `notes`, and name its side multiple in the
        height and width descriptions, then rebuild the model with them."""
        super().__pydantic_init_subclass__(**kwargs)
        own = cls.__dict__
        notes = dict(own.get("notes", {}))
        if own.get("side_multiple"):
            for side in SIDES:
                if side in cls.__pydantic_fields__ and "multiple" not in (
                    cls.__pydantic_fields__[side].description or ""
                ):
                    notes[side] = ", ".join(filter(None, (f"a multiple of {cls.side_multiple}", notes.get(side))))
        changes = {**dict.fromkeys(notes), **own.get("defaults", {})}
        if not changes:
            return
        for key in changes:
            if key not in cls.__pydantic_fields__:
                raise TypeError(f"{cls.__name__}: defaults/notes name {key!r}, which is not a key of this config")
            field = cls.__pydantic_fields__[key] = copy.copy(cls.__pydantic_fields__[key])
            if key in own.get("defaults", {}):
                field.default = own["defaults"][key]
            if key in notes:
                field.description = f"{(field.description or '').rstrip('.')} ({notes[key]})."
        cls.model_rebuild(force=True)

    @field_validator("scheduler")
    @classmethod
    def _scheduler_name(cls, value: str | None) -> str | None:
        if value is not None and (not value.isidentifier() or not value.endswith("Scheduler")):
            raise ValueError(
                f"scheduler must name a diffusers scheduler class such as DDIMScheduler or "
                f"DPMSolverMultistepScheduler, got {value!r}"
            )
        return value

    @field_validator("model_path")
    @classmethod
    def _model_path(cls, value: str) -> str:
        check_model_path(value)
        if cls.pipeline:
            check_pipeline_class(value, [cls.pipeline], cls.stage)
        return value

    @field_validator(*SIDES, check_fields=False)
    @classmethod
    def _side(cls, value: int | None, info) -> int | None:
        if cls.side_multiple is None:
            return value
        return multiple_of(value, cls.side_multiple, info.field_name, cls.stage)

    @classmethod
    def pipeline_keys(cls, kind: Literal["call_keys", "per_sample_keys"]) -> tuple[str, ...]:
        """The `kind` keys that every class this config is made of names (its groups', its own)."""
        return tuple(dict.fromkeys(key for klass in cls.__mro__ for key in vars(klass).get(kind, ())))

    def input_fields(self) -> dict[str, Any]:
        fields = text_inputs(self) if self.needs_prompt else {}
        return {**fields, self.image_key: "image"} if self.needs_image else fields

    def outputs_per_record(self) -> int:
        return 1


class ImageGeneratorConfig(GeneratorConfig):
    """A text-to-image model: PNGs. Sizes are multiples of 16 and the seed's `weight` means width."""

    side_multiple: ClassVar[int | None] = 16

    height: int = Field(1024, ge=16, description="Image height in pixels, a multiple of 16.")
    width: int = Field(
        1024,
        ge=16,
        description="Image width in pixels, a multiple of 16 (`weight`, the seed's spelling, is accepted).",
        validation_alias=AliasChoices("width", "weight"),
    )
    num_images_per_prompt: int = Field(
        1, ge=1, description="Images per record; more than one are saved as <id>~0.png, <id>~1.png, ..."
    )
    enable_vae_tiling: bool = Field(False, description="Decode in tiles (less memory for large images).")
    enable_vae_slicing: bool = Field(False, description="Decode one image of the batch at a time (less memory).")

    def outputs_per_record(self) -> int:
        return self.num_images_per_prompt


class VideoGeneratorConfig(GeneratorConfig):
    """A video model: h264 mp4s at the config's `fps`, which each model declares with its own default."""

    call_keys = ("num_frames",)

    height: int = Field(512, ge=8, description="Frame height in pixels.")
    width: int = Field(512, ge=8, description="Frame width in pixels.")
    num_frames: int = Field(16, ge=1, description="Frames to generate.")
    fps: float = Field(8, gt=0, description="Frame rate of the written video.")
    num_videos_per_prompt: int = Field(1, ge=1, description="Videos per record (<id>~0.mp4, <id>~1.mp4, ...).")
    enable_vae_tiling: bool = Field(False, description="Decode in spatial tiles (less memory).")
    enable_vae_slicing: bool = Field(True, description="Decode one video of the batch at a time (less memory).")

    def outputs_per_record(self) -> int:
        return self.num_videos_per_prompt


# --- the keys only some pipelines take ------------------------------------------------------------


class Guided(BaseModel):
    """Classifier-free guidance with a negative prompt."""

    call_keys: ClassVar[tuple[str, ...]] = ("guidance_scale",)
    per_sample_keys: ClassVar[tuple[str, ...]] = ("negative_prompt",)

    guidance_scale: float = Field(7.5, ge=0, description="Classifier-free guidance.")
    negative_prompt: str | None = Field(None, description="Negative prompt.")


class ClipSkip(BaseModel):
    """A CLIP text encoder whose last layers can be skipped (the loader shims transformers 5's CLIP for it)."""

    call_keys: ClassVar[tuple[str, ...]] = ("clip_skip",)

    clip_skip: int | None = Field(None, ge=1, description="CLIP layers to skip for the prompt embedding.")


class DecodeChunks(BaseModel):
    """A VAE that decodes the frames a chunk at a time."""

    call_keys: ClassVar[tuple[str, ...]] = ("decode_chunk_size",)

    decode_chunk_size: int = Field(16, ge=1, description="Frames decoded by the VAE at a time (lower: less memory).")


# --- record inputs --------------------------------------------------------------------------------


def prompt_record_fields(template: str | None) -> list[str]:
    """The record fields a `str.format` prompt template reads (`id` and `job` are the runtime's, not inputs)."""
    if not template:
        return []
    names = [name for _, name, _, _ in string.Formatter().parse(template) if name]
    return [n.split(".")[0].split("[")[0] for n in names if n.split(".")[0].split("[")[0] not in ("id", "job")]


def text_inputs(config: GeneratorConfig) -> dict[str, str]:
    if config.prompt:
        return dict.fromkeys(prompt_record_fields(config.prompt), "text")
    return {config.text_key: "text"}
