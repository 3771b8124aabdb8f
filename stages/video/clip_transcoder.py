"""ClipTranscoder: each clip (a record's `clip` window, or the whole video) written as its own mp4.

In-process with PyAV: the source is opened once per record batch and source, each clip is
reached by seeking to the keyframe before it, and exactly the clip's frames (by frame number,
as ShotSplitter counts them: presentation order) go to a fresh H.264 encoder, so the file
starts on a keyframe and holds N frames for a clip of N frames. No ffmpeg process per clip.

A clip that starts on a keyframe and ends on one (or at the end of the video), from a source
already in the output codec and pixel format, needing no resize and no frame-rate change, is
cut by stream copy (`copy_when_possible`): no decoding at all. Audio is copied packet by
packet (AAC and the other codecs mp4 holds) for the clip's time span, or dropped
(`keep_audio: false`).

Files are written under a temporary name and renamed once complete and counted, so a kill -9
never leaves a half file under the final name. The record then names the clip file in
`video_key`, keeps the source in `source_video`, and carries `clip_file: true`, which tells
the frame readers (stages/video/frames.py) that the file is the clip: the window is done.
"""

from __future__ import annotations

import contextlib
import errno
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from pydantic import Field

from stages.base import FieldKind, Stage, StageConfig, StageError, media_path
from stages.video.frames import CLIP_FILE_KEY, _index_packets, _open, _rotation_of, _upright, clip_window, record_video

# Audio codecs the mp4 muxer takes as they are (anything else is dropped with keep_audio).
MP4_AUDIO = {"aac", "mp3", "ac3", "eac3", "alac", "flac", "opus"}
# Encoder name -> the codec name a source must have for stream copy to give the same format.
ENCODED_AS = {"libx264": "h264", "libx265": "hevc", "libsvtav1": "av1", "libaom-av1": "av1"}
# What the encoder's errors say when the clip file cannot be written (the source is open by then).
WRITE_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EISDIR, errno.EACCES, errno.EPERM, errno.ENAMETOOLONG}
)


class ClipTranscoderConfig(StageConfig):
    codec: str = Field("libx264", description="Video encoder (an ffmpeg encoder name); H.264 by default.")
    pix_fmt: str = Field("yuv420p", description="Output pixel format (yuv420p plays everywhere).")
    crf: int = Field(20, ge=0, le=51, description="Constant rate factor: lower is better quality, bigger files.")
    preset: str = Field("fast", description="Encoder speed/size trade-off (x264: ultrafast ... veryslow).")
    max_short_side: int | None = Field(
        None, ge=16, description="Downscale so the shorter side is at most this many pixels (None: keep the size)."
    )
    fps: float | None = Field(None, gt=0, le=240, description="Output frame rate (None: keep the source's).")
    keep_audio: bool = Field(True, description="Copy the clip's audio (mp4-compatible codecs) or drop it.")
    copy_when_possible: bool = Field(
        True,
        description="Cut by stream copy (no re-encode) when the clip starts and ends on keyframes, the source "
        "already has the output codec and pixel format, and no resize or fps change is asked.",
    )
    name_template: str | None = Field(
        None, description="File name under media/<job>/ ('{id}' and record fields); default: the record id."
    )

    def input_fields(self) -> dict[str, FieldKind]:
        return {self.video_key: "video"}


@dataclass
class _Cut:
    """One clip in the source's terms: frames [first, first + count) and their time span."""

    first: int
    count: int
    start_pts: int
    end_time: float  # seconds (source clock) where the clip ends
    start_time: float


