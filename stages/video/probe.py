"""VideoProbe: container and stream facts of each video, read with PyAV (no frames decoded but one)."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from stages.base import FieldKind, Stage, StageConfig, StageError
from stages.video.frames import clip_window, probe


class VideoProbeConfig(StageConfig):
    output_key: str = Field("probe", description="Record field that receives the probe result.")

    def input_fields(self) -> dict[str, FieldKind]:
        return {self.video_key: "video"}


class VideoProbe(Stage):
    """Adds `{duration_s, fps, num_frames, width, height, codec, pix_fmt, rotation, has_audio, bit_rate}`.

    For a clip record (a `clip` window on the source, see stages/video/frames.py) the duration and
    frame count are the clip's.
    """

    Config = VideoProbeConfig

    def process(self, batch: list[dict[str, Any]]) -> list[dict[str, Any] | StageError]:
        results: list[dict[str, Any] | StageError] = []
        for record in batch:
            try:
                window = clip_window(record)
                results.append({self.config.output_key: probe(record[self.config.video_key], window).as_dict()})
            except StageError as error:
                results.append(error)
        return results
