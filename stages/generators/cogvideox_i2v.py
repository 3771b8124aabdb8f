"""CogVideoXGenerator: image (+ prompt) to video with CogVideoX-5b-I2V (CogVideoXImageToVideoPipeline).

The conditioning image comes from the record's `image_key`; it is centre-cropped to the output
size so that the pipeline's resize does not stretch it. CogVideoX-5b-I2V has learned positional
embeddings and so generates only at its trained resolution (480x720); that is checked when the
config is validated (from the checkpoint's transformer config when it is on disk) and again at load.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator, model_validator

from stages.base import Stage, StageError, require
from stages.generators import _checkpoints as checkpoints
from stages.generators import _common as common
from stages.generators import _media as media
from stages.generators.cogvideox_t2v import check_frames, text_length

PIPELINE = "CogVideoXImageToVideoPipeline"
# Trained resolution of known checkpoints, for when their config is not on disk yet.
KNOWN_RESOLUTION = {"THUDM/CogVideoX-5b-I2V": (480, 720)}


def trained_resolution(model_path: str) -> tuple[int, int] | None:
    """(height, width) a checkpoint is bound to, or None if it takes any size (no learned positions)."""
    transformer = checkpoints.checkpoint_json(model_path, "transformer/config.json")
    if transformer is None:
        return KNOWN_RESOLUTION.get(model_path)
    if not transformer.get("use_learned_positional_embeddings", False):
        return None
    vae = checkpoints.checkpoint_json(model_path, "vae/config.json") or {}
    scale = 2 ** (len(vae.get("block_out_channels", (0, 0, 0, 0))) - 1)
    return transformer["sample_height"] * scale, transformer["sample_width"] * scale


def check_resolution(trained: tuple[int, int] | None, height: int | None, width: int | None, where: str) -> None:
    if trained is None:
        return
    if (height is not None and height != trained[0]) or (width is not None and width != trained[1]):
        raise ValueError(
            f"{where} generates only at its trained resolution {trained[0]}x{trained[1]} (height x width: its "
            f"transformer has learned positional embeddings), got {height or trained[0]}x{width or trained[1]}; "
            f"leave height and width unset or set them to {trained[0]} and {trained[1]}"
        )


class CogVideoXI2VConfig(common.GeneratorConfig):
    model_path: str = Field("THUDM/CogVideoX-5b-I2V", description="CogVideoX image-to-video checkpoint or hub id.")
    num_inference_steps: int = Field(50, ge=1, description="Denoising steps.")
    guidance_scale: float = Field(6.0, ge=0, description="Classifier-free guidance.")
    use_dynamic_cfg: bool = Field(False, description="Cosine-ramped guidance (recommended with the DPM scheduler).")
    negative_prompt: str | None = Field(None, description="Negative prompt.")
    height: int | None = Field(None, ge=16, description="Frame height; default and only choice: the trained one.")
    width: int | None = Field(None, ge=16, description="Frame width; default and only choice: the trained one.")
    num_frames: int = Field(49, ge=9, description="Frames to generate: 8k+1 (49 = 6 s at 8 fps).")
    fps: float = Field(8, gt=0, description="Frame rate of the written video.")
    max_sequence_length: int | None = Field(None, ge=1, description="T5 prompt tokens; default: the model's (226).")
    num_videos_per_prompt: int = Field(1, ge=1, description="Videos per record (<id>_0.mp4, <id>_1.mp4, ...).")
    enable_vae_tiling: bool = Field(True, description="Decode in spatial tiles (less memory).")
    enable_vae_slicing: bool = Field(True, description="Decode one video of the batch at a time (less memory).")

    @field_validator("height", "width")
    @classmethod
    def _sixteen(cls, value: int | None, info) -> int | None:
        return checkpoints.multiple_of(value, 16, info.field_name, "CogVideoX")

    @field_validator("num_frames")
    @classmethod
    def _frames(cls, value: int) -> int:
        return check_frames(value)

    @field_validator("model_path")
    @classmethod
    def _model(cls, value: str) -> str:
        checkpoints.check_model_path(value)
        checkpoints.check_pipeline_class(value, [PIPELINE], "CogVideoXGenerator")
        return value

    @model_validator(mode="after")
    def _resolution(self):
        check_resolution(trained_resolution(self.model_path), self.height, self.width, self.model_path)
        return self

    def input_fields(self) -> dict[str, Any]:
        return {**common.text_inputs(self), self.image_key: "image"}


class CogVideoXGenerator(Stage):
    Config = CogVideoXI2VConfig
    accelerated = True  # one resident pipeline per GPU

    def load(self) -> None:
        with common.LOADING:  # loading is not thread-safe (see _common.LOADING)
            require("diffusers", stage="CogVideoXGenerator", extra="generators")
            config = self.config
            common.check_offload(config, self.device, "CogVideoXGenerator")
            checkpoints.ensure_pipeline_class(config.model_path, [PIPELINE], "CogVideoXGenerator")
            dtype = common.torch_dtype(config.dtype, self.device, "bfloat16")
            self.pipe = common.diffusers_class(PIPELINE, config.model_path).from_pretrained(
                config.model_path, **common.pretrained_kwargs(config, dtype)
            )
            text_length(self.pipe, config.max_sequence_length, "CogVideoXGenerator")
            check_resolution(self._trained(), config.height, config.width, config.model_path)
            common.place(self.pipe, config, self.device)
            self.knobs = common.Knobs(self.pipe, "CogVideoXGenerator")

    def _trained(self) -> tuple[int, int] | None:
        transformer = self.pipe.transformer.config
        if not transformer.use_learned_positional_embeddings:
            return None
        scale = self.pipe.vae_scale_factor_spatial
        return transformer.sample_height * scale, transformer.sample_width * scale

    def _size(self) -> tuple[int, int]:
        config = self.config
        transformer, scale = self.pipe.transformer.config, self.pipe.vae_scale_factor_spatial
        return (
            config.height or transformer.sample_height * scale,
            config.width or transformer.sample_width * scale,
        )

    def prepare(self, record: dict[str, Any]) -> dict[str, Any]:
        height, width = self._size()
        image = common.load_image(record, self.config.image_key, "CogVideoXGenerator")
        prompt = common.prompt_of(record, self.config, "CogVideoXGenerator")
        return {**record, common.PREPARED: {"prompt": prompt, "image": media.fit_image(image, width, height)}}

    def process(self, batch: list[dict[str, Any]]) -> list[dict[str, Any] | StageError]:
        return common.run_batch(batch, self.prepare, self._generate, self._write)

    def _generate(self, records: list[dict[str, Any]]) -> list[list]:
        config = self.config
        check_resolution(self._trained(), config.height, config.width, config.model_path)  # after a hot reload
        self.knobs.sync(config.scheduler, config.scheduler_config, config.enable_vae_tiling, config.enable_vae_slicing)
        height, width = self._size()
        rows, seeds = common.expand(records, config.num_videos_per_prompt, config.seed)
        frames = self.pipe(
            image=[media.fit_image(row[common.PREPARED]["image"], width, height) for row in rows],
            prompt=[row[common.PREPARED]["prompt"] for row in rows],
            negative_prompt=[config.negative_prompt] * len(rows) if config.negative_prompt else None,
            height=height,
            width=width,
            num_frames=config.num_frames,
            num_inference_steps=config.num_inference_steps,
            guidance_scale=config.guidance_scale,
            use_dynamic_cfg=config.use_dynamic_cfg,
            max_sequence_length=text_length(self.pipe, config.max_sequence_length, "CogVideoXGenerator"),
            generator=common.cpu_generators(seeds),
            output_type="np",
        ).frames
        return common.regroup(media.to_uint8(frames), config.num_videos_per_prompt)

    def _write(self, record: dict[str, Any], videos: list) -> dict[str, Any]:
        return common.write_videos(record, videos, self.config, self.config.fps, self.usage)

    def close(self) -> None:
        self.pipe = self.knobs = None
        common.release(self.device)
