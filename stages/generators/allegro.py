"""Text to video with Allegro (diffusers AllegroPipeline, rhymes-ai/Allegro).

Allegro's VAE only decodes in tiles: 24 frames x `sample_size` px (320) with strides of 16
frames, `sample_size`-120 px in height and `sample_size`-80 px in width. A size off that grid
leaves the uncovered part of the video grey (DataFlow-Gen's `num_frames: 16` gave all-grey
videos), so the config is checked against the grid before anything loads. The VAE is loaded in
float32 from `subfolder` (Allegro's advice), the rest in bfloat16 on a GPU. The shared path:
`_base.DiffusersGenerator`.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import Field, field_validator, model_validator

from stages.generators import _checkpoints as checkpoints
from stages.generators import _common as common
from stages.generators._base import DiffusersGenerator, Samples

TILE_FRAMES, TILE_FRAMES_OVERLAP, TILE_OVERLAP_H, TILE_OVERLAP_W = 24, 8, 120, 80
NEGATIVE = (
    "nsfw, lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, fewer digits, cropped, "
    "worst quality, low quality, normal quality, jpeg artifacts, signature, watermark, username, blurry"
)


def _covered(size: int, latent_scale: int, kernel: int, stride: int, latent_size: int) -> int:
    """Pixels (or frames) the tiled decode covers for `latent_size` latents."""
    latent_kernel, latent_stride = kernel // latent_scale, stride // latent_scale
    tiles = math.floor((latent_size - latent_kernel) / latent_stride) + 1
    return 0 if tiles < 1 else (tiles - 1) * stride + kernel


def _latent_frames(frames: int, temporal: int) -> int:
    # as AllegroPipeline.prepare_latents
    return math.ceil(frames / temporal) if frames % 2 == 0 else math.ceil((frames - 1) / temporal) + 1


def grid_problems(frames: int, height: int, width: int, sample_size: int, spatial: int, temporal: int) -> list[str]:
    """What the VAE's tile grid leaves uncovered (grey) for this size; empty when all is covered."""
    kernels = {
        "height": (sample_size, sample_size - TILE_OVERLAP_H),
        "width": (sample_size, sample_size - TILE_OVERLAP_W),
    }
    problems = []
    covered = _covered(
        frames, temporal, TILE_FRAMES, TILE_FRAMES - TILE_FRAMES_OVERLAP, _latent_frames(frames, temporal)
    )
    if covered < frames:
        valid = ", ".join(str(TILE_FRAMES + k * (TILE_FRAMES - TILE_FRAMES_OVERLAP)) for k in range(6))
        problems.append(f"num_frames={frames} leaves {frames - covered} frames grey (valid: {valid}, ...)")
    for name, value in (("height", height), ("width", width)):
        kernel, stride = kernels[name]
        if stride <= 0 or value % spatial:
            problems.append(f"{name}={value} is not on the VAE grid (multiple of {spatial})")
            continue
        covered = _covered(value, spatial, kernel, stride, value // spatial)
        if covered != value:
            valid = ", ".join(str(kernel + k * stride) for k in range(5))
            problems.append(f"{name}={value} leaves {value - covered} px uncovered (valid: {valid}, ...)")
    return problems


def vae_grid(model_path: str, subfolder: str | None) -> tuple[int, int, int]:
    """(sample_size, spatial, temporal) of the checkpoint's VAE; Allegro's own when not on disk."""
    vae = checkpoints.checkpoint_json(model_path, f"{subfolder or 'vae'}/config.json") or {}
    spatial = 2 ** (len(vae.get("block_out_channels", (0, 0, 0, 0))) - 1)
    return vae.get("sample_size", 320), spatial, int(vae.get("temporal_compression_ratio", 4))


class AllegroConfig(common.VideoGeneratorConfig, common.Guided):
    pipeline = "AllegroPipeline"
    call_keys = ("max_sequence_length",)
    defaults = dict(
        model_path="rhymes-ai/Allegro",
        num_inference_steps=100,
        height=720,
        width=1280,
        num_frames=88,
        fps=15,
        enable_vae_tiling=True,
    )
    notes = dict(
        height="on the VAE tile grid: 320 + 200k",
        width="on the VAE tile grid: 320 + 240k",
        num_frames="on the VAE tile grid: 24 + 16k; 88 = 6 s at 15 fps",
        enable_vae_tiling="must stay true: Allegro's VAE only decodes in tiles",
        enable_vae_slicing="must stay true: Allegro's tiled decode takes one video of the batch at a time",
    )

    subfolder: str | None = Field(
        "vae",
        description="Subfolder of model_path with the VAE, loaded on its own in float32 (Allegro's advice); "
        "null loads it with the pipeline in `dtype`.",
    )
    negative_prompt: str = Field(NEGATIVE, description="Negative prompt (Allegro's recommended one by default).")
    max_sequence_length: int = Field(512, ge=1, description="T5 prompt tokens.")
    clean_caption: bool = Field(True, description="Clean prompts as Allegro was trained (needs bs4 and ftfy).")

    @field_validator("enable_vae_tiling", "enable_vae_slicing")
    @classmethod
    def _tiling(cls, value: bool, info) -> bool:
        if not value:
            why = "has no untiled decode" if info.field_name == "enable_vae_tiling" else "tiles one video at a time"
            raise ValueError(f"{info.field_name} must be true for Allegro: its VAE {why}")
        return value

    @model_validator(mode="after")
    def _grid(self):
        sample_size, spatial, temporal = vae_grid(self.model_path, self.subfolder)
        problems = grid_problems(self.num_frames, self.height, self.width, sample_size, spatial, temporal)
        if problems:
            raise ValueError(
                f"Allegro's VAE decodes in tiles of {TILE_FRAMES} frames x {sample_size}x{sample_size} px; off that "
                f"grid the video comes out partly grey: {'; '.join(problems)}"
            )
        return self


class AllegroGenerator(DiffusersGenerator):
    registered_as = ("VideoGenerator",)
    Config = AllegroConfig

    def pipeline_components(self, dtype) -> dict[str, Any]:
        if not self.config.subfolder:
            return {}
        import torch

        vae = common.diffusers_class("AutoencoderKLAllegro").from_pretrained(
            self.config.model_path, subfolder=self.config.subfolder, dtype=torch.float32
        )
        return {"vae": vae}

    def after_load(self) -> None:
        from diffusers.utils import is_bs4_available, is_ftfy_available

        self.can_clean = is_bs4_available() and is_ftfy_available()
        if self.config.clean_caption and not self.can_clean:
            common.log_once(
                f"{self.name}.clean_caption", f"{self.name}: clean_caption needs bs4 and ftfy; prompts go uncleaned"
            )

    def call_args(self, samples: Samples) -> dict[str, Any]:
        return {"clean_caption": self.config.clean_caption and self.can_clean}
