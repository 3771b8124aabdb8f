"""SVDGenerator: image to video with Stable Video Diffusion (StableVideoDiffusionPipeline).

The conditioning image comes from the record's `image_key` (no prompt); it is centre-cropped to
the output size so the pipeline's resize does not stretch it. `fps` is both the model's frame
rate conditioning and the written file's rate. SVD's temporal VAE decodes `decode_chunk_size`
frames at a time instead of tiling or slicing, so those two switches are refused; each video of a
batch is decoded on its own (diffusers' chunks would otherwise span two videos).
"""

from __future__ import annotations

from typing import Any

from pydantic import AliasChoices, Field, field_validator

from stages.base import Stage, StageError, require
from stages.generators import _checkpoints as checkpoints
from stages.generators import _common as common
from stages.generators import _media as media

PIPELINE = "StableVideoDiffusionPipeline"


class SVDConfig(common.GeneratorConfig):
    model_path: str = Field("stabilityai/stable-video-diffusion-img2vid-xt", description="SVD checkpoint or hub id.")
    num_inference_steps: int = Field(25, ge=1, description="Denoising steps.")
    min_guidance_scale: float = Field(1.0, ge=0, description="Guidance on the first frame (ramps up to the last).")
    max_guidance_scale: float = Field(
        3.0,
        ge=0,
        description="Guidance on the last frame (`guidance_scale` is accepted for it).",
        validation_alias=AliasChoices("max_guidance_scale", "guidance_scale"),
    )
    height: int = Field(576, ge=8, description="Frame height in pixels, a multiple of 8.")
    width: int = Field(1024, ge=8, description="Frame width in pixels, a multiple of 8.")
    num_frames: int | None = Field(None, ge=1, description="Frames; default: the model's (25 for -xt, 14 for SVD).")
    fps: float = Field(7, gt=0, description="Frame rate: the model's fps conditioning and the file's rate.")
    motion_bucket_id: int = Field(127, ge=0, le=1023, description="More motion with higher values.")
    noise_aug_strength: float = Field(0.02, ge=0, description="Noise added to the conditioning image.")
    decode_chunk_size: int = Field(8, ge=1, description="Frames decoded at a time (lower: less memory).")
    num_videos_per_prompt: int = Field(1, ge=1, description="Videos per record (<id>_0.mp4, <id>_1.mp4, ...).")
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

    @field_validator("height", "width")
    @classmethod
    def _eight(cls, value: int, info) -> int:
        return checkpoints.multiple_of(value, 8, info.field_name, "Stable Video Diffusion")

    @field_validator("model_path")
    @classmethod
    def _model(cls, value: str) -> str:
        checkpoints.check_model_path(value)
        checkpoints.check_pipeline_class(value, [PIPELINE], "SVDGenerator")
        return value

    def input_fields(self) -> dict[str, Any]:
        return {self.image_key: "image"}


class SVDGenerator(Stage):
    Config = SVDConfig
    accelerated = True  # one resident pipeline per GPU

    def load(self) -> None:
        with common.LOADING:  # loading is not thread-safe (see _common.LOADING)
            require("diffusers", stage="SVDGenerator", extra="generators")
            config = self.config
            common.check_offload(config, self.device, "SVDGenerator")
            checkpoints.ensure_pipeline_class(config.model_path, [PIPELINE], "SVDGenerator")
            dtype = common.torch_dtype(config.dtype, self.device, "float16")
            self.pipe = common.diffusers_class(PIPELINE, config.model_path).from_pretrained(
                config.model_path, **common.pretrained_kwargs(config, dtype)
            )
            common.place(self.pipe, config, self.device)
            self.knobs = common.Knobs(self.pipe, "SVDGenerator")

    def prepare(self, record: dict[str, Any]) -> dict[str, Any]:
        config = self.config
        image = common.load_image(record, config.image_key, "SVDGenerator")
        return {**record, common.PREPARED: {"image": media.fit_image(image, config.width, config.height)}}

    def process(self, batch: list[dict[str, Any]]) -> list[dict[str, Any] | StageError]:
        return common.run_batch(batch, self.prepare, self._generate, self._write)

    def _generate(self, records: list[dict[str, Any]]) -> list[list]:
        config = self.config
        self.knobs.sync(config.scheduler, config.scheduler_config, None, None)
        rows, seeds = common.expand(records, config.num_videos_per_prompt, config.seed)
        num_frames = config.num_frames or self.pipe.unet.config.num_frames
        latents = self.pipe(
            image=[media.fit_image(row[common.PREPARED]["image"], config.width, config.height) for row in rows],
            height=config.height,
            width=config.width,
            num_frames=num_frames,
            num_inference_steps=config.num_inference_steps,
            min_guidance_scale=config.min_guidance_scale,
            max_guidance_scale=config.max_guidance_scale,
            fps=round(config.fps),
            motion_bucket_id=config.motion_bucket_id,
            noise_aug_strength=config.noise_aug_strength,
            decode_chunk_size=config.decode_chunk_size,
            generator=common.cpu_generators(seeds),
            output_type="latent",
        ).frames
        videos = [self._decode(latents[index : index + 1], num_frames) for index in range(len(rows))]
        return common.regroup(videos, config.num_videos_per_prompt)

    def _decode(self, latents, num_frames: int):
        """One video's latents -> uint8 frames. The pipeline decodes the whole batch as one run of
        frames in chunks of decode_chunk_size, so a chunk can span two videos and its temporal
        layers mix them; decoding each video on its own keeps them apart."""
        import torch

        with torch.no_grad():
            frames = self.pipe.decode_latents(latents, num_frames, self.config.decode_chunk_size)
        return media.to_uint8(self.pipe.video_processor.postprocess_video(video=frames, output_type="np"))[0]

    def _write(self, record: dict[str, Any], videos: list) -> dict[str, Any]:
        return common.write_videos(record, videos, self.config, self.config.fps, self.usage)

    def close(self) -> None:
        self.pipe = self.knobs = None
        common.release(self.device)