class ClipTranscoder(Stage):
    """Writes `media/<job>/<id>.mp4` per record and points `video_key` at it."""

    registered_as = ("VideoProcessor",)

    Config = ClipTranscoderConfig
    config: ClipTranscoderConfig

    def process(self, batch: list[dict[str, Any]]) -> list[dict[str, Any] | StageError]:
        # Clips of one source usually come in one batch (a split's children): open and index
        # the source once for all of them, not once per clip.
        sources: dict[Path, _Source | StageError] = {}
        results: list[dict[str, Any] | StageError] = []
        try:
            for record in batch:
                try:
                    results.append(self._one(record, sources))
                except StageError as error:
                    results.append(error)
        finally:
            for opened in sources.values():
                if isinstance(opened, _Source):
                    opened.container.close()
        return results

    def _one(self, record: dict[str, Any], sources: dict[Path, _Source | StageError]) -> dict[str, Any]:
        import av

        c = self.config
        source = Path(record_video(record, c.video_key, "ClipTranscoder"))
        final = media_path(record, "mp4", c.name_template)
        if final.resolve() == source.resolve():
            raise StageError(
                f"ClipTranscoder: the clip file {final} would overwrite its source; set name_template",
                error_type="BadOutputPath",
            )
        partial = final.with_name(final.name + ".part")
        try:
            if source not in sources:
                sources[source] = _open_source(source)
            opened = sources[source]
            if isinstance(opened, StageError):
                raise opened
            method, info = self._write(opened, clip_window(record), partial)
        except av.error.FFmpegError as exc:
            _discard(partial)
            if isinstance(exc, OSError) and (exc.errno in WRITE_ERRNOS or exc.filename == str(partial)):
                # Writing the clip failed (a full disk, a folder in the way): the source is fine, and
                # the errno lets the runtime tell a full disk (it waits) from a bad output path.
                raise StageError(
                    f"ClipTranscoder: cannot write the clip file {partial}: {exc.strerror}",
                    error_type="WriteError",
                    errno=exc.errno,
                ) from None
            error = StageError(
                f"ClipTranscoder: {source.name} could not be cut ({exc}); the file is corrupt or truncated",
                error_type="VideoDecodeError",
                errno=exc.errno if isinstance(exc, OSError) else None,  # EIO reading it: the disk's, not the file's
            )
            sources.setdefault(source, error)
            raise error from None
        except StageError as error:
            sources.setdefault(source, error)
            raise
        with partial.open("rb+") as written:
            os.fsync(written.fileno())  # on disk before it has the final name (a power cut, not only kill -9)
        os.replace(partial, final)  # complete and counted: only now under the final name
        self.usage["clips_written"] += 1
        self.usage[f"clips_{method}"] += 1
        self.usage["clip_frames"] += info["num_frames"]
        return {
            c.video_key: final,
            "source_video": record.get("source_video") or source,
            CLIP_FILE_KEY: True,
            "transcode": {"method": method, **info},
        }

    # -- one clip --------------------------------------------------------------------------
    def _write(self, src: _Source, window, partial: Path) -> tuple[str, dict]:
        c, stream, index, fps = self.config, src.stream, src.index, src.fps
        cut = _cut_of(index, stream.time_base, fps, window, src.path.name)
        audio = src.audio if c.keep_audio else None
        if c.keep_audio and src.audio_dropped:
            self.usage["audio_dropped"] += 1  # e.g. Vorbis from a webm: mp4 cannot hold it as it is
        width, height = stream.codec_context.width, stream.codec_context.height
        size = _output_size(width, height, c.max_short_side)
        if not src.rotation and self._can_copy(stream, index, cut, size, (width, height)):
            written = _copy(src.container, stream, audio, cut, partial)
            if written == cut.count:
                return "copy", {"num_frames": written, "width": width, "height": height, "fps": round(fps, 3)}
            self.usage["copy_fallbacks"] += 1  # a stream the packet rule does not fit (open GOP): encode
        out_fps = c.fps or fps
        written, out_size = _encode(src.container, stream, audio, cut, partial, c, size, fps, out_fps, src.rotation)
        expected = cut.count if c.fps is None else max(1, round(cut.count * out_fps / fps))
        if written != expected:
            _discard(partial)
            raise StageError(
                f"ClipTranscoder: {src.path.name} frames {cut.first}..{cut.first + cut.count}: expected {expected} "
                f"frames in the clip file, wrote {written}; the source is damaged inside the clip",
                error_type="VideoDecodeError",
            )
        return "encode", {"num_frames": written, "width": out_size[0], "height": out_size[1], "fps": round(out_fps, 3)}

    def _can_copy(self, stream, index, cut: _Cut, size, source_size) -> bool:
        c = self.config  # (a rotated source is always encoded: copied packets would lose the rotation)
        if not c.copy_when_possible or c.fps is not None or size != source_size:
            return False
        if ENCODED_AS.get(c.codec) != stream.codec_context.name or stream.codec_context.pix_fmt != c.pix_fmt:
            return False
        keys = set(index.keyframe_pts)
        end = cut.first + cut.count
        return index.pts[cut.first] in keys and (end == len(index.pts) or index.pts[end] in keys)


