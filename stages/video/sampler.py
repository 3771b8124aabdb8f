"""FrameSampler: uniformly spaced frames (or frames at a rate) saved as JPEG beside the job's media."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from stages.base import MEDIA_DIR, RECORD_ID, FieldKind, Stage, StageConfig, StageError, safe_file_stem
from stages.video.decoders import DecoderKey
from stages.video.frames import clip_window, sample_frames


class FrameSamplerConfig(StageConfig, DecoderKey):  # DecoderKey: the `decoder` key
    num_frames: int | None = Field(None, ge=1, le=1024, description="Frames spaced evenly over the video.")
    fps: float | None = Field(
        None, gt=0, le=120, description="Frames per second of video to take instead of num_frames."
    )
    max_frames: int | None = Field(None, ge=1, description="With fps: at most this many frames (evenly thinned).")
    max_side: int | None = Field(None, ge=16, description="Downscale so the longer side is at most this many pixels.")
    quality: int = Field(90, ge=1, le=100, description="JPEG quality.")
    output_key: str = Field("frames", description="Record field that receives the list of frame paths.")

    @model_validator(mode="after")
    def _one_rate(self):
        if self.num_frames is None and self.fps is None:
            self.num_frames = 8
        elif self.num_frames is not None and self.fps is not None:
            raise ValueError(f"give num_frames or fps, not both (got num_frames={self.num_frames}, fps={self.fps})")
        return self

    def input_fields(self) -> dict[str, FieldKind]:
        return {self.video_key: "video"}


class FrameSampler(Stage):
    """Decodes each chosen frame once (the shared sampler) and writes `<media>/<id>/frame_<n>.jpg`."""

    registered_as = ("VideoProcessor",)

    Config = FrameSamplerConfig

    def prepare(self, record: dict[str, Any]) -> dict[str, Any]:
        """Decode and save here, in the runtime's thread pool: this stage has no model to feed."""
        from PIL import Image

        config = self.config
        sampled = sample_frames(
            record[config.video_key],
            num_frames=config.num_frames,
            fps=config.fps,
            max_frames=config.max_frames,
            max_side=config.max_side,
            window=clip_window(record),  # a clip of the source: only its frames
            decoder=config.decoder,
            device=self.device,
        )
        folder = Path(record[MEDIA_DIR]) / safe_file_stem(str(record[RECORD_ID]))  # one folder per id, never shared
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for image, index in zip(sampled.frames, sampled.indices, strict=True):
            path = folder / f"frame_{index:06d}.jpg"
            Image.fromarray(image).save(path, quality=config.quality)
            paths.append(path)
        self.usage["sampled_frames"] += len(paths)
        return {config.output_key: paths, "frame_indices": sampled.indices}

    def process(self, batch: list[dict[str, Any]]) -> list[dict[str, Any] | StageError]:
        return [{key: prepared[key] for key in (self.config.output_key, "frame_indices")} for prepared in batch]
