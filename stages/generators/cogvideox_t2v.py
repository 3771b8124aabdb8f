"""Text to video with CogVideoX-2b / -5b (diffusers CogVideoXPipeline).

Every generation setting in the config reaches the pipeline (the seed's version ignored them).
Frames must be 8k+1 and sides multiples of 16; the text length must match the transformer's
when it uses absolute positional embeddings (CogVideoX-2b). Prompts in a batch go through one
pipeline call, each sample with its own seeded generator (the shared path:
`_base.DiffusersGenerator`). The image-to-video CogVideoXGenerator builds on this file.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from stages.generators import _common as common
from stages.generators._base import DiffusersGenerator, Samples


def check_frames(value: int) -> int:
    if (value - 1) % 8:
        lower = value - (value - 1) % 8
        raise ValueError(
            f"num_frames must be 8k+1 for CogVideoX (e.g. 9, 17, 25, 33, 41, 49); use {lower if lower > 1 else 9} "
            f"or {lower + 8}"
        )
    return value


def text_length(pipe, wanted: int | None, stage: str) -> int:
    """The prompt length the transformer accepts: its own unless it embeds positions absolutely."""
    model_length = pipe.transformer.config.max_text_seq_length
    patch_embed = pipe.transformer.patch_embed
    absolute = patch_embed.use_positional_embeddings or patch_embed.use_learned_positional_embeddings
    if wanted is None:
        return model_length
    if absolute and wanted != model_length:
        raise ValueError(
            f"{stage}: max_sequence_length must be {model_length} for this checkpoint (its transformer embeds "
            f"positions for exactly {model_length} text tokens), got {wanted}; leave max_sequence_length unset"
        )
    return wanted


class CogVideoXT2VConfig(common.VideoGeneratorConfig, common.Guided):
    pipeline = "CogVideoXPipeline"
    call_keys = ("use_dynamic_cfg",)
    side_multiple = 16
    defaults = dict(
        model_path="THUDM/CogVideoX-2b",
        num_inference_steps=50,
        guidance_scale=6.0,
        height=480,
        width=720,
        enable_vae_tiling=True,
    )

    use_dynamic_cfg: bool = Field(False, description="Cosine-ramped guidance (recommended with the DPM scheduler).")
    num_frames: int = Field(49, ge=9, description="Frames to generate: 8k+1 (49 = 6 s at 8 fps).")
    max_sequence_length: int | None = Field(
        None, ge=1, description="T5 prompt tokens; default: the transformer's own (226)."
    )

    @field_validator("num_frames")
    @classmethod
    def _frames(cls, value: int) -> int:
        return check_frames(value)


class CogVideoXT2VGenerator(DiffusersGenerator):
    registered_as = ("VideoGenerator",)
    Config = CogVideoXT2VConfig

    def after_load(self) -> None:
        text_length(self.pipe, self.config.max_sequence_length, self.name)

    def call_args(self, samples: Samples) -> dict[str, Any]:
        return {"max_sequence_length": text_length(self.pipe, self.config.max_sequence_length, self.name)}
