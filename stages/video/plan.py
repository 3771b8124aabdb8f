"""Which frames a sampler takes and at what size (a record's clip window, the frame plan, the output
size): planned once, whatever decoder then reads them."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from stages.base import StageError, missing_field


@dataclass(frozen=True)
class ClipWindow:
    """The part of a video a record stands for: frames [start_frame, start_frame + num_frames)
    when ShotSplitter gave frame numbers (exact), else the seconds [start_s, end_s)."""

    start_s: float
    end_s: float
    start_frame: int | None = None
    num_frames: int | None = None


CLIP_KEY = "clip"
CLIP_FILE_KEY = "clip_file"  # set by ClipTranscoder: video_key names the clip's own file


def record_video(record: dict, video_key: str, stage: str):
    """The record's video path (its `video_key` field), or a MissingField error naming the fields it has."""
    path = record.get(video_key)
    if path is None:
        raise missing_field(stage, video_key, record, fix="set `video_key` to the field that holds the video")
    return path


def clip_window(record: dict) -> ClipWindow | None:
    """The window to sample for this record, or None (the whole file)."""
    clip = record.get(CLIP_KEY)
    if not isinstance(clip, dict) or record.get(CLIP_FILE_KEY):
        return None
    try:
        start_s, end_s = float(clip["start_s"]), float(clip["end_s"])
    except (KeyError, TypeError, ValueError):
        raise StageError(
            f"record {record.get('id')!r}: `clip` must hold numeric start_s and end_s (as ShotSplitter writes "
            f"them), got {clip!r}",
            error_type="BadClip",
        ) from None
    start_frame, num_frames = clip.get("start_frame"), clip.get("num_frames")
    if isinstance(start_frame, int) and isinstance(num_frames, int):
        return ClipWindow(start_s, end_s, start_frame, num_frames)
    return ClipWindow(start_s, end_s)


def uniform_indices(total: int, count: int) -> list[int]:
    """`count` frame numbers spread evenly over `total` frames (centres of equal segments)."""
    if total <= 0 or count <= 0:
        return []
    count = min(count, total)
    return [min(total - 1, int((i + 0.5) * total / count)) for i in range(count)]


def fps_indices(total: int, video_fps: float, sample_fps: float, max_frames: int | None = None) -> list[int]:
    """Frame numbers taken every 1/sample_fps seconds, evenly thinned to `max_frames`."""
    if total <= 0 or video_fps <= 0 or sample_fps <= 0:
        return []
    step = video_fps / sample_fps
    indices = sorted({min(total - 1, int(i * step)) for i in range(max(1, math.floor(total / step)))})
    if max_frames and len(indices) > max_frames:
        indices = [indices[i] for i in uniform_indices(len(indices), max_frames)]
    return indices


# Maps the upright frame size (width, height) to the size to decode at (width, height).
SizeRule = Callable[[int, int], tuple[int, int]]


@dataclass(frozen=True)
class FramePlan:
    """Which frames to take, counted from the window's start, once the window's length is known."""

    num_frames: int | None
    fps: float | None
    max_frames: int | None
    over_max_frames: str
    at: list[int] | None
    in_clip: bool  # counted within a clip window (for the message)

    def frames(self, span: int, video_fps: float, name: str) -> list[int]:
        if self.at is not None:
            wanted = sorted({i for i in self.at if 0 <= i < span})
        elif self.num_frames:
            wanted = uniform_indices(span, self.num_frames)
        else:
            limit = None if self.over_max_frames == "error" else self.max_frames
            wanted = fps_indices(span, video_fps, self.fps or 1.0, limit)
            if self.max_frames and len(wanted) > self.max_frames:
                what = "its clip" if self.in_clip else "it"
                raise StageError(
                    f"{name} lasts {span / video_fps:.1f} s: sampling {what} at {self.fps:g} fps takes {len(wanted)} "
                    f"frames, more than the {self.max_frames} allowed",
                    error_type="TooManyFrames",
                )
        if not wanted:
            raise StageError(f"{name}: no frames to sample (asked for {self.at})", error_type="EmptyVideo")
        return wanted


def out_size(max_side: int | None, size: SizeRule | None):
    """The upright output size as a function of the upright size (None: unchanged), as `_to_rgb` sizes frames."""

    def rule(width: int, height: int) -> tuple[int, int] | None:
        if size is not None:
            out = tuple(size(width, height))
            return None if out == (width, height) else out
        if max_side and max(width, height) > max_side:
            scale = max_side / max(width, height)
            return max(2, round(width * scale)), max(2, round(height * scale))
        return None

    return rule