def _discard(partial: Path) -> None:
    """Remove a clip file left half-written; what stopped the write is the error to report, not this."""
    with contextlib.suppress(OSError):  # e.g. a folder in its place, which is that error
        partial.unlink(missing_ok=True)


@dataclass
class _Source:
    """An opened source and what every clip of it needs: its packet index, rate, rotation."""

    path: Path
    container: Any
    stream: Any
    index: Any
    fps: float
    rotation: int
    audio: Any  # the audio stream to copy, or None
    audio_dropped: bool  # it has audio mp4 cannot hold as it is


def _open_source(path: Path) -> _Source:
    container = _open(path)
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        index = _index_packets(container, stream)
        if not index.pts:
            raise StageError(f"ClipTranscoder: {path.name} has no video frames", error_type="EmptyVideo")
        fps = float(stream.average_rate or stream.base_rate or 0) or 25.0
        container.seek(0)  # the display rotation sits on decoded frames (side data), not in the stream tags
        rotation = _rotation_of(stream, next(container.decode(stream), None))
    except BaseException:
        container.close()
        raise
    audio = container.streams.audio[0] if container.streams.audio else None
    dropped = audio is not None and audio.codec_context.name not in MP4_AUDIO
    return _Source(path, container, stream, index, fps, rotation, None if dropped else audio, dropped)


def _cut_of(index, time_base, fps: float, window, name: str) -> _Cut:
    from stages.video.frames import _window_frames

    first, count = _window_frames(index, float(time_base), fps, window, name)
    origin = index.pts[0]
    end = first + count
    start_time = float((index.pts[first] - origin) * time_base)
    end_time = float((index.pts[end] - origin) * time_base) if end < len(index.pts) else start_time + count / fps
    return _Cut(
        first, count, index.pts[first], end_time + float(origin * time_base), start_time + float(origin * time_base)
    )


