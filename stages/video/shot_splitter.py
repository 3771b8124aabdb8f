"""VideoProcessor/ShotSplitter: one video in, one child record per shot (clip) out.

Shot boundaries come from PySceneDetect's detectors (`content`: HSV/luma difference between
adjacent frames against `threshold`; `adaptive`: that difference against its rolling
average), fed frames decoded by PyAV at `analysis_short_side` pixels (with the decoder's own
threads) rather than at full size, which is where most of the time goes. `stride` cuts fixed
`stride_s` pieces without looking at the pixels.

Each shot then obeys `min_clip_s` (shorter ones dropped, or merged into the previous shot with
`merge_short: true`) and `max_clip_s` (longer ones cut into equal pieces that tile the shot
exactly). Each clip becomes a child record (id `<parent>:<k>`, by the runtime) holding
`clip: {index, start_s, end_s, start_frame, end_frame, num_frames, fps}` (frames counted from
0, `end_frame` exclusive, so `num_frames = end_frame - start_frame`; `start_s = start_frame /
fps`), `source_id` and `source_video`. A video with no clip long enough is filtered with
that reason. Cuts land on the first frame of the new shot.

The work runs in `prepare` (decoding is CPU work the runtime overlaps with other records);
`process` only hands the clips on.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from stages.base import FieldKind, Filtered, Requirements, Stage, StageConfig, StageError, require
from stages.video.decoders import DecoderKey, Facts, TorchCodecVideo, choose


class ShotSplitterConfig(StageConfig, DecoderKey):  # DecoderKey: the `decoder` key
    detector: Literal["content", "adaptive", "stride"] = Field(
        "content", description="content / adaptive: PySceneDetect's detectors; stride: fixed-length pieces."
    )
    threshold: float | None = Field(
        None,
        gt=0,
        description="Detector threshold: content's `threshold` (default 27) or adaptive's `adaptive_threshold` (3).",
    )
    min_clip_s: float = Field(1.0, ge=0, description="Shots shorter than this are dropped (or merged, merge_short).")
    merge_short: bool = Field(
        False, description="Merge a too-short shot into the one before it instead of dropping it."
    )
    max_clip_s: float = Field(30.0, gt=0, description="Longer shots are cut into equal pieces of at most this.")
    stride_s: float = Field(5.0, gt=0, description="detector: stride: the length of each piece.")
    analysis_short_side: int = Field(
        160, ge=16, description="Detection decodes frames with this short side (pixels): far faster than full size."
    )
    min_scene_frames: int = Field(
        1, ge=1, description="Detector's min_scene_len: frames a shot must last before the next cut is taken."
    )

    @model_validator(mode="after")
    def _limits(self) -> ShotSplitterConfig:
        if self.min_clip_s > self.max_clip_s:
            raise ValueError(
                f"min_clip_s ({self.min_clip_s}) is above max_clip_s ({self.max_clip_s}); no clip could satisfy both"
            )
        return self

    def input_fields(self) -> dict[str, FieldKind]:
        return {self.video_key: "video"}


def _decode_small(path: Path, short_side: int, decoder: str = "pyav", device: str = "cpu"):
    """Yield (frame number, BGR ndarray at the analysis size); and the fps, via the first item."""
    av = require("av", stage="ShotSplitter", extra="clips")
    container = av.open(str(path))
    try:
        if not container.streams.video:
            raise StageError(
                f"ShotSplitter: {path.name} has no video stream (audio-only or not a video); expected a video file",
                error_type="NoVideoStream",
            )
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        # The deblocking filter smooths 4-8 px block edges that the downscale to
        # analysis_short_side averages away anyway; skipping it saves ~20% of an H.264 decode.
        stream.codec_context.options = {"skip_loop_filter": "all"}
        rate = stream.average_rate or stream.base_rate or stream.guessed_rate
        fps = float(rate) if rate else 25.0
        width, height = stream.codec_context.width, stream.codec_context.height
        scale = short_side / max(1, min(width, height))
        size = (max(2, round(width * scale / 2) * 2), max(2, round(height * scale / 2) * 2)) if scale < 1 else None
        yield fps
        chosen, on = choose(decoder, Facts(width, height, int(stream.frames or 0)), device)
        if chosen == "torchcodec":
            yield from _small_by_torchcodec(path, short_side, on)
            return
        # One reformatter for the whole video: frame.to_ndarray(width=...) builds a new swscale
        # context per frame, which cost more than decoding the frame (profiled in bench/split.py).
        from av.video.reformatter import VideoReformatter

        reformatter = VideoReformatter()
        width, height = size or (width, height)
        # FAST_BILINEAR reads a few source pixels per output pixel, as the scenedetect CLI's own
        # cv2.resize(INTER_LINEAR) downscale does; swscale's default BILINEAR widens its filter to
        # the whole 4.5x footprint and took twice as long at 720p for the same cuts (bench/split.py).
        for number, frame in enumerate(container.decode(stream)):
            yield (
                number,
                reformatter.reformat(frame, width, height, "bgr24", interpolation="FAST_BILINEAR").to_ndarray(),
            )
    finally:
        container.close()


def _small_by_torchcodec(path: Path, short_side: int, device: str):
    """The same frames through TorchCodec, 64 at a time (upright, and scaled by its bilinear Resize)."""

    def small(width: int, height: int) -> tuple[int, int] | None:
        scale = short_side / max(1, min(width, height))
        return (max(2, round(width * scale / 2) * 2), max(2, round(height * scale / 2) * 2)) if scale < 1 else None

    video = TorchCodecVideo(str(path), small, device, path.name)
    for start in range(0, video.num_frames, 64):
        frames, _ = video.read(list(range(start, min(start + 64, video.num_frames))))
        for offset, image in enumerate(frames):
            yield start + offset, np.ascontiguousarray(image[..., ::-1])  # RGB -> BGR, as PySceneDetect takes


def detect_cuts(path: Path, config: ShotSplitterConfig, device: str = "cpu") -> tuple[list[int], int, float]:
    """The first frame of every shot after the first, the number of frames, and the fps."""
    if config.detector == "stride":
        return [], *_count_frames(path)
    scenedetect = require("scenedetect", stage="ShotSplitter", extra="clips")
    from scenedetect.common import FrameTimecode

    frames = _decode_small(path, config.analysis_short_side, config.decoder, device)
    fps = next(frames)
    if config.detector == "content":
        detector = fast_scoring(scenedetect.ContentDetector)(
            threshold=config.threshold or 27.0, min_scene_len=config.min_scene_frames
        )
    else:
        detector = fast_scoring(scenedetect.AdaptiveDetector)(
            adaptive_threshold=config.threshold or 3.0, min_scene_len=config.min_scene_frames
        )
    cuts: list[int] = []
    total = 0
    for number, image in frames:
        total = number + 1
        for cut in detector.process_frame(FrameTimecode(number, fps), image):
            cuts.append(cut.frame_num)
    if total:
        for cut in detector.post_process(FrameTimecode(total - 1, fps)):
            cuts.append(cut.frame_num)
    return sorted({c for c in cuts if 0 < c < total}), total, fps


@functools.cache  # one subclass per detector class, made once
def fast_scoring(detector_class: type) -> type:
    """`detector_class` (ContentDetector or its subclass AdaptiveDetector) with the same frame score,
    bit for bit, computed by OpenCV in two calls instead of numpy's int32 copies of each plane.

    The score is PySceneDetect's: per HSV channel the sum of |this - last| over the pixels divided
    by the pixel count, the three averaged (default weights, no edges). cv2.sumElems adds the
    absdiff of all three channels exactly (integers in a double), so the float division below is
    the library's own. Any other weighting, edges or a stats manager go to the library's code; so
    does a PySceneDetect without the `_calculate_frame_score` hook this overrides. At 284x160 the
    library's version took 0.63 ms a frame, this one 0.28 (cProfile, bench/split.py's 720p video).
    """
    defaults = getattr(detector_class, "DEFAULT_COMPONENT_WEIGHTS", None)
    if not hasattr(detector_class, "_calculate_frame_score") or tuple(defaults or ()) != (1.0, 1.0, 1.0, 0.0):
        return detector_class  # not the PySceneDetect (0.7) this was checked against
    import cv2

    def _calculate_frame_score(self, timecode, frame_img):
        if self._weights != defaults or self.stats_manager is not None:
            return detector_class._calculate_frame_score(self, timecode, frame_img)
        hsv = cv2.cvtColor(frame_img, cv2.COLOR_BGR2HSV)
        last, self._last_hsv = getattr(self, "_last_hsv", None), hsv
        if last is None:
            return 0.0
        pixels = float(hsv.shape[0] * hsv.shape[1])
        hue, sat, lum, _ = cv2.sumElems(cv2.absdiff(hsv, last))
        return (hue / pixels + sat / pixels + lum / pixels) / 3.0

    return type(f"Fast{detector_class.__name__}", (detector_class,), {"_calculate_frame_score": _calculate_frame_score})


def _count_frames(path: Path) -> tuple[int, float]:
    frames = _decode_small(path, 16)
    fps = next(frames)
    total = sum(1 for _ in frames)
    return total, fps


def plan_clips(cuts: list[int], total: int, fps: float, config: ShotSplitterConfig) -> list[tuple[int, int]]:
    """[start, end) frame ranges of the clips: shots from the cuts (or strides), then the limits."""
    if config.detector == "stride":
        step = max(1, round(config.stride_s * fps))
        bounds = list(range(0, total, step))
    else:
        bounds = [0, *cuts]
    shots = [(start, end) for start, end in zip(bounds, [*bounds[1:], total], strict=True) if end > start]
    min_frames = config.min_clip_s * fps
    kept: list[tuple[int, int]] = []
    carry: int | None = None  # the start of a too-short first shot, waiting to join the next
    for start, end in shots:
        if carry is not None:
            start, carry = carry, None
        if end - start >= min_frames:
            kept.append((start, end))
        elif config.merge_short and kept:
            kept[-1] = (kept[-1][0], end)  # a short shot joins the one before it
        elif config.merge_short:
            carry = start
    max_frames = max(1, math.floor(config.max_clip_s * fps + 1e-9))
    clips: list[tuple[int, int]] = []
    for start, end in kept:
        pieces = math.ceil((end - start) / max_frames)
        edges = [start + round(i * (end - start) / pieces) for i in range(pieces + 1)]
        clips.extend((a, b) for a, b in zip(edges, edges[1:], strict=False) if b > a)
    return clips


class ShotSplitter(Stage):
    registered_as = ("VideoProcessor",)
    Config = ShotSplitterConfig

    @classmethod
    def requirements(cls, config: ShotSplitterConfig) -> Requirements:
        return Requirements.of("clips", "scenedetect") if config.detector != "stride" else Requirements()

    def prepare(self, record: dict[str, Any]) -> dict[str, Any]:
        config = self.config
        path = record[config.video_key]
        try:
            cuts, total, fps = detect_cuts(Path(path), config, self.device)
        except StageError:
            raise
        except Exception as exc:  # PyAV's decode errors name the file; say what was expected
            raise StageError(
                f"ShotSplitter: cannot decode {path}: {type(exc).__name__}: {exc}; expected a readable video",
                error_type="UndecodableVideo",
            ) from exc
        clips = plan_clips(cuts, total, fps, config)
        return {**record, "_clips": clips, "_fps": fps, "_total": total, "_cuts": cuts}

    def process(self, batch: list[dict[str, Any]]) -> list[Any]:
        out: list[Any] = []
        for record in batch:
            clips, fps = record["_clips"], record["_fps"]
            if not clips:
                out.append(
                    Filtered(
                        f"no clip of at least min_clip_s={self.config.min_clip_s} s: the video has "
                        f"{record['_total']} frames at {fps:.3f} fps in {len(record['_cuts']) + 1} shot(s)",
                        {"num_frames": record["_total"], "fps": fps, "shots": len(record["_cuts"]) + 1},
                    )
                )
                continue
            source = record[self.config.video_key]
            out.append(
                [
                    {
                        "clip": {
                            "index": index,
                            "start_s": round(start / fps, 6),
                            "end_s": round(end / fps, 6),
                            "start_frame": start,
                            "end_frame": end,
                            "num_frames": end - start,
                            "fps": fps,
                        },
                        "source_id": record["id"],
                        "source_video": source,
                    }
                    for index, (start, end) in enumerate(clips)
                ]
            )
        return out
