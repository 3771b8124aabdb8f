"""ModelScopeT2VGenerator: text to video with ModelScope's text-to-video-ms-1.7b (TextToVideoSDPipeline).

The model card's setup is the default: DPMSolverMultistepScheduler and 25 steps. When
`clip_skip` is set, a shim gives transformers 5's CLIPTextModel the `text_model` attribute
diffusers 0.42 reads on that path. TextToVideoSDPipeline is deprecated in diffusers (no fixes
after 0.33.1) but still runs.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from stages.base import Stage, StageError, require
from stages.generators import _checkpoints as checkpoints
from stages.generators import _common as common
from stages.generators import _media as media

PIPELINE = "TextToVideoSDPipeline"


class ModelScopeT2VConfig(common.GeneratorConfig):
    model_path: str = Field("damo-vilab/text-to-video-ms-1.7b", description="Checkpoint folder or hub id.")
    num_inference_steps: int = Field(25, ge=1, description="Denoising steps.")
    guidance_scale: float = Field(9.0, ge=0, description="Classifier-free guidance.")
    negative_prompt: str | None = Field(None, description="Negative prompt.")
    height: int = Field(256, ge=8, description="Frame height in pixels, a multiple of 8 (trained at 256).")
    width: int = Field(256, ge=8, description="Frame width in pixels, a multiple of 8 (trained at 256).")
    num_frames: int = Field(16, ge=1, description="Frames to generate.")
    fps: float = Field(8, gt=0, description="Frame rate of the written video.")
    clip_skip: int | None = Field(None, ge=1, description="CLIP layers to skip for the prompt embedding.")
    num_videos_per_prompt: int = Field(1, ge=1, description="Videos per record (<id>_0.mp4, <id>_1.mp4, ...).")
    enable_vae_tiling: bool = Field(False, description="Decode in spatial tiles (less memory).")
    enable_vae_slicing: bool = Field(True, description="Decode one frame batch at a time (less memory).")
    scheduler: str | None = Field("DPMSolverMultistepScheduler", description="Scheduler class (the model card's).")

    @field_validator("height", "width")
    @classmethod
    def _eight(cls, value: int, info) -> int:
        return checkpoints.multiple_of(value, 8, info.field_name, "ModelScope text-to-video")

    @field_validator("model_path")
    @classmethod
    def _model(cls, value: str) -> str:
        checkpoints.check_model_path(value)
        checkpoints.check_pipeline_class(value, [PIPELINE], "ModelScopeT2VGenerator")
        return value

    def input_fields(self) -> dict[str, Any]:
        return common.text_inputs(self)


class ModelScopeT2VGenerator(Stage):
    Config = ModelScopeT2VConfig
    accelerated = True  # one resident pipeline per GPU

    def load(self) -> None:
        with common.LOADING:  # loading is not thread-safe (see _common.LOADING)
            require("diffusers", stage="ModelScopeT2VGenerator", extra="generators")
            config = self.config
            common.check_offload(config, self.device, "ModelScopeT2VGenerator")
            checkpoints.ensure_pipeline_class(config.model_path, [PIPELINE], "ModelScopeT2VGenerator")
            common.log_once(
                "modelscope", "ModelScopeT2VGenerator: diffusers has deprecated TextToVideoSDPipeline; it still runs"
            )
            dtype = common.torch_dtype(config.dtype, self.device, "float16")
            self.pipe = common.diffusers_class(PIPELINE, config.model_path).from_pretrained(
                config.model_path, **common.pretrained_kwargs(config, dtype)
            )
            common.place(self.pipe, config, self.device)
            self.knobs = common.Knobs(self.pipe, "ModelScopeT2VGenerator")
            common.clip_text_model_shim(self.pipe.text_encoder)

    def prepare(self, record: dict[str, Any]) -> dict[str, Any]:
        return {**record, common.PREPARED: {"prompt": common.prompt_of(record, self.config, "ModelScopeT2VGenerator")}}

    def process(self, batch: list[dict[str, Any]]) -> list[dict[str, Any] | StageError]:
        return common.run_batch(batch, self.prepare, self._generate, self._write)

    def _generate(self, records: list[dict[str, Any]]) -> list[list]:
        config = self.config
        self.knobs.sync(config.scheduler, config.scheduler_config, config.enable_vae_tiling, config.enable_vae_slicing)
        rows, seeds = common.expand(records, config.num_videos_per_prompt, config.seed)
        frames = self.pipe(
            prompt=[row[common.PREPARED]["prompt"] for row in rows],
            negative_prompt=[config.negative_prompt] * len(rows) if config.negative_prompt else None,
            height=config.height,
            width=config.width,
            num_frames=config.num_frames,
            num_inference_steps=config.num_inference_steps,
            guidance_scale=config.guidance_scale,
            clip_skip=config.clip_skip,
            generator=common.cpu_generators(seeds),
            output_type="np",
        ).frames
        return common.regroup(media.to_uint8(frames), config.num_videos_per_prompt)

    def _write(self, record: dict[str, Any], videos: list) -> dict[str, Any]:
        return common.write_videos(record, videos, self.config, self.config.fps, self.usage)

    def close(self) -> None:
        self.pipe = self.knobs = None
        common.release(self.device)
