"""LLaVA-OneVision captioner (registered as LLaVAOVCaptioner).

A SigLIP tower at a fixed square input (384 px on the released checkpoints): each frame is
resized to 384 x 384 (no crop), cut into 14 px patches (27 x 27) and pooled bilinearly to
14 x 14, so a frame costs 196 tokens, plus one newline token per video; the seed's
`max_model_len: 2048` with 256 new tokens fits 8 frames.

Frames are decoded straight at the tower's square size, as the processor would resize
them. `max_pixels` only caps that decoding size.
"""

from __future__ import annotations

import math
from typing import ClassVar

from pydantic import Field

from stages.captioners.common import VideoCaptioner
from stages.captioners.config import MIN_PIXELS_FLOOR, CaptionerConfig, VideoCost, model_settings, setting


def _cost(patches_per_side: int) -> VideoCost:
    return VideoCost(per_group=math.ceil(patches_per_side / 2) ** 2, fixed=1)


class LLaVAOVCaptionerConfig(CaptionerConfig):
    max_pixels: int | None = Field(
        None,
        ge=MIN_PIXELS_FLOOR,
        description="Caps the decoded frame size only; the tower takes frames at its fixed size (384 px released).",
    )

    def video_cost(self) -> VideoCost:
        found = model_settings(self.model_path)
        side = setting(found, "config.json:vision_config.image_size", default=384)
        patch = setting(found, "config.json:vision_config.patch_size", default=14)
        return _cost(side // patch)


class LLaVAOVCaptioner(VideoCaptioner):
    """Captions videos with LLaVA-OneVision (transformers or vLLM)."""

    registered_as = ("VideoCaptioner",)

    Config: ClassVar[type[CaptionerConfig]] = LLaVAOVCaptionerConfig

    def _side(self) -> int:
        size = self.processor.video_processor.size or {}
        return size.get("height") or size.get("shortest_edge")

    def loaded_cost(self) -> VideoCost:
        return _cost(math.isqrt(self.processor.num_image_tokens))

    def decode_size(self, width: int, height: int) -> tuple[int, int]:
        side = self._side()
        if self.config.max_pixels and side * side > self.config.max_pixels:
            side = math.isqrt(self.config.max_pixels)
        return side, side
