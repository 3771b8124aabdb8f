"""Image to video with Stable Video Diffusion (StableVideoDiffusionPipeline).

The conditioning image comes from the record's `image_key` (no prompt); it is centre-cropped to
the output size so the pipeline's resize does not stretch it. `fps` is both the model's frame
rate conditioning and the written file's rate. SVD's temporal VAE decodes `decode_chunk_size`
frames at a time instead of tiling or slicing, so those two switches are refused; each video of a
batch is decoded on its own (diffusers' chunks would otherwise span two videos). The shared
path: `_base.DiffusersGenerator`.
"""

from __future__ import annotations

from typing import Any

from pydantic import AliasChoices, Field, field_validator

from stages.generators import _common as common
from stages.generators import _media as media
from stages.generators._base import DiffusersGenerator, Samples


class SVDConfig(common.VideoGeneratorConfig, common.DecodeChunks):
    pipeline = "StableVideoDiffusionPipeline"
    call_keys = ("min_guidance_scale", "max_guidance_scale", "motion_bucket_id", "noise_aug_strength")
    side_multiple = 8
    needs_prompt = False
    needs_image = True
    defaults = dict(
        model_path="stabilityai/stable-video-diffusion-img2vid-xt", height=576, width=1024, fps=7, decode_chunk_size=8
    )
    notes = dict(fps="also the model's fps conditioning")

    min_guidance_scale: float = Field(1.0, ge=0, description="Guidance on the first frame (ramps up to the last).")
    max_guidance_scale: float = Field(
        3.0,
        ge=0,
        description="Guidance on the last frame (`guidance_scale` is accepted for it).",
        validation_alias=AliasChoices("max_guidance_scale", "guidance_scale"),
    )
    num_frames: int | None = Field(None, ge=1, description="Frames; default: the model's (25 for -xt, 14 for SVD).")
    motion_bucket_id: int = Field(127, ge=0, le=1023, description="More motion with higher values.")
    noise_aug_strength: float = Field(0.02, ge=0, description="Noise added to the conditioning image.")
    prompt: str | None = Field(None, description="Not used: SVD animates the image alone (refused if set).")
    enable_vae_tiling: bool = Field(False, description="Not supported by SVD's VAE: use decode_chunk_size.")
    enable_vae_slicing: bool = Field(False, description="Not supported by SVD's VAE: use decode_chunk_size.")

    @field_validator("enable_vae_tiling", "enable_vae_slicing")
    @classmethod
    def _no_tiling(cls, value: bool, info) -> bool:
        if value:
            raise ValueError(
                f"{info.field_name} has no effect on SVD's temporal VAE; lower decode_chunk_size to save memory"
            )
        return value

    @field_validator("prompt")
    @classmethod
    def _no_prompt(cls, value: str | None) -> str | None:
        if value:
            raise ValueError("SVD takes no prompt (it animates the image alone); drop `prompt`")
        return value


class SVDGenerator(DiffusersGenerator):
    registered_as = ("VideoGenerator",)
    Config = SVDConfig
    half_dtype = "float16"
    vae_switches = False  # decode_chunk_size instead (the config refuses the switches)

    def call_args(self, samples: Samples) -> dict[str, Any]:
        config = self.config
        return {
            "num_frames": config.num_frames or self.pipe.unet.config.num_frames,
            "fps": round(config.fps),
        }

    def generate(self, samples: Samples) -> list:
        """The pipeline stops at the latents; each video is then decoded on its own (`_decode`)."""
        args = self.pipeline_args(samples)
        latents = self.pipe(**args, generator=samples.generators(), output_type="latent").frames
        return [self._decode(latents[index : index + 1], args["num_frames"]) for index in range(len(samples))]

    def _decode(self, latents, num_frames: int):
        """One video's latents -> uint8 frames. The pipeline decodes the whole batch as one run of
        frames in chunks of decode_chunk_size, so a chunk can span two videos and its temporal
        layers mix them; decoding each video on its own keeps them apart."""
        import torch

        with torch.no_grad():
            frames = self.pipe.decode_latents(latents, num_frames, self.config.decode_chunk_size)
        return media.to_uint8(self.pipe.video_processor.postprocess_video(video=frames, output_type="np"))[0]
