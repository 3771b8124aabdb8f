"""Text to video with ModelScope's text-to-video-ms-1.7b (TextToVideoSDPipeline).

The model card's setup is the default: DPMSolverMultistepScheduler and 25 steps.
TextToVideoSDPipeline is deprecated in diffusers (no fixes after 0.33.1) but still runs. The
shared path: `_base.DiffusersGenerator` (which also makes `clip_skip` work on transformers 5).
"""

from __future__ import annotations

from stages.generators import _common as common
from stages.generators._base import DiffusersGenerator


class ModelScopeT2VConfig(common.VideoGeneratorConfig, common.Guided, common.ClipSkip):
    pipeline = "TextToVideoSDPipeline"
    side_multiple = 8
    defaults = dict(
        model_path="damo-vilab/text-to-video-ms-1.7b",
        guidance_scale=9.0,
        height=256,
        width=256,
        scheduler="DPMSolverMultistepScheduler",
    )
    notes = dict(height="trained at 256", width="trained at 256", scheduler="the model card's by default")


class ModelScopeT2VGenerator(DiffusersGenerator):
    registered_as = ("VideoGenerator",)
    Config = ModelScopeT2VConfig
    half_dtype = "float16"
    deprecated = True
