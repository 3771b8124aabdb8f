"""Text to video with ModelScope's text-to-video-ms-1.7b (TextToVideoSDPipeline).

The model card's setup is the default: DPMSolverMultistepScheduler and 25 steps. When
`clip_skip` is set, a shim gives transformers 5's CLIPTextModel the `text_model` attribute
diffusers 0.42 reads on that path. TextToVideoSDPipeline is deprecated in diffusers (no fixes
after 0.33.1) but still runs. The shared path: `_base.DiffusersGenerator`.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from stages.generators import _common as common
from stages.generators._base import DiffusersGenerator, Samples


class ModelScopeT2VConfig(common.VideoGeneratorConfig):
    pipeline = "TextToVideoSDPipeline"
    side_multiple = (8, "ModelScope text-to-video")

    model_path: str = Field("damo-vilab/text-to-video-ms-1.7b", description="Checkpoint folder or hub id.")
    num_inference_steps: int = Field(25, ge=1, description="Denoising steps.")
    guidance_scale: float = Field(9.0, ge=0, description="Classifier-free guidance.")
    negative_prompt: str | None = Field(None, description="Negative prompt.")
    height: int = Field(256, ge=8, description="Frame height in pixels, a multiple of 8 (trained at 256).")
    width: int = Field(256, ge=8, description="Frame width in pixels, a multiple of 8 (trained at 256).")
    num_frames: int = Field(16, ge=1, description="Frames to generate.")
    fps: float = Field(8, gt=0, description="Frame rate of the written video.")
    clip_skip: int | None = Field(None, ge=1, description="CLIP layers to skip for the prompt embedding.")
    enable_vae_tiling: bool = Field(False, description="Decode in spatial tiles (less memory).")
    enable_vae_slicing: bool = Field(True, description="Decode one frame batch at a time (less memory).")
    scheduler: str | None = Field("DPMSolverMultistepScheduler", description="Scheduler class (the model card's).")


class ModelScopeT2VGenerator(DiffusersGenerator):
    registered_as = ("VideoGenerator",)
    Config = ModelScopeT2VConfig
    half_dtype = "float16"
    deprecated = True
    call_keys = ("num_frames", "guidance_scale", "clip_skip")

    def after_load(self) -> None:
        common.clip_text_model_shim(self.pipe.text_encoder)

    def call_args(self, samples: Samples) -> dict[str, Any]:
        return {"negative_prompt": samples.each(self.config.negative_prompt)}
