"""Text to image with Stable Diffusion 3 / 3.5 (StableDiffusion3Pipeline).

Registered as an `ImageGenerator` (also as `StableDiffusion3Generator`, the name in the seed's
image config) and, as the seed lists it under video generation, as a `VideoGenerator` too. One
PNG per record; prompts in a batch go through one pipeline call (the shared path:
`_base.DiffusersGenerator`).
"""

from __future__ import annotations

from pydantic import Field

from stages.generators import _common as common
from stages.generators._base import DiffusersGenerator


class StableDiffusion3Config(common.ImageGeneratorConfig, common.Guided):
    pipeline = "StableDiffusion3Pipeline"
    call_keys = ("max_sequence_length",)
    defaults = dict(model_path="stabilityai/stable-diffusion-3.5-large", num_inference_steps=28, guidance_scale=3.5)
    notes = dict(
        num_inference_steps="SD3.5 large: 28",
        guidance_scale="SD3.5 large: 3.5",
        negative_prompt="used when guidance_scale > 1",
    )

    max_sequence_length: int = Field(256, ge=1, le=512, description="T5 prompt tokens (at most 512).")


class StableDiffusionGenerator(DiffusersGenerator):
    registered_as = ("ImageGenerator", "ImageGenerator/StableDiffusion3Generator", "VideoGenerator")
    Config = StableDiffusion3Config
