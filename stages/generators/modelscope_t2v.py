"""Text to video with ModelScope's text-to-video-ms-1.7b (TextToVideoSDPipeline).

The model card's setup is the default: DPMSolverMultistepScheduler and 25 steps. When
`clip_skip` is set, a shim gives transformers 5's CLIPTextModel the `text_model` attribute
diffusers 0.42 reads on that path. TextToVideoSDPipeline is deprecated in diffusers (no fixes
after 0.33.1) but still runs. The shared path: `_base.DiffusersGenerator`.
"""

from __future__ import annotations

from stages.generators import _common as common
from stages.generators._base import DiffusersGenerator


class ModelScopeT2VConfig(common.VideoGeneratorConfig, common.Guided, common.ClipSkip):
    pipeline = "TextToVideoSDPipeline"
    side_multiple = (8, "ModelScope text-to-video")
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

    def after_load(self) -> None:
        common.clip_text_model_shim(self.pipe.text_encoder)
