"""CogVideoXT2VGenerator: text to video with CogVideoX-2b / -5b (diffusers CogVideoXPipeline).

Every generation setting in the config reaches the pipeline (the seed's version ignored them).
Frames must be 8k+1 and sides multiples of 16; the text length must match the transformer's
when it uses absolute positional embeddings (CogVideoX-2b). Prompts in a batch go through one
pipeline call, each sample with its own seeded generator.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from stages.base import Stage, StageError, require
from stages.generators import _checkpoints as checkpoints
from stages.generators import _common as common
from stages.generators import _media as media

PIPELINE = "CogVideoXPipeline"


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


class CogVideoXT2VConfig(common.GeneratorConfig):
    model_path: str = Field("THUDM/CogVideoX-2b", description="CogVideoX text-to-video checkpoint folder or hub id.")
    num_inference_steps: int = Field(50, ge=1, description="Denoising steps.")
    guidance_scale: float = Field(6.0, ge=0, description="Classifier-free guidance.")
    use_dynamic_cfg: bool = Field(False, description="Cosine-ramped guidance (recommended with the DPM scheduler).")
    negative_prompt: str | None = Field(None, description="Negative prompt.")
    height: int = Field(480, ge=16, description="Frame height in pixels, a multiple of 16.")
    width: int = Field(720, ge=16, description="Frame width in pixels, a multiple of 16.")
    num_frames: int = Field(49, ge=9, description="Frames to generate: 8k+1 (49 = 6 s at 8 fps).")
    fps: float = Field(8, gt=0, description="Frame rate of the written video.")
    max_sequence_length: int | None = Field(
        None, ge=1, description="T5 prompt tokens; default: the transformer's own (226)."
    )
    num_videos_per_prompt: int = Field(1, ge=1, description="Videos per record (<id>_0.mp4, <id>_1.mp4, ...).")
    enable_vae_tiling: bool = Field(True, description="Decode in spatial tiles (less memory).")
    enable_vae_slicing: bool = Field(True, description="Decode one video of the batch at a time (less memory).")

    @field_validator("height", "width")
    @classmethod
    def _sixteen(cls, value: int, info) -> int:
        return checkpoints.multiple_of(value, 16, info.field_name, "CogVideoX")

    @field_validator("num_frames")
    @classmethod
    def _frames(cls, value: int) -> int:
        return check_frames(value)

    @field_validator("model_path")
    @classmethod
    def _model(cls, value: str) -> str:
        checkpoints.check_model_path(value)
        checkpoints.check_pipeline_class(value, [PIPELINE], "CogVideoXT2VGenerator")
        return value

    def input_fields(self) -> dict[str, Any]:
        return common.text_inputs(self)


class CogVideoXT2VGenerator(Stage):
    Config = CogVideoXT2VConfig
    accelerated = True  # one resident pipeline per GPU

    def load(self) -> None:
        with common.LOADING:  # loading is not thread-safe (see _common.LOADING)
            require("diffusers", stage="CogVideoXT2VGenerator", extra="generators")
            config = self.config
            common.check_offload(config, self.device, "CogVideoXT2VGenerator")
            checkpoints.ensure_pipeline_class(config.model_path, [PIPELINE], "CogVideoXT2VGenerator")
            dtype = common.torch_dtype(config.dtype, self.device, "bfloat16")
            self.pipe = common.diffusers_class(PIPELINE, config.model_path).from_pretrained(
                config.model_path, **common.pretrained_kwargs(config, dtype)
            )
            text_length(self.pipe, config.max_sequence_length, "CogVideoXT2VGenerator")
            common.place(self.pipe, config, self.device)
            self.knobs = common.Knobs(self.pipe, "CogVideoXT2VGenerator")

    def prepare(self, record: dict[str, Any]) -> dict[str, Any]:
        return {**record, common.PREPARED: {"prompt": common.prompt_of(record, self.config, "CogVideoXT2VGenerator")}}

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
            use_dynamic_cfg=config.use_dynamic_cfg,
            max_sequence_length=text_length(self.pipe, config.max_sequence_length, "CogVideoXT2VGenerator"),
            generator=common.cpu_generators(seeds),
            output_type="np",
        ).frames
        return common.regroup(media.to_uint8(frames), config.num_videos_per_prompt)

    def _write(self, record: dict[str, Any], videos: list) -> dict[str, Any]:
        return common.write_videos(record, videos, self.config, self.config.fps, self.usage)

    def close(self) -> None:
        self.pipe = self.knobs = None
        common.release(self.device)
