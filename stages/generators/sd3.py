"""StableDiffusionGenerator: text to image with Stable Diffusion 3 / 3.5 (StableDiffusion3Pipeline).

Registered as `ImageGenerator/StableDiffusionGenerator` (also `StableDiffusion3Generator`, the
name in the seed's image config) and, as the seed lists it under video generation, as a
`VideoGenerator` too. One PNG per record; prompts in a batch go through one pipeline call.
"""

from __future__ import annotations

from typing import Any

from pydantic import AliasChoices, Field, field_validator

from stages.base import Stage, StageError, require
from stages.generators import _checkpoints as checkpoints
from stages.generators import _common as common
from stages.generators import _media as media

PIPELINE = "StableDiffusion3Pipeline"


class StableDiffusion3Config(common.GeneratorConfig):
    model_path: str = Field("stabilityai/stable-diffusion-3.5-large", description="SD3 checkpoint folder or hub id.")
    num_inference_steps: int = Field(28, ge=1, description="Denoising steps (SD3.5 large: 28).")
    guidance_scale: float = Field(3.5, ge=0, description="Classifier-free guidance (SD3.5 large: 3.5).")
    negative_prompt: str | None = Field(None, description="Negative prompt (used when guidance_scale > 1).")
    height: int = Field(1024, ge=16, description="Image height in pixels, a multiple of 16.")
    width: int = Field(
        1024,
        ge=16,
        description="Image width in pixels, a multiple of 16 (`weight`, the seed's spelling, is accepted).",
        validation_alias=AliasChoices("width", "weight"),
    )
    max_sequence_length: int = Field(256, ge=1, le=512, description="T5 prompt tokens (at most 512).")
    num_images_per_prompt: int = Field(
        1, ge=1, description="Images per record; more than one are saved as <id>_0.png, <id>_1.png, ..."
    )
    enable_vae_tiling: bool = Field(False, description="Decode in tiles (less memory for large images).")
    enable_vae_slicing: bool = Field(False, description="Decode one image of the batch at a time (less memory).")

    @field_validator("height", "width")
    @classmethod
    def _sixteen(cls, value: int, info) -> int:
        return checkpoints.multiple_of(value, 16, info.field_name, "Stable Diffusion 3")

    @field_validator("model_path")
    @classmethod
    def _model(cls, value: str) -> str:
        checkpoints.check_model_path(value)
        checkpoints.check_pipeline_class(value, [PIPELINE], "StableDiffusionGenerator")
        return value

    def input_fields(self) -> dict[str, Any]:
        return common.text_inputs(self)


class StableDiffusionGenerator(Stage):
    Config = StableDiffusion3Config
    accelerated = True  # one resident pipeline per GPU

    def load(self) -> None:
        with common.LOADING:  # loading is not thread-safe (see _common.LOADING)
            require("diffusers", stage="StableDiffusionGenerator", extra="generators")
            config = self.config
            common.check_offload(config, self.device, "StableDiffusionGenerator")
            checkpoints.ensure_pipeline_class(config.model_path, [PIPELINE], "StableDiffusionGenerator")
            dtype = common.torch_dtype(config.dtype, self.device, "bfloat16")
            self.pipe = common.diffusers_class(PIPELINE, config.model_path).from_pretrained(
                config.model_path, **common.pretrained_kwargs(config, dtype)
            )
            common.place(self.pipe, config, self.device)
            self.knobs = common.Knobs(self.pipe, "StableDiffusionGenerator")

    def prepare(self, record: dict[str, Any]) -> dict[str, Any]:
        return {
            **record,
            common.PREPARED: {"prompt": common.prompt_of(record, self.config, "StableDiffusionGenerator")},
        }

    def process(self, batch: list[dict[str, Any]]) -> list[dict[str, Any] | StageError]:
        return common.run_batch(batch, self.prepare, self._generate, self._write)

    def _generate(self, records: list[dict[str, Any]]) -> list[list]:
        config = self.config
        self.knobs.sync(config.scheduler, config.scheduler_config, config.enable_vae_tiling, config.enable_vae_slicing)
        rows, seeds = common.expand(records, config.num_images_per_prompt, config.seed)
        images = self.pipe(
            prompt=[row[common.PREPARED]["prompt"] for row in rows],
            negative_prompt=[config.negative_prompt] * len(rows) if config.negative_prompt else None,
            height=config.height,
            width=config.width,
            num_inference_steps=config.num_inference_steps,
            guidance_scale=config.guidance_scale,
            max_sequence_length=config.max_sequence_length,
            generator=common.cpu_generators(seeds),
            output_type="np",
        ).images
        return common.regroup(media.to_uint8(images), config.num_images_per_prompt)

    def _write(self, record: dict[str, Any], images: list) -> dict[str, Any]:
        return common.write_images(record, images, self.config, self.usage)

    def close(self) -> None:
        self.pipe = self.knobs = None
        common.release(self.device)
