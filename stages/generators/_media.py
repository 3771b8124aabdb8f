"""Writing generated media: h264 (yuv420p, even sides) mp4 with PyAV at a given fps, PNG with Pillow.

Files are written under a temporary dot-name and renamed into place, so a crash never leaves a
half-written file under the name a result line points to.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from stages.base import HASH_MARK, MEDIA_DIR, StageError, media_path, safe_file_stem


def to_uint8(array):
    """Float frames in [0, 1] (diffusers' `output_type="np"`) -> uint8, rounded as diffusers does."""
    import numpy as np

    # C order: some pipelines return transposed views, and PyAV's from_ndarray reads a strided
    # array as if it were contiguous (garbage frames, different on every run).
    return np.ascontiguousarray((np.clip(array, 0.0, 1.0) * 255).round(), dtype=np.uint8)


def output_paths(
    record: dict[str, Any], extension: str, template: str | None, count: int, tag: str | None = None
) -> list[Path]:
    """The record's file, or with several outputs one file per output index: `<stem>~<index>`.

    The index goes after `~`, which no plain stem holds (see stages.base.safe_file_stem): so
    `a`'s second output (`a~1`) can never be the file of a record whose id is `a_1` or `a~1`
    (the latter's stem is hashed). A hashed stem (`cam_1~<16 hex>`) stays apart too: one `~`
    and 16 hex digits is no `<plain>~<index>` (an index that long would take 10^15 outputs),
    and `<hashed>~<index>` has two `~`. Two (id, index) pairs share a file only on a hash collision.
    """
    if MEDIA_DIR not in record:
        raise StageError("the record has no media folder (_media_dir); the runtime sets it", error_type="NoMediaDir")
    base = media_path(record, extension, template)
    if tag:
        base = base.with_name(f"{base.stem}{HASH_MARK}{safe_file_stem(tag)}{base.suffix}")
    if count == 1:
        return [base]
    return [base.with_name(f"{base.stem}{HASH_MARK}{index}{base.suffix}") for index in range(count)]


def _even(frames):
    """yuv420p needs even sides: repeat the last row/column where a side is odd."""
    import numpy as np

    height, width = frames.shape[1:3]
    pad = ((0, 0), (0, height % 2), (0, width % 2), (0, 0))
    return np.pad(frames, pad, mode="edge") if height % 2 or width % 2 else frames


def write_video(frames, path: Path, fps: float, crf: int = 18) -> Path:
    """T x H x W x 3 uint8 RGB -> h264 (yuv420p) mp4 at `fps`; written to a temp name, then renamed."""
    from fractions import Fraction

    import av
    import numpy as np

    frames = _even(frames)
    temp = path.with_name(f".{path.name}.part")
    with av.open(str(temp), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        # mbtree off: with it, x264's lookahead gave different bytes for the same frames from one
        # call to the next inside a process that had just run a model (measured here); without it
        # the same frames always encode to the same file.
        stream.options = {"crf": str(crf), "x264-params": "mbtree=0"}
        for image in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    os.replace(temp, path)
    return path


def write_png(image, path: Path) -> Path:
    from PIL import Image

    temp = path.with_name(f".{path.name}.part")
    Image.fromarray(image).save(temp, format="PNG")
    os.replace(temp, path)
    return path


def fit_image(image, width: int, height: int):
    """Scale and centre-crop to width x height, so the pipeline's own resize does not stretch it."""
    from PIL import Image, ImageOps

    if image.size == (width, height):
        return image
    return ImageOps.fit(image, (width, height), method=Image.Resampling.LANCZOS)
