"""Image (+ prompt) to video with CogVideoX-5b-I2V (CogVideoXImageToVideoPipeline).

The text-to-video CogVideoXT2VGenerator with a conditioning image: its config keys, checks and
call, plus the image from the record's `image_key`, centre-cropped to the output size so that
the pipeline's resize does not stretch it. CogVideoX-5b-I2V has learned positional embeddings
and so generates only at its trained resolution (480x720); that is checked when the config is
validated (from the checkpoint's transformer config when it is on disk) and again at load.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from stages.generators import _checkpoints as checkpoints
from stages.generators._base import Samples
from stages.generators.cogvideox_t2v import CogVideoXT2VConfig, CogVideoXT2VGenerator

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


class CogVideoXI2VConfig(CogVideoXT2VConfig):
    pipeline = "CogVideoXImageToVideoPipeline"
    needs_image = True

    model_path: str = Field("THUDM/CogVideoX-5b-I2V", description="CogVideoX image-to-video checkpoint or hub id.")
    height: int | None = Field(None, ge=16, description="Frame height; default and only choice: the trained one.")
    width: int | None = Field(None, ge=16, description="Frame width; default and only choice: the trained one.")
    max_sequence_length: int | None = Field(None, ge=1, description="T5 prompt tokens; default: the model's (226).")

    @model_validator(mode="after")
    def _resolution(self):
        check_resolution(trained_resolution(self.model_path), self.height, self.width, self.model_path)
        return self


class CogVideoXGenerator(CogVideoXT2VGenerator):
    registered_as = ("VideoGenerator",)
    Config = CogVideoXI2VConfig

    def after_load(self) -> None:
        super().after_load()
        check_resolution(self._trained(), self.config.height, self.config.width, self.config.model_path)

    def _trained(self) -> tuple[int, int] | None:
        transformer = self.pipe.transformer.config
        if not transformer.use_learned_positional_embeddings:
            return None
        scale = self.pipe.vae_scale_factor_spatial
        return transformer.sample_height * scale, transformer.sample_width * scale

    def frame_size(self) -> tuple[int, int]:
        config = self.config
        transformer, scale = self.pipe.transformer.config, self.pipe.vae_scale_factor_spatial
        return (
            config.height or transformer.sample_height * scale,
            config.width or transformer.sample_width * scale,
        )

    def call_args(self, samples: Samples) -> dict[str, Any]:
        config = self.config
        check_resolution(self._trained(), config.height, config.width, config.model_path)  # after a hot reload
        return super().call_args(samples)
