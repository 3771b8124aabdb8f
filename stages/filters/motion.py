"""MotionFilter: how much a clip moves, as `motion_score`, and a drop below/above the limits.

The score is measured on pairs of *adjacent* frames spread evenly over the clip (its `clip`
window of the source, or the whole file), decoded once at a small size:

- `method: farneback` (default): the mean magnitude of OpenCV's Farneback dense optical flow,
  in pixels per frame at `analysis_short_side` (a still shot ~0, a slow pan ~1, fast action >5);
- `method: diff`: the mean absolute grey-level difference between the two frames (0..255).

Adjacent pairs (not frames far apart) keep the score a per-frame speed whatever the clip's
length, and small displacements are what Farneback tracks well.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from stages.base import FieldKind, Filtered, Requirements, Stage, StageConfig, StageError, require
from stages.video.decoders import DecoderKey
from stages.video.frames import clip_window, record_video, sample_frames, uniform_indices


class MotionFilterConfig(StageConfig, DecoderKey):  # DecoderKey: the `decoder` key
    method: Literal["farneback", "diff"] = Field(
        "farneback", description="farneback: mean optical-flow magnitude; diff: mean absolute frame difference."
    )
    pairs: int = Field(8, ge=1, le=256, description="Adjacent frame pairs measured, spread evenly over the clip.")
    analysis_short_side: int = Field(
        128, ge=16, le=1080, description="Frames are decoded with the shorter side at this many pixels (not upscaled)."
    )
    min_score: float | None = Field(None, ge=0, description="Drop clips scoring below this (too still).")
    max_score: float | None = Field(None, ge=0, description="Drop clips scoring above this (too shaky, flashes).")
    score_key: str = Field("motion_score", description="Record field that receives the score.")

    @model_validator(mode="after")
    def _limits_in_order(self):
        if self.min_score is not None and self.max_score is not None and self.min_score > self.max_score:
            raise ValueError(f"min_score {self.min_score} is above max_score {self.max_score}; no clip could pass")
        return self

    def input_fields(self) -> dict[str, FieldKind]:
        return {self.video_key: "video"}


class MotionFilter(Stage):
    """Adds `motion_score`; a clip outside [min_score, max_score] becomes `Filtered`."""

    registered_as = ("VideoFilter",)

    Config = MotionFilterConfig
    config: MotionFilterConfig

    @classmethod
    def requirements(cls, config: MotionFilterConfig) -> Requirements:
        return Requirements.of("clips", "cv2") if config.method == "farneback" else Requirements()

    def load(self) -> None:
        if self.config.method == "farneback":
            require("cv2", stage="MotionFilter", extra="clips")

    def process(self, batch: list[dict[str, Any]]) -> list[dict[str, Any] | StageError | Filtered]:
        results: list[dict[str, Any] | StageError | Filtered] = []
        for record in batch:
            try:
                results.append(self.judge(self.score(record)))
            except StageError as error:
                results.append(error)
        return results

    def score(self, record: dict[str, Any]) -> float:
        c = self.config
        path = record_video(record, c.video_key, "MotionFilter")
        window = clip_window(record)
        span = window.num_frames if window and window.num_frames else None
        if span is None:
            from stages.video.frames import probe

            span = probe(path, window, decoder=c.decoder).num_frames
        if span < 2:
            return 0.0  # one frame: nothing moves
        starts = uniform_indices(span - 1, c.pairs)
        at = sorted({i for s in starts for i in (s, s + 1)})
        sampled = sample_frames(
            path, at=at, window=window, size=self._analysis_size, decoder=c.decoder, device=self.device
        )
        grey = {i - sampled.first_frame: _grey(f) for i, f in zip(sampled.indices, sampled.frames, strict=True)}
        measure = _flow_magnitude if c.method == "farneback" else _mean_difference
        values = [measure(grey[s], grey[s + 1]) for s in starts if s in grey and s + 1 in grey]
        if not values:
            raise StageError(f"MotionFilter: no adjacent frame pair of {path} could be decoded", "VideoDecodeError")
        self.usage["scored_pairs"] += len(values)
        return round(float(np.mean(values)), 4)

    def judge(self, score: float) -> dict[str, Any] | Filtered:
        c, key = self.config, self.config.score_key
        if c.min_score is not None and score < c.min_score:
            return Filtered(f"{key} {score:g} is below min_score {c.min_score:g} (too still)", {key: score})
        if c.max_score is not None and score > c.max_score:
            return Filtered(f"{key} {score:g} is above max_score {c.max_score:g} (too much motion)", {key: score})
        return {key: score}

    def _analysis_size(self, width: int, height: int) -> tuple[int, int]:
        scale = min(1.0, self.config.analysis_short_side / min(width, height))
        return max(8, round(width * scale)), max(8, round(height * scale))


def _grey(frame: np.ndarray) -> np.ndarray:
    # ITU-R BT.601 luma, the weights OpenCV's RGB2GRAY uses.
    return (frame[..., 0] * 0.299 + frame[..., 1] * 0.587 + frame[..., 2] * 0.114).astype(np.uint8)


def _flow_magnitude(a: np.ndarray, b: np.ndarray) -> float:
    import cv2

    flow = cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 3, 15, 3, 5, 1.2, 0)
    return float(np.linalg.norm(flow, axis=2).mean())


def _mean_difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())
