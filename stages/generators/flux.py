"""FLUXGenerator: text to image with FLUX.1 (diffusers FluxPipeline); one PNG per record.

Registered as `ImageGenerator/FLUXGenerator` and, because the seed lists it under video
generation, as `VideoGenerator/FLUXGenerator` too. Prompts in a batch go through one pipeline
call, each with its own seeded generator.
"""

from __future__ import annotations

from typing import Any

from pydantic import AliasChoices, Field, field_validator, model_validator

from stages.base import Stage, StageError, require
from stages.generators import _checkpoints as checkpoints
from stages.generators import _common as common
from stages.generators import _media as media

PIPELINE = "FluxPipeline"


class FLUXConfig(common.GeneratorConfig):
    model_path: str = Field("black-forest-labs/FLUX.1-dev", description="FLUX checkpoint folder or hub id.")
    num_inference_steps: int = Field(50, ge=1, description="Denoising steps (FLUX.1-dev: 50; schnell: 4).")
    guidance_scale: float = Field(3.5, ge=0, description="Distilled guidance (FLUX.1-dev: 3.5).")
    true_cfg_scale: float = Field(
        1.0, ge=1.0, description="Real classifier-free guidance; > 1 makes negative_prompt take effect (2x compute)."
    )
    negative_prompt: str | None = Field(None, description="Negative prompt; needs true_cfg_scale > 1.")
    height: int = Field(1024, ge=16, description="Image height in pixels, a multiple of 16.")
    width: int = Field(
        1024,
        ge=16,
        description="Image width in pixels, a multiple of 16 (`weight`, the seed's spelling, is accepted).",
        validation_alias=AliasChoices("width", "weight"),
    )
    max_sequence_length: int = Field(512, ge=1, le=512, description="T5 prompt tokens (at most 512).")
    num_images_per_prompt: int = Field(
        1, ge=1, description="Images per record; more than one are saved as <id>_0.png, <id>_1.png, ..."
    )
    enable_vae_tiling: bool = Field(False, description="Decode in tiles (less memory for large images).")
    enable_vae_slicing: bool = Field(False, description="Decode one image of the batch at a time (less memory).")

    @field_validator("height", "width")
    @classmethod
    def _sixteen(cls, value: int, info) -> int:
        # FluxPipeline floors other sizes silently (to vae_scale_factor * 2 = 16).
        return checkpoints.multiple_of(value, 16, info.field_name, "FLUX (the pipeline would silently floor it)")

    @field_validator("model_path")
    @classmethod
    def _model(cls, value: str) -> str:
        checkpoints.check_model_path(value)
        checkpoints.check_pipeline_class(value, [PIPELINE], "FLUXGenerator")
        return value

    @model_validator(mode="after")
    def _negative_needs_cfg(self):
        if self.negative_prompt and self.true_cfg_scale <= 1.0:
            raise ValueError(
                "negative_prompt has no effect on FLUX unless true_cfg_scale > 1 (FLUX.1-dev is guidance-distilled); "
                "set true_cfg_scale (e.g. 4.0) or drop negative_prompt"
            )
        return self

    def input_fields(self) -> dict[str, Any]:
        return common.text_inputs(self)


class FLUXGenerator(Stage):
    Config = FLUXConfig
    accelerated = True  # one resident pipeline per GPU

    def load(self) -> None:
        with common.LOADING:  # loading is not thread-safe (see _common.LOADING)
            require("diffusers", stage="FLUXGenerator", extra="generators")
            config = self.config
            common.check_offload(config, self.device, "FLUXGenerator")
            checkpoints.ensure_pipeline_class(config.model_path, [PIPELINE], "FLUXGenerator")
            dtype = common.torch_dtype(config.dtype, self.device, "bfloat16")
            self.pipe = common.diffusers_class(PIPELINE, config.model_path).from_pretrained(
                config.model_path, **common.pretrained_kwargs(config, dtype)
            )
            common.place(self.pipe, config, self.device)
            self.knobs = common.Knobs(self.pipe, "FLUXGenerator")

    def prepare(self, record: dict[str, Any]) -> dict[str, Any]:
        return {**record, common.PREPARED: {"prompt": common.prompt_of(record, self.config, "FLUXGenerator")}}

    def process(self, batch: list[dict[str, Any]]) -> list[dict[str, Any] | StageError]:
        return common.run_batch(batch, self.prepare, self._generate, self._write)

    def _generate(self, records: list[dict[str, Any]]) -> list[list]:
        config = self.config
        self.knobs.sync(config.scheduler, config.scheduler_config, config.enable_vae_tiling, config.enable_vae_slicing)
        rows, seeds = common.expand(records, config.num_images_per_prompt, config.seed)
        images = self.pipe(
            prompt=[row[common.PREPARED]["prompt"] for row in rows],
            negative_prompt=[config.negative_prompt] * len(rows) if config.negative_prompt else None,
            true_cfg_scale=config.true_cfg_scale,
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
