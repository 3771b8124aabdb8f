"""Qwen2-VL captioner (also runs Qwen2.5-VL checkpoints; registered as Qwen2VLCaptioner and QwenVLCaptioner).

Qwen2-VL reads video at its own resolution: frames are resized so both sides are multiples
of patch x merge (28 px) and the area is at most `max_pixels`, then cut into 14 px patches
that go in pairs of frames (`temporal_patch_size` 2), and every 2x2 block of patches is
merged into one token. A frame pair costs at most max_pixels / 784 tokens: 144 at the
default 336 x 336, so the automatic count gives 24 frames within the seed's
`max_model_len: 2048` with 256 new tokens. Frame counts are even; a clip shorter than
that repeats its last frame.

Frames are decoded straight at the size Qwen's own `smart_resize` picks, so the processor
does no second resize. Qwen2.5-VL's time encoding needs the video's real frame rate and the
sampled frame indices: both go to the processor as `video_metadata` (without them it
assumes 24 fps).
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field

from stages.captioners.common import VideoCaptioner
from stages.captioners.config import CaptionerConfig, VideoCost, model_settings, setting

DEFAULT_MAX_PIXELS = 336 * 336


class Qwen2VLCaptionerConfig(CaptionerConfig):
    max_pixels: int | None = Field(
        DEFAULT_MAX_PIXELS,
        ge=56 * 56,
        description="Pixel budget per frame (area); a frame pair costs max_pixels / 784 tokens.",
    )

    def video_cost(self) -> VideoCost:
        found = model_settings(self.model_path)
        patch = setting(found, "config.json:vision_config.patch_size", default=14)
        merge = setting(found, "config.json:vision_config.spatial_merge_size", default=2)
        temporal = setting(found, "config.json:vision_config.temporal_patch_size", default=2)
        return VideoCost(per_group=self.max_pixels // (patch * merge) ** 2, group=temporal)


class Qwen2VLCaptioner(VideoCaptioner):
    """Captions videos with Qwen2-VL / Qwen2.5-VL (transformers or vLLM)."""

    registered_as = ("VideoCaptioner", "VideoCaptioner/QwenVLCaptioner")

    Config: ClassVar[type[CaptionerConfig]] = Qwen2VLCaptionerConfig

    def _vision(self) -> tuple[int, int, int, int]:
        video = self.processor.video_processor
        factor = video.patch_size * video.merge_size
        own_min = (video.size or {}).get("shortest_edge") or 56 * 56
        max_pixels = self.config.max_pixels
        return factor, min(own_min, max_pixels), max_pixels, video.temporal_patch_size

    def loaded_cost(self) -> VideoCost:
        factor, _, max_pixels, temporal = self._vision()
        return VideoCost(per_group=max_pixels // factor**2, group=temporal)

    def decode_size(self, width: int, height: int) -> tuple[int, int]:
        from transformers.models.qwen2_vl.video_processing_qwen2_vl import smart_resize

        factor, min_pixels, max_pixels, _ = self._vision()
        out_h, out_w = smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
        return out_w, out_h

    def processor_kwargs(self) -> dict[str, Any]:
        _, min_pixels, max_pixels, _ = self._vision()
        kwargs: dict[str, Any] = {"size": {"shortest_edge": min_pixels, "longest_edge": max_pixels}}
        if hasattr(self.processor.video_processor, "cap_pixels_per_frame"):
            kwargs["cap_pixels_per_frame"] = False  # the frame budget is ours (max_model_len)
        return kwargs
