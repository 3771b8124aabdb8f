"""Text to image with FLUX.1 (diffusers FluxPipeline); one PNG per record.

Registered as an `ImageGenerator` and, because the seed lists it under video generation, as a
`VideoGenerator` too. Prompts in a batch go through one pipeline call, each with its own seeded
generator (the shared path: `_base.DiffusersGenerator`).
"""

from __future__ import annotations

from pydantic import Field, model_validator

from stages.generators import _common as common
from stages.generators._base import DiffusersGenerator


class FLUXConfig(common.ImageGeneratorConfig, common.Guided):
    pipeline = "FluxPipeline"
    call_keys = ("true_cfg_scale", "max_sequence_length")
    side_multiple = 16  # checked: FluxPipeline floors other sizes silently (to vae_scale_factor * 2)
    defaults = dict(model_path="black-forest-labs/FLUX.1-dev", num_inference_steps=50, guidance_scale=3.5)
    notes = dict(
        num_inference_steps="FLUX.1-dev: 50; schnell: 4",
        guidance_scale="distilled in FLUX.1-dev: 3.5",
        negative_prompt="needs true_cfg_scale > 1",
    )

    true_cfg_scale: float = Field(
        1.0, ge=1.0, description="Real classifier-free guidance; > 1 makes negative_prompt take effect (2x compute)."
    )
    max_sequence_length: int = Field(512, ge=1, le=512, description="T5 prompt tokens (at most 512).")

    @model_validator(mode="after")
    def _negative_needs_cfg(self):
        if self.negative_prompt and self.true_cfg_scale <= 1.0:
            raise ValueError(
                "negative_prompt has no effect on FLUX unless true_cfg_scale > 1 (FLUX.1-dev is guidance-distilled); "
                "set true_cfg_scale (e.g. 4.0) or drop negative_prompt"
            )
        return self


class FLUXGenerator(DiffusersGenerator):
    registered_as = ("ImageGenerator", "VideoGenerator")
    Config = FLUXConfig
