"""Probe videos and sample frames: the one frame sampler every video stage reuses.

The frames to take are planned here (stages/video/plan.py) and read by PyAV or, with the
`decoder` key, TorchCodec (stages/video/decoders.py): same frame numbers either way.
PyAV sampling decodes each chosen frame once. The packet index (demux only, no decoding) gives
the exact frame count and the keyframe positions; when keyframes are dense the sampler
seeks to each target, when they are sparse it decodes straight through and keeps only the
targets, whichever decodes fewer frames, and frames nothing refers to are skipped unread.
Frames come out upright (display rotation applied) as uint8 RGB arrays, T x H x W x 3.

Clip windows. A record made by ShotSplitter carries `clip: {start_s, end_s, start_frame,
num_frames, ...}` while its `video_key` still names the whole source; every frame-reading
stage passes `clip_window(record)` as `window=` so it samples only inside [start_s, end_s).
Once ClipTranscoder has written the clip as its own file it sets `clip_file: true` and the
window no longer applies (the file *is* the clip).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from stages.base import StageError
from stages.video.decoders import Facts, TorchCodecVideo, choose
from stages.video.plan import (
    CLIP_FILE_KEY,
    CLIP_KEY,
    ClipWindow,
    FramePlan,
    SizeRule,
    clip_window,
    fps_indices,
    out_size,
    record_video,
    uniform_indices,
)

# Re-exported: the stages and tests import these from here.
__all__ = ["CLIP_FILE_KEY", "CLIP_KEY", "ClipWindow", "clip_window", "fps_indices", "record_video", "uniform_indices"]


@dataclass(frozen=True)
class VideoInfo:
    duration_s: float
    fps: float
    num_frames: int
    width: int
    height: int
    codec: str
    pix_fmt: str | None
    rotation: int
    has_audio: bool
    bit_rate: int | None

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class SampledFrames:
    frames: np.ndarray  # T x H x W x 3, uint8, RGB, upright
    indices: list[int]  # frame numbers in the video, 0-based
    fps: float  # the video's own frame rate
    total_frames: int  # frames in the sampled window (the whole video without one)
    timestamps_s: list[float] = field(default_factory=list)  # from the video's start
    first_frame: int = 0  # frame number where the window starts

    @property
    def duration_s(self) -> float:
        return self.total_frames / self.fps if self.fps else 0.0


def _open(path: str | Path):
    import av

    path = Path(path)
    if not path.is_file():
        raise StageError(f"video file not found: {path}", error_type="VideoNotFound")
    try:
        container = av.open(str(path))
    except av.error.FFmpegError as exc:
        raise StageError(
            f"cannot open {path.name} as a video ({exc}); expected a container ffmpeg reads (mp4, mkv, webm, ...)",
            error_type="VideoDecodeError",
        ) from None
    if not container.streams.video:
        container.close()
        raise StageError(f"{path.name} has no video stream (audio-only or not a video)", error_type="NoVideoStream")
    return container


@dataclass(frozen=True)
class _PacketIndex:
    pts: list[int]  # presentation timestamps of every frame, sorted
    keyframe_pts: list[int]


def _index_packets(container, stream) -> _PacketIndex:
    pts, keys = [], []
    for packet in container.demux(stream):
        if packet.pts is None or packet.size == 0:
            continue
        pts.append(packet.pts)
        if packet.is_keyframe:
            keys.append(packet.pts)
    pts.sort()
    return _PacketIndex(pts, keys)


def _rotation_of(stream, first_frame=None) -> int:
    rotation = getattr(first_frame, "rotation", 0) if first_frame is not None else 0
    if not rotation:
        tag = (stream.metadata or {}).get("rotate")
        rotation = -int(tag) if tag and tag.lstrip("-").isdigit() else 0
    return int(rotation) % 360


def _upright(image: np.ndarray, rotation: int) -> np.ndarray:
    # `rotation` is the display matrix's counter-clockwise angle, as ffmpeg's autorotate reads it.
    quarter_turns = round(rotation / 90) % 4
    return np.ascontiguousarray(np.rot90(image, k=quarter_turns)) if quarter_turns else image


def probe(path: str | Path, window: ClipWindow | None = None, decoder: str = "pyav") -> VideoInfo:
    """Container and stream facts; with a `window`, the duration and frame count are the clip's.

    The frame count comes from a demux pass: PyAV's, or (`decoder` picks TorchCodec) TorchCodec's
    scan in C++, unless a window in seconds needs every frame's time (PyAV's index has them).
    """
    import av

    container = _open(path)
    try:
        stream = container.streams.video[0]
        chosen, _ = choose(decoder, _header_facts(stream))
        if chosen == "torchcodec" and (window is None or window.start_frame is not None):
            frames = TorchCodecVideo(str(path), lambda w, h: None, "cpu", Path(path).name).num_frames
            index = _PacketIndex(list(range(frames)), [])  # a count only: nothing below reads the pts
        else:
            index = _index_packets(container, stream)
        container.seek(0)
        first = None
        try:
            first = next(container.decode(stream), None)
        except av.error.FFmpegError:
            first = None
        fps = float(stream.average_rate or stream.base_rate or 0)
        duration, num_frames = _duration_s(container, stream, index, fps), len(index.pts)
        if window is not None and index.pts:
            _, num_frames = _window_frames(index, float(stream.time_base or 0), fps or 25.0, window, Path(path).name)
            duration = num_frames / fps if fps else window.end_s - window.start_s
        return VideoInfo(
            duration_s=round(duration, 3),
            fps=round(fps, 3),
            num_frames=num_frames,
            width=stream.codec_context.width,
            height=stream.codec_context.height,
            codec=stream.codec_context.name,
            pix_fmt=stream.codec_context.pix_fmt,
            rotation=_rotation_of(stream, first),
            has_audio=bool(container.streams.audio),
            bit_rate=container.bit_rate or stream.bit_rate or None,
        )
    finally:
        container.close()


def _duration_s(container, stream, index: _PacketIndex, fps: float) -> float:
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return container.duration / 1_000_000
    return len(index.pts) / fps if fps else 0.0


def sample_frames(
    path: str | Path,
    num_frames: int | None = None,
    fps: float | None = None,
    max_frames: int | None = None,
    max_side: int | None = None,
    *,
    size: SizeRule | None = None,
    over_max_frames: Literal["thin", "error"] = "thin",
    window: ClipWindow | None = None,
    at: list[int] | None = None,
    decoder: str = "pyav",
    device: str = "cpu",
) -> SampledFrames:
    """Decode the frames chosen by `num_frames` (uniform) or `fps` (every 1/fps s).

    `max_side` downscales so that the longer side is at most that many pixels; `size`
    instead gives the exact output size as a function of the upright size (a model's own
    resize rule, so frames come out at the size its processor wants, scaled once by ffmpeg).
    When `fps` sampling needs more than `max_frames` frames, `over_max_frames="thin"` spreads
    `max_frames` evenly over the video and `"error"` raises a `StageError` of type
    `TooManyFrames` before anything is decoded. `window` restricts everything (the count,
    the spacing, the limit) to one clip of the video; indices and timestamps stay the video's.
    `at` (instead of `num_frames`/`fps`) names the frames to take, counted from the window's start.
    `decoder` (`pyav`, `torchcodec`, `auto`; see stages/video/decoders.py) picks the library;
    the frame numbers are planned here, the same for all; `device` lets TorchCodec use NVDEC.
    """
    import av

    if sum(x is not None for x in (num_frames, fps, at)) != 1:
        raise ValueError("give exactly one of num_frames, fps or at")
    if size is not None and max_side is not None:
        raise ValueError("give at most one of max_side or size")
    plan = FramePlan(num_frames, fps, max_frames, over_max_frames, at, window is not None)
    container = _open(path)
    name = Path(path).name
    try:
        stream = container.streams.video[0]
        chosen, on = choose(decoder, _header_facts(stream), device)
        if chosen == "torchcodec":
            return _sample_torchcodec(path, container, plan, window, out_size(max_side, size), on, name)
        stream.thread_type = "AUTO"
        index = _index_packets(container, stream)
        total = len(index.pts)
        if total == 0:
            raise StageError(
                f"{name} has a video stream with no frames (empty or truncated file)", error_type="EmptyVideo"
            )
        video_fps = float(stream.average_rate or stream.base_rate or 0) or 25.0
        time_base = float(stream.time_base or 0)
        first, span = _window_frames(index, time_base, video_fps, window, name)
        wanted = [first + i for i in plan.frames(span, video_fps, name)]
        wanted_pts = [index.pts[i] for i in wanted]
        if _seeking_is_cheaper(index, len(wanted), span):
            decoded = _decode_by_seeking(container, stream, wanted_pts)
        else:
            # Inside a clip window, straight decoding starts at the keyframe before the clip.
            decoded = _decode_straight(container, stream, wanted_pts, from_pts=wanted_pts[0] if first else None)
        found = [(i, p) for i, p in zip(wanted, wanted_pts, strict=True) if p in decoded]
        if not found:
            raise StageError(
                f"{name}: none of the {len(wanted)} sampled frames could be decoded", error_type="VideoDecodeError"
            )
        first_frame = decoded[found[0][1]]
        rotation = _rotation_of(stream, first_frame)
        images = [_to_rgb(decoded[p], max_side, rotation, size) for _, p in found]
        start = index.pts[0]
        return SampledFrames(
            frames=np.stack(images),
            indices=[i for i, _ in found],
            fps=video_fps,
            total_frames=span,
            timestamps_s=[round((p - start) * time_base, 4) for _, p in found],
            first_frame=first,
        )
    except av.error.FFmpegError as exc:
        raise StageError(
            f"{name} could not be decoded ({exc}); the file is corrupt or truncated", error_type="VideoDecodeError"
        ) from None
    finally:
        container.close()


def _header_facts(stream):
    context = stream.codec_context  # None for a stream ffmpeg has no decoder for: the decode step says so
    width, height = (context.width, context.height) if context is not None else (0, 0)
    if round(_rotation_of(stream) / 90) % 2:
        width, height = height, width
    return Facts(width, height, int(stream.frames or 0))


def _sample_torchcodec(
    path, container, plan: FramePlan, window: ClipWindow | None, out_size, device: str, name: str
) -> SampledFrames:
    stream = container.streams.video[0]
    try:
        video = TorchCodecVideo(str(path), out_size, device, name)
    except StageError:
        if _index_packets(container, stream).pts:
            raise
        total = 0  # TorchCodec refuses a stream without frames; say what PyAV's path says
    else:
        total = video.num_frames
    if total == 0:
        raise StageError(f"{name} has a video stream with no frames (empty or truncated file)", error_type="EmptyVideo")
    if window is not None and window.start_frame is None:
        # A window in seconds: PyAV's packet index maps it to frames exactly as the PyAV path does.
        index = _index_packets(container, stream)
        first, span = _window_frames(index, float(stream.time_base or 0), video.fps, window, name)
    elif window is not None:
        first, span = _window_frames(_PacketIndex(list(range(total)), []), 0.0, video.fps, window, name)
    else:
        first, span = 0, total
    wanted = [first + i for i in plan.frames(span, video.fps, name)]
    frames, times = video.read(wanted)
    return SampledFrames(frames, wanted, video.fps, span, times, first)


def _window_frames(
    index: _PacketIndex, time_base: float, fps: float, window: ClipWindow | None, name: str
) -> tuple[int, int]:
    """(first frame, frame count) of the window in presentation order; the whole video without one."""
    total = len(index.pts)
    if window is None:
        return 0, total
    if window.start_frame is not None and window.num_frames is not None:
        first, span = window.start_frame, window.num_frames
    else:
        # A frame belongs to the window when its time rounds into [start_s, end_s): half a frame of
        # slack, so a start written with a few decimals (1/30 s = 0.033) still takes its first frame.
        slack, origin = 0.5 / fps, index.pts[0]
        times = [(p - origin) * time_base for p in index.pts]
        inside = [n for n, t in enumerate(times) if window.start_s - slack <= t < window.end_s - slack]
        first, span = (inside[0], len(inside)) if inside else (0, 0)
    if span <= 0 or first < 0 or first + span > total:
        raise StageError(
            f"{name}: the clip window [{window.start_s:g} s, {window.end_s:g} s) (frames {first}..{first + span}) "
            f"is not inside the video's {total} frames ({total / fps:.2f} s); the record's `clip` does not belong "
            "to this file",
            error_type="BadClip",
        )
    return first, span


def _seeking_is_cheaper(index: _PacketIndex, targets: int, span: int | None = None) -> bool:
    span = len(index.pts) if span is None else span
    if not index.keyframe_pts:
        return False
    average_gop = len(index.pts) / len(index.keyframe_pts)
    # A seek decodes on average half a GOP plus the target; straight decoding decodes the span.
    return targets * (average_gop / 2 + 1) < span


def _decoded(container, stream, wanted: set[int]):
    """Frames in presentation order; a frame that is neither wanted nor a reference for other frames
    (a non-reference B-frame: about half of x264's default output) is dropped by the decoder unread,
    which leaves every other frame bit-identical: nothing predicts from it."""
    context = stream.codec_context
    for packet in container.demux(stream):
        context.skip_frame = "DEFAULT" if packet.pts is None or packet.pts in wanted else "NONREF"
        yield from packet.decode()


def _decode_straight(container, stream, wanted_pts: list[int], from_pts: int | None = None) -> dict:
    wanted, found = set(wanted_pts), {}
    last_wanted = max(wanted_pts)
    if from_pts is None:
        container.seek(0)
    else:
        container.seek(from_pts, stream=stream, backward=True, any_frame=False)
    for frame in _decoded(container, stream, wanted):
        if frame.pts in wanted:
            found[frame.pts] = frame
        if frame.pts is not None and frame.pts >= last_wanted and len(found) == len(wanted):
            break
    return found


def _decode_by_seeking(container, stream, wanted_pts: list[int]) -> dict:
    found = {}
    for target in wanted_pts:
        if target in found:
            continue
        container.seek(target, stream=stream, backward=True, any_frame=False)
        for frame in _decoded(container, stream, {target}):
            if frame.pts is None:
                continue
            if frame.pts >= target:
                found[target] = frame
                break
    return found


def _to_rgb(frame, max_side: int | None, rotation: int, size: SizeRule | None = None) -> np.ndarray:
    width, height = frame.width, frame.height
    if size is not None:
        sideways = round(rotation / 90) % 2 == 1  # the display is the coded frame turned a quarter
        upright = (height, width) if sideways else (width, height)
        out_w, out_h = size(*upright)
        if sideways:
            out_w, out_h = out_h, out_w
        if (out_w, out_h) == (width, height):
            return _upright(frame.to_ndarray(format="rgb24"), rotation)
        return _upright(frame.to_ndarray(format="rgb24", width=out_w, height=out_h, interpolation="AREA"), rotation)
    if max_side and max(width, height) > max_side:
        scale = max_side / max(width, height)
        width, height = max(2, round(width * scale)), max(2, round(height * scale))
        return _upright(frame.to_ndarray(format="rgb24", width=width, height=height), rotation)
    return _upright(frame.to_ndarray(format="rgb24"), rotation)
