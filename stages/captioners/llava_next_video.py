"""LLaVA-NeXT-Video captioner (registered as LLaVANeXTVideoCaptioner).

A CLIP tower at a fixed input size (336 px on the released checkpoints): each frame is
resized so its short side matches, centre-cropped square, cut into 14 px patches and
average-pooled 2x2, so a frame costs (336 / 14)^2 / 4 = 144 tokens; the seed's
`max_model_len: 2048` with 256 new tokens fits 12 frames.

Frames are decoded straight at the short side the processor wants. `max_pixels` only caps
that decoding size (the processor scales frames to the tower's size in any case).
"""

from __future__ import annotations

import math
from typing import ClassVar

from pydantic import Field

from stages.captioners.common import VideoCaptioner
from stages.captioners.config import MIN_PIXELS_FLOOR, CaptionerConfig, VideoCost, model_settings, setting


def _cost(side: int, patch: int) -> VideoCost:
    return VideoCost(per_group=(side // patch) ** 2 // 4)


def _short_side_to(side: int, width: int, height: int, max_pixels: int | None) -> tuple[int, int]:
    scale = side / min(width, height)
    if max_pixels and width * height * scale * scale > max_pixels:
        scale = math.sqrt(max_pixels / (width * height))
    return max(2, round(width * scale)), max(2, round(height * scale))


class LLaVANeXTVideoCaptionerConfig(CaptionerConfig):
    max_pixels: int | None = Field(
        None,
        ge=MIN_PIXELS_FLOOR,
        description="Caps the decoded frame size only; the tower takes frames at its fixed size (336 px released).",
    )

    def video_cost(self) -> VideoCost:
        found = model_settings(self.model_path)
        side = setting(found, "config.json:vision_config.image_size", default=336)
        patch = setting(found, "config.json:vision_config.patch_size", default=14)
        return _cost(side, patch)


class LLaVANeXTVideoCaptioner(VideoCaptioner):
    """Captions videos with LLaVA-NeXT-Video (transformers or vLLM)."""

    registered_as = ("VideoCaptioner",)

    Config: ClassVar[type[CaptionerConfig]] = LLaVANeXTVideoCaptionerConfig

    def _side(self) -> int:
        crop = self.processor.video_processor.crop_size or {}
        return crop.get("height") or self.processor.video_processor.size.get("shortest_edge")

    def loaded_cost(self) -> VideoCost:
        return _cost(self._side(), self.processor.patch_size)

    def decode_size(self, width: int, height: int) -> tuple[int, int]:
        return _short_side_to(self._side(), width, height, self.config.max_pixels)
