"""I2VGenXLGenerator: image + prompt to video with I2VGen-XL (diffusers I2VGenXLPipeline, ali-vilab/i2vgen-xl).

Two diffusers 0.42 quirks are handled here. The pipeline's default `clip_skip=1` reads
`text_encoder.text_model`, which transformers 5's CLIPTextModel no longer has, so a shim points
it back at the model (clip_skip keeps working; `clip_skip: null` turns it off). And it samples
the image latents from the global RNG; a wrapper on the VAE's encode makes that draw use each
record's own generator, so outputs depend only on (seed, record id). I2VGenXLPipeline is
deprecated in diffusers (no fixes after 0.33.1) but still runs.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from stages.base import RECORD_ID, Stage, StageError, require
from stages.generators import _checkpoints as checkpoints
from stages.generators import _common as common
from stages.generators import _media as media

PIPELINE = "I2VGenXLPipeline"
NEGATIVE = (
    "Distorted, discontinuous, Ugly, blurry, low resolution, motionless, static, disfigured, "
    "disconnected limbs, Ugly faces, incomplete arms"
)


class SeededEncode:
    """Wraps `vae.encode` so that `latent_dist.sample()` draws from the generators set for this call."""

    def __init__(self, encode):
        self.encode = encode
        self.generators = None

    def __call__(self, *args, **kwargs):
        output = self.encode(*args, **kwargs)
        generators = self.generators
        if generators is not None:
            dist = output.latent_dist
            dist.sample = lambda generator=None: type(dist).sample(dist, generator=generators)
        return output


class I2VGenXLConfig(common.GeneratorConfig):
    model_path: str = Field("ali-vilab/i2vgen-xl", description="I2VGen-XL checkpoint folder or hub id.")
    num_inference_steps: int = Field(50, ge=1, description="Denoising steps.")
    guidance_scale: float = Field(9.0, ge=0, description="Classifier-free guidance.")
    negative_prompt: str | None = Field(NEGATIVE, description="Negative prompt (the model card's by default).")
    height: int = Field(704, ge=8, description="Frame height in pixels, a multiple of 8.")
    width: int = Field(1280, ge=8, description="Frame width in pixels, a multiple of 8.")
    num_frames: int = Field(16, ge=2, description="Frames to generate.")
    fps: float = Field(16, gt=0, description="Frame rate: the model's target_fps conditioning and the file's rate.")
    decode_chunk_size: int = Field(1, ge=1, description="Frames decoded by the VAE at a time.")
    clip_skip: int | None = Field(1, ge=1, description="CLIP layers to skip (the pipeline's default 1).")
    num_videos_per_prompt: int = Field(1, ge=1, description="Videos per record (<id>_0.mp4, <id>_1.mp4, ...).")
    enable_vae_tiling: bool = Field(False, description="Decode in spatial tiles (less memory).")
    enable_vae_slicing: bool = Field(True, description="Decode one video of the batch at a time (less memory).")

    @field_validator("height", "width")
    @classmethod
    def _eight(cls, value: int, info) -> int:
        return checkpoints.multiple_of(value, 8, info.field_name, "I2VGen-XL")

    @field_validator("model_path")
    @classmethod
    def _model(cls, value: str) -> str:
        checkpoints.check_model_path(value)
        checkpoints.check_pipeline_class(value, [PIPELINE], "I2VGenXLGenerator")
        return value

    def input_fields(self) -> dict[str, Any]:
        return {**common.text_inputs(self), self.image_key: "image"}


class I2VGenXLGenerator(Stage):
    Config = I2VGenXLConfig
    accelerated = True  # one resident pipeline per GPU

    def load(self) -> None:
        with common.LOADING:  # loading is not thread-safe (see _common.LOADING)
            require("diffusers", stage="I2VGenXLGenerator", extra="generators")
            config = self.config
            common.check_offload(config, self.device, "I2VGenXLGenerator")
            checkpoints.ensure_pipeline_class(config.model_path, [PIPELINE], "I2VGenXLGenerator")
            common.log_once("i2vgenxl", "I2VGenXLGenerator: diffusers has deprecated I2VGenXLPipeline; it still runs")
            dtype = common.torch_dtype(config.dtype, self.device, "float16")
            self.pipe = common.diffusers_class(PIPELINE, config.model_path).from_pretrained(
                config.model_path, **common.pretrained_kwargs(config, dtype)
            )
            common.place(self.pipe, config, self.device)
            self.knobs = common.Knobs(self.pipe, "I2VGenXLGenerator")
            common.clip_text_model_shim(self.pipe.text_encoder)
            self.encode = SeededEncode(self.pipe.vae.encode)
            self.pipe.vae.encode = self.encode

    def prepare(self, record: dict[str, Any]) -> dict[str, Any]:
        config = self.config
        image = common.load_image(record, config.image_key, "I2VGenXLGenerator")
        prompt = common.prompt_of(record, config, "I2VGenXLGenerator")
        return {
            **record,
            common.PREPARED: {"prompt": prompt, "image": media.fit_image(image, config.width, config.height)},
        }

    def process(self, batch: list[dict[str, Any]]) -> list[dict[str, Any] | StageError]:
        return common.run_batch(batch, self.prepare, self._generate, self._write)

    def _generate(self, records: list[dict[str, Any]]) -> list[list]:
        config = self.config
        self.knobs.sync(config.scheduler, config.scheduler_config, config.enable_vae_tiling, config.enable_vae_slicing)
        rows, seeds = common.expand(records, config.num_videos_per_prompt, config.seed)
        image_seeds = [
            common.record_seed(config.seed, f"{record.get(RECORD_ID)}/image", index)
            for record in records
            for index in range(config.num_videos_per_prompt)
        ]
        self.encode.generators = common.cpu_generators(image_seeds)
        try:
            frames = self.pipe(
                image=[media.fit_image(row[common.PREPARED]["image"], config.width, config.height) for row in rows],
                prompt=[row[common.PREPARED]["prompt"] for row in rows],
                negative_prompt=[config.negative_prompt] * len(rows) if config.negative_prompt else None,
                height=config.height,
                width=config.width,
                num_frames=config.num_frames,
                target_fps=round(config.fps),
                num_inference_steps=config.num_inference_steps,
                guidance_scale=config.guidance_scale,
                decode_chunk_size=config.decode_chunk_size,
                clip_skip=config.clip_skip,
                generator=common.cpu_generators(seeds),
                output_type="np",
            ).frames
        finally:
            self.encode.generators = None
        return common.regroup(media.to_uint8(frames), config.num_videos_per_prompt)

    def _write(self, record: dict[str, Any], videos: list) -> dict[str, Any]:
        return common.write_videos(record, videos, self.config, self.config.fps, self.usage)

    def close(self) -> None:
        self.pipe = self.knobs = None
        common.release(self.device)
