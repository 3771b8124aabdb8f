"""What the diffusers generators share: the config fields and checks every one takes, seeding,
loading knobs and record inputs (the load/call/write path is `_base.DiffusersGenerator`,
checkpoint checks live in _checkpoints.py, file writing in _media.py).

A generator's config declares its own keys with its model's defaults, and sets the class
attributes that drive the shared checks (its pipeline class, the multiple its sides must be, the
inputs it reads). Heavy imports (torch, diffusers, av, PIL) happen inside the functions, so
importing a generator module for `reelflow check` stays cheap.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import AliasChoices, Field, field_validator

from stages.base import MODEL_LOADING, StageConfig, StageError, format_prompt
from stages.engines import torch_dtype as torch_dtype  # re-exported: the generators call common.torch_dtype
from stages.generators._checkpoints import check_model_path, check_pipeline_class, checkpoint_json, multiple_of

log = logging.getLogger("reelflow.generators")

DType = Literal["auto", "float32", "float16", "bfloat16"]
PREPARED = "_gen"  # key under which `prepare` leaves its work in the record


class GeneratorConfig(StageConfig):
    """Fields every diffusers generator takes. Each stage adds its model's own, with its defaults.

    The class attributes say what the shared checks below need to know of the model.
    """

    # The stage's name, for messages; set from the stage's class name (`_base.DiffusersGenerator`).
    stage: ClassVar[str] = "a diffusers generator"
    # The diffusers pipeline class the checkpoint at `model_path` must hold (None: the stage
    # checks its checkpoints itself).
    pipeline: ClassVar[str | None] = None
    # (factor, model named in the message): height and width must be multiples of the factor.
    side_multiple: ClassVar[tuple[int, str] | None] = None
    needs_prompt: ClassVar[bool] = True  # a text prompt per record (from `prompt` or `text_key`)
    needs_image: ClassVar[bool] = False  # a conditioning image per record (from `image_key`)

    heavy_keys: ClassVar[frozenset[str]] = StageConfig.heavy_keys | {
        "variant",
        "cpu_offload",
        "subfolder",
        "motion_adapter_path",
        "base_model_path",
    }

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

    @field_validator("scheduler")
    @classmethod
    def _scheduler_name(cls, value: str | None) -> str | None:
        if value is not None and (not value.isidentifier() or not value.endswith("Scheduler")):
            raise ValueError(
                f"scheduler must name a diffusers scheduler class such as DDIMScheduler or "
                f"DPMSolverMultistepScheduler, got {value!r}"
            )
        return value

    @field_validator("model_path", check_fields=False)
    @classmethod
    def _model_path(cls, value: str) -> str:
        check_model_path(value)
        if cls.pipeline:
            check_pipeline_class(value, [cls.pipeline], cls.stage)
        return value

    @field_validator("height", "width", check_fields=False)
    @classmethod
    def _side(cls, value: int | None, info) -> int | None:
        if cls.side_multiple is None:
            return value
        factor, model = cls.side_multiple
        return multiple_of(value, factor, info.field_name, model)

    def input_fields(self) -> dict[str, Any]:
        fields = text_inputs(self) if self.needs_prompt else {}
        return {**fields, self.image_key: "image"} if self.needs_image else fields

    def outputs_per_record(self) -> int:
        return 1


class ImageGeneratorConfig(GeneratorConfig):
    """A text-to-image model: PNGs. Sizes are multiples of 16 and the seed's `weight` means width."""

    side_multiple: ClassVar[tuple[int, str] | None] = (16, "this model")

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

    num_videos_per_prompt: int = Field(1, ge=1, description="Videos per record (<id>~0.mp4, <id>~1.mp4, ...).")

    def outputs_per_record(self) -> int:
        return self.num_videos_per_prompt


# --- loading --------------------------------------------------------------------------------------

# The daemon loads its steps in parallel threads, and loading is not thread-safe: transformers'
# and diffusers' lazy modules fail ("cannot import name 'CLIPTextModel' from 'transformers") when
# several threads resolve them at once, and accelerate's init_empty_weights (diffusers'
# low_cpu_mem_usage path) patches torch.nn.Module process-wide, so a model built in another
# thread meanwhile gets meta tensors that its weights are never copied into. Generators hold
# this lock for all of `load` (and while resolving a class by name).
LOADING = MODEL_LOADING  # the process's one model-loading lock (stages/base.py)


def diffusers_class(name: str, *checkpoints: str):
    """`diffusers.<name>`, after importing every class the checkpoints' model_index.json names."""
    with LOADING:
        import diffusers

        found = getattr(diffusers, name)
        for checkpoint in checkpoints:
            for value in (checkpoint_json(checkpoint, "model_index.json") or {}).values():
                if isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value):
                    with contextlib.suppress(ImportError, AttributeError):  # from_pretrained says it better
                        getattr(importlib.import_module(value[0]), value[1])
        return found


def is_cuda(device: str) -> bool:
    return str(device).startswith("cuda")


def pretrained_kwargs(config: GeneratorConfig, dtype) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"dtype": dtype}  # diffusers >= 0.42 (torch_dtype is deprecated there)
    if config.variant:
        kwargs["variant"] = config.variant
    return kwargs


