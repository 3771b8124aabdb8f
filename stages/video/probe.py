"""VideoProbe: container and stream facts of each video, read with PyAV (no frames decoded but one);
the frame count from PyAV's demux pass or, with the `decoder` key, TorchCodec's scan."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from stages.base import FieldKind, Stage, StageConfig, StageError
from stages.video.decoders import DecoderKey
from stages.video.frames import ClipWindow, clip_window, probe


class VideoProbeConfig(StageConfig, DecoderKey):  # DecoderKey: the `decoder` key
    output_key: str = Field("probe", description="Record field that receives the probe result.")

    def input_fields(self) -> dict[str, FieldKind]:
        return {self.video_key: "video"}


def probe_fields(video: Any, window: ClipWindow | None = None, decoder: str = "pyav") -> dict[str, Any]:
    """The probe result: `width`/`height` as coded (stored), `display_width`/`display_height` as the
    frames come out of the samplers (upright: a 90 or 270 degree `rotation` swaps them)."""
    info = probe(video, window, decoder=decoder).as_dict()
    quarter = info["rotation"] % 180 == 90
    info["display_width"], info["display_height"] = (
        (info["height"], info["width"]) if quarter else (info["width"], info["height"])
    )
    return info


class VideoProbe(Stage):
    """Adds `{duration_s, fps, num_frames, width, height, display_width, display_height, codec, pix_fmt,
    rotation, has_audio, bit_rate}`; width/height are the coded size, display_* the upright one.

    For a clip record (a `clip` window on the source, see stages/video/frames.py) the duration and
    frame count are the clip's.
    """

    registered_as = ("VideoProcessor",)

    Config = VideoProbeConfig

    def process(self, batch: list[dict[str, Any]]) -> list[dict[str, Any] | StageError]:
        results: list[dict[str, Any] | StageError] = []
        for record in batch:
            try:
                window = clip_window(record)
                results.append(
                    {self.config.output_key: probe_fields(record[self.config.video_key], window, self.config.decoder)}
                )
            except StageError as error:
                results.append(error)
        return results