def _output_size(width: int, height: int, max_short_side: int | None) -> tuple[int, int]:
    """The encoded size: the short side capped, both sides even (yuv420p needs even sizes)."""
    scale = min(1.0, max_short_side / min(width, height)) if max_short_side else 1.0
    return max(2, int(width * scale) // 2 * 2), max(2, int(height * scale) // 2 * 2)


def _open_output(partial: Path, audio_in):
    import av

    out = av.open(str(partial), "w", format="mp4", options={"movflags": "+faststart"})
    audio_out = out.add_stream_from_template(audio_in) if audio_in is not None else None
    return out, audio_out


def _audio_packet(packet, audio_out, cut: _Cut) -> bool:
    """Rebase and keep an audio packet inside the clip's span; False once past the end."""
    if packet.pts is None:
        return True
    seconds = float(packet.pts * packet.time_base)
    if seconds >= cut.end_time:
        return False
    if seconds >= cut.start_time:
        offset = round(cut.start_time / packet.time_base)
        packet.pts -= offset
        packet.dts = packet.pts if packet.dts is None else packet.dts - offset
        packet.stream = audio_out
        audio_out.container.mux(packet)
    return True


def _well_past(packet, video, cut: _Cut) -> bool:
    """A video packet 2 s past the clip: any audio of the clip has come by (muxers interleave
    far tighter), so an audio track that ends early does not make us read the whole file."""
    return packet.stream is video and packet.pts is not None and float(packet.pts * packet.time_base) > cut.end_time + 2


def _copy(container, stream, audio, cut: _Cut, partial: Path) -> int:
    """Stream copy of the clip's packets (from its keyframe to the next); returns frames written."""
    out, audio_out = _open_output(partial, audio)
    try:
        video_out = out.add_stream_from_template(stream)
        container.seek(cut.start_pts, stream=stream, backward=True, any_frame=False)
        written, audio_open, wanted, last_dts = 0, audio is not None, cut.count, None
        for packet in container.demux(*([stream] + ([audio] if audio is not None else []))):
            if packet.stream is stream:
                if _well_past(packet, stream, cut):
                    break
                inside = packet.pts is not None and packet.size and written < wanted
                if not (inside and cut.start_pts <= packet.pts and packet.pts * packet.time_base < cut.end_time - 1e-9):
                    continue
                packet.pts -= cut.start_pts
                packet.dts = packet.pts if packet.dts is None else packet.dts - cut.start_pts
                if last_dts is not None and packet.dts <= last_dts:
                    # Matroska stores no DTS for the first packets of a stream with B-frames, and
                    # DTS = PTS for them runs backwards, which mp4 refuses ("Invalid argument"):
                    # give up the copy; the caller encodes the clip instead.
                    return -1
                last_dts = packet.dts
                packet.stream = video_out
                out.mux(packet)
                written += 1
            elif audio_open:
                audio_open = _audio_packet(packet, audio_out, cut)
            if written == wanted and not audio_open:
                break
    finally:
        out.close()
    return written


def _encode(container, stream, audio, cut: _Cut, partial: Path, c, size, fps, out_fps, rotation) -> tuple[int, tuple]:
    """Decode the clip's frames and encode them from a fresh keyframe; returns (frames written, size)."""
    width, height = size
    if round(rotation / 90) % 2 == 1:
        width, height = height, width  # frames are turned upright before encoding
    out, audio_out = _open_output(partial, audio)
    try:
        rate = Fraction(out_fps).limit_denominator(1001)
        video_out = out.add_stream(c.codec, rate=rate, options={"crf": str(c.crf), "preset": c.preset})
        video_out.width, video_out.height, video_out.pix_fmt = width, height, c.pix_fmt
        video_out.codec_context.time_base = 1 / rate
        step = fps / out_fps  # source frames per output frame
        wanted = cut.count if c.fps is None else max(1, round(cut.count * out_fps / fps))
        seen, written, video_done, audio_open = 0, 0, False, audio is not None
        container.seek(cut.start_pts, stream=stream, backward=True, any_frame=False)
        # demux ends each stream with an empty packet whose decode() flushes the decoder.
        for packet in container.demux(*([stream] + ([audio] if audio is not None else []))):
            if packet.stream is not stream:
                if audio_open:
                    audio_open = _audio_packet(packet, audio_out, cut)
            elif not video_done:
                for frame in packet.decode():
                    if frame.pts is None or frame.pts < cut.start_pts:
                        continue
                    # Output frame j shows source frame floor(j * step): an exact count, no drift.
                    while written < wanted and int(written * step + 1e-6) == seen:
                        _encode_one(out, video_out, frame, written, width, height, c.pix_fmt, rotation)
                        written += 1
                    seen += 1
                    if seen >= cut.count or written >= wanted:
                        video_done = True
                        break
            if video_done and (not audio_open or _well_past(packet, stream, cut)):
                break
        for packet in video_out.encode(None):
            out.mux(packet)
    finally:
        out.close()
    return written, (width, height)


def _encode_one(out, video_out, frame, n: int, width: int, height: int, pix_fmt: str, rotation: int) -> None:
    import av

    if rotation:
        image = _upright(frame.to_ndarray(format="rgb24"), rotation)
        frame = av.VideoFrame.from_ndarray(image, format="rgb24")
    picture = frame.reformat(width=width, height=height, format=pix_fmt, interpolation="AREA")
    picture.pts, picture.time_base = n, video_out.codec_context.time_base
    for packet in video_out.encode(picture):
        out.mux(packet)
