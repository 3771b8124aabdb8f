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


class I2VGenXLConfig(common.VideoGeneratorConfig, common.Guided, common.ClipSkip, common.DecodeChunks):
    pipeline = "I2VGenXLPipeline"
    side_multiple = 8
    needs_image = True
    defaults = dict(
        model_path="ali-vilab/i2vgen-xl",
        num_inference_steps=50,
        guidance_scale=9.0,
        negative_prompt=NEGATIVE,
        height=704,
        width=1280,
        fps=16,
        decode_chunk_size=1,
        clip_skip=1,
    )
    notes = dict(
        negative_prompt="the model card's by default",
        fps="also the model's target_fps conditioning",
        clip_skip="the pipeline's default 1",
    )

    num_frames: int = Field(16, ge=2, description="Frames to generate (at least 2).")


class I2VGenXLGenerator(DiffusersGenerator):
    registered_as = ("VideoGenerator",)
    Config = I2VGenXLConfig
    half_dtype = "float16"
    deprecated = True

    def after_load(self) -> None:
        self.encode = SeededEncode(self.pipe.vae.encode)
        self.pipe.vae.encode = self.encode

    def call_args(self, samples: Samples) -> dict[str, Any]:
        return {"target_fps": round(self.config.fps)}

    def generate(self, samples: Samples) -> list:
        self.encode.generators = samples.generators("/image")  # the image latents' own draw
        try:
            return super().generate(samples)
        finally:
            self.encode.generators = None