def check_offload(config: GeneratorConfig, device: str, stage: str) -> None:
    if config.cpu_offload and not is_cuda(device):
        raise ValueError(
            f"{stage}: cpu_offload: true needs a CUDA GPU (it moves each sub-model to the GPU only while it runs), "
            f"but this worker runs on {device!r}; set cpu_offload: false or give the step a GPU in `devices`"
        )
    if config.cpu_offload:
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"{stage}: cpu_offload: true but torch sees no CUDA device; set cpu_offload: false")


def place(pipe, config: GeneratorConfig, device: str) -> None:
    """Move the pipeline to its device (or offload it) and silence its progress bars."""
    if config.cpu_offload:
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)


def release(device: str) -> None:
    """After dropping a pipeline: give its GPU memory back (a reload after a config change needs it)."""
    import gc

    gc.collect()
    if is_cuda(device):
        import torch

        torch.cuda.empty_cache()


class Knobs:
    """Applies the settings that can change between batches without a reload (hot reload swaps
    `stage.config` in place): the scheduler and VAE tiling/slicing. Keeps the checkpoint's own
    scheduler so that unsetting `scheduler` goes back to it."""

    def __init__(self, pipe, stage: str):
        self.pipe = pipe
        self.stage = stage
        self.base_scheduler = pipe.scheduler
        self.applied: tuple | None = None

    def sync(self, scheduler: str | None, overrides: dict[str, Any], tiling: bool | None, slicing: bool | None):
        wanted = (scheduler, json.dumps(overrides, sort_keys=True, default=str), tiling, slicing)
        if wanted == self.applied:
            return
        self.pipe.scheduler = self._scheduler(scheduler, overrides)
        vae = self.pipe.vae
        if tiling is not None:
            vae.enable_tiling() if tiling else vae.disable_tiling()
        if slicing is not None:
            vae.enable_slicing() if slicing else vae.disable_slicing()
        self.applied = wanted

    def _scheduler(self, name: str | None, overrides: dict[str, Any]):
        base = self.base_scheduler
        if name is None and not overrides:
            return base
        try:
            cls = type(base) if name is None else diffusers_class(name)
        except AttributeError:
            cls = None
        if cls is None or not hasattr(cls, "from_config"):
            compatible = sorted(c.__name__ for c in getattr(base, "compatibles", []))
            raise ValueError(
                f"{self.stage}: scheduler {name!r} is not a diffusers scheduler; schedulers compatible with "
                f"this checkpoint: {', '.join(compatible)}"
            )
        return cls.from_config(base.config, **overrides)


def clip_text_model_shim(text_encoder) -> None:
    """diffusers 0.42 reads `text_encoder.text_model.final_layer_norm` when `clip_skip` is set, but
    transformers 5's CLIPTextModel has no `text_model` (its layers sit on the model itself).
    Point `text_model` back at the model, outside torch's module registry, so clip_skip works."""
    if not hasattr(text_encoder, "text_model"):
        object.__setattr__(text_encoder, "text_model", text_encoder)


_said_once: set[str] = set()


def log_once(key: str, message: str) -> None:
    if key not in _said_once:
        _said_once.add(key)
        log.warning(message)


# --- records --------------------------------------------------------------------------------------


def record_seed(seed: int, record_id: Any, index: int = 0) -> int:
    """A 63-bit seed from the config seed, the record id and the video index (stable across runs)."""
    digest = hashlib.sha256(f"{seed}\x00{record_id}\x00{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def cpu_generators(seeds: Iterable[int]):
    """CPU generators: diffusers draws the noise on the CPU and moves it, so a seed gives the
    same noise on any device."""
    import torch

    return [torch.Generator("cpu").manual_seed(seed) for seed in seeds]


def prompt_of(record: dict[str, Any], config: GeneratorConfig, where: str) -> str:
    if config.prompt:
        return format_prompt(config.prompt, record, where=where)
    value = record.get(config.text_key)
    if not isinstance(value, str) or not value.strip():
        fields = sorted(k for k in record if not str(k).startswith("_"))
        raise StageError(
            f"{where}: no prompt: the record's {config.text_key!r} field is "
            f"{'missing' if value is None else repr(value)[:60]} (fields: {fields}); "
            f"set text_key to the prompt's field or give a `prompt` template",
            error_type="MissingPrompt",
        )
    return value


def prompt_record_fields(template: str | None) -> list[str]:
    """The record fields a `str.format` prompt template reads (`id` and `job` are the runtime's, not inputs)."""
    import string

    if not template:
        return []
    names = [name for _, name, _, _ in string.Formatter().parse(template) if name]
    return [n.split(".")[0].split("[")[0] for n in names if n.split(".")[0].split("[")[0] not in ("id", "job")]


def text_inputs(config: GeneratorConfig) -> dict[str, str]:
    if config.prompt:
        return dict.fromkeys(prompt_record_fields(config.prompt), "text")
    return {config.text_key: "text"}


def load_image(record: dict[str, Any], key: str, where: str):
    """The record's conditioning image as an RGB PIL image, upright."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    value = record.get(key)
    if value is None or value == "":
        raise StageError(
            f"{where}: this model animates an image, but the record has no {key!r} field; "
            f"set image_key to the field holding the image path",
            error_type="MissingImage",
        )
    path = Path(value)
    if not path.is_file():
        raise StageError(f"{where}: image file not found: {path}", error_type="ImageNotFound")
    try:
        with Image.open(path) as image:
            image.load()
            return ImageOps.exif_transpose(image).convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise StageError(
            f"{where}: cannot read {path.name} as an image ({exc}); expected PNG, JPEG, WebP, ...",
            error_type="ImageDecodeError",
        ) from None
