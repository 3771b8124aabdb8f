"""Image + prompt to video with I2VGen-XL (diffusers I2VGenXLPipeline, ali-vilab/i2vgen-xl).

Two diffusers 0.42 quirks are handled here. The pipeline's default `clip_skip=1` reads
`text_encoder.text_model`, which transformers 5's CLIPTextModel no longer has, so a shim points
it back at the model (clip_skip keeps working; `clip_skip: null` turns it off). And it samples
the image latents from the global RNG; a wrapper on the VAE's encode makes that draw use each
record's own generator, so outputs depend only on (seed, record id). I2VGenXLPipeline is
deprecated in diffusers (no fixes after 0.33.1) but still runs. The shared path:
`_base.DiffusersGenerator`.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from stages.generators import _common as common
from stages.generators._base import DiffusersGenerator, Samples

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


class I2VGenXLConfig(common.VideoGeneratorConfig):
    pipeline = "I2VGenXLPipeline"
    side_multiple = (8, "I2VGen-XL")
    needs_image = True

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
    enable_vae_tiling: bool = Field(False, description="Decode in spatial tiles (less memory).")
    enable_vae_slicing: bool = Field(True, description="Decode one video of the batch at a time (less memory).")


class I2VGenXLGenerator(DiffusersGenerator):
    registered_as = ("VideoGenerator",)
    Config = I2VGenXLConfig
    half_dtype = "float16"
    deprecated = True
    call_keys = ("num_frames", "guidance_scale", "decode_chunk_size", "clip_skip")

    def after_load(self) -> None:
        common.clip_text_model_shim(self.pipe.text_encoder)
        self.encode = SeededEncode(self.pipe.vae.encode)
        self.pipe.vae.encode = self.encode

    def call_args(self, samples: Samples) -> dict[str, Any]:
        return {"negative_prompt": samples.each(self.config.negative_prompt), "target_fps": round(self.config.fps)}

    def generate(self, samples: Samples) -> list:
        self.encode.generators = samples.generators("/image")  # the image latents' own draw
        try:
            return super().generate(samples)
        finally:
            self.encode.generators = None
