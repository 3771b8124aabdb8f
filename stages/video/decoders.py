"""Which library decodes a video's frames (the `decoder` key), and TorchCodec's reader.

Every frame-reading stage takes `decoder: auto | pyav | torchcodec` through `DecoderKey`
and hands it to `stages.video.frames.sample_frames`, which plans the frame numbers once and
asks the chosen decoder for exactly those frames, so every decoder returns the same frame
indices; at the native size the pixels are identical (both use ffmpeg's yuv->rgb swscale
path). Resized frames differ by the resize filter: PyAV scales in YUV (AREA), TorchCodec's
`Resize` scales the RGB frame (bilinear, antialiased); a mean of ~1-4 grey levels on the
sharp-edged test patterns.

- `pyav`: the sampler in stages/video/frames.py: a Python demux pass for the index, then seeks
  or one straight decode, whichever decodes fewer frames, skipping unreferenced frames unread.
- `torchcodec`: TorchCodec's `VideoDecoder` in exact mode (its C++ scan gives the same
  pts-ordered frame numbers), `get_frames_at` for the batch, the resize done by the decoder.
  On a CUDA device (`cuda:N`) it decodes with NVDEC (TorchCodec's default CUDA backend) and
  resizes on the GPU; written against TorchCodec 0.17's API, never run here (no GPU). Where
  NVDEC fails (a codec or profile it lacks, a broken driver) the video is decoded again on the
  CPU, with a warning: the device's fault is not the record's, which fails only if the CPU
  cannot decode it either.
- `auto`: per video and device, by the rule in `choose` (measured by bench/decode.py): PyAV on
  the CPU, TorchCodec's NVDEC on a GPU.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field, field_validator

from stages.base import StageError

DecoderName = Literal["auto", "pyav", "torchcodec"]
INSTALL_HINT = "pip install 'reelflow[captioners]' (or pip install torchcodec)"


@functools.cache
def torchcodec_available() -> bool:
    """TorchCodec imports here (it also loads ffmpeg's shared libraries at import)."""
    try:
        import torchcodec.decoders  # noqa: F401
    except (ImportError, OSError, RuntimeError):
        return False
    return True


@functools.cache
def cuda_usable() -> bool:
    """A GPU with a driver is there: a worker named "cuda:N" is not proof (Ray hands out logical
    GPUs, a config may pin a device), and NVDEC on a machine without one fails every video."""
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


class DecoderKey(BaseModel):
    """The `decoder` key, mixed into every frame-reading stage's Config."""

    decoder: DecoderName = Field(
        "auto",
        description="Frame decoder: pyav, torchcodec (CPU, or NVDEC on a cuda device), or auto: what "
        "bench/decode.py measured fastest (PyAV on the CPU, TorchCodec on a GPU; stages/video/decoders.py).",
    )

    @field_validator("decoder")
    @classmethod
    def _installed(cls, value: str) -> str:
        if value == "torchcodec" and not torchcodec_available():
            raise ValueError(f"decoder: torchcodec needs the torchcodec package, which does not import; {INSTALL_HINT}")
        return value


@dataclass(frozen=True)
class Facts:
    """What the container header says, before any frame is decoded."""

    width: int  # upright
    height: int
    frames: int  # the header's count (0 when it has none)


# `auto`, from bench/decode.py (2-core CPU shared with other work, load ~9; libx264 yuv420p,
# 30 fps, 5 s, keyframes every 15 or 250 frames, 8 and 32 uniform frames; bench/RESULTS.md).
# Before PyAV's sampler skipped unreferenced frames, TorchCodec cost what PyAV cost at the
# native size (CPU time 0.96-1.06x PyAV's at 360p, 720p and 1080p: the same libavcodec and
# swscale work) and 1.06-1.23x when scaling to 448 px (its Resize scales the full RGB frame;
# PyAV scales the YUV planes inside the one conversion). With the skip (frames.py `_decoded`),
# TorchCodec costs 1.22-1.76x PyAV's CPU time native and 1.29-1.86x scaled, in every one of
# the 12 cases; frame count and keyframe density moved the ratio inside that band, never
# below 1. So on the CPU `auto` keeps PyAV at every size; on a CUDA device it takes
# TorchCodec's NVDEC decoder, which moves decoding off the CPU that starves the GPU (not
# measured: no GPU here). AUTO_MIN_PIXELS is the frame size from which TorchCodec would win
# on the CPU: none measured, so none (a setting for a machine where bench/decode.py differs).
AUTO_MIN_PIXELS: int | None = None


def choose(choice: DecoderName, facts: Facts, device: str = "cpu") -> tuple[str, str]:
    """(decoder, device to decode on) for one video."""
    if choice == "pyav":
        return "pyav", "cpu"
    # A worker named cuda:N where torch sees no GPU decodes on the CPU, also with decoder:
    # torchcodec: NVDEC there fails every video, a fault of the machine, not of the records.
    gpu = device if device.startswith("cuda") and cuda_usable() else "cpu"
    if choice == "torchcodec":
        return "torchcodec", gpu
    if not torchcodec_available():
        return "pyav", "cpu"
    if gpu != "cpu":
        return "torchcodec", gpu
    if AUTO_MIN_PIXELS is not None and facts.width * facts.height >= AUTO_MIN_PIXELS:
        return "torchcodec", "cpu"
    return "pyav", "cpu"


# Maps the upright frame size (width, height) to the size to decode at (width, height); None: as is.
OutSize = Callable[[int, int], "tuple[int, int] | None"]


class TorchCodecVideo:
    """One opened video: exact frame count and frame rate from TorchCodec's scan, frames by number."""

    def __init__(self, path: str, out_size: OutSize, device: str, name: str, threads: int = 0):
        from torchcodec.decoders import VideoDecoder

        self.path, self.name, self.device, self.threads = path, name, device, threads
        try:
            header = VideoDecoder(path, seek_mode="approximate", device="cpu").metadata
            self.size = out_size(int(header.width), int(header.height))  # TorchCodec's sizes are upright
            try:
                self.decoder = self._open(device)
            except (RuntimeError, ValueError) as exc:
                if device == "cpu":
                    raise
                self._decode_on_the_cpu(exc)
        except (RuntimeError, ValueError) as exc:
            raise self._undecodable(exc) from None
        meta = self.decoder.metadata
        self.num_frames = int(meta.num_frames or 0)
        self.fps = float(meta.average_fps or 0) or 25.0
        self.begin_s = float(meta.begin_stream_seconds or 0.0)

    def _open(self, device: str):
        from torchcodec.decoders import VideoDecoder
        from torchcodec.transforms import Resize

        # On CUDA, TorchCodec 0.17 applies no decoder transforms: resize after decoding (`read`).
        transforms = [Resize((self.size[1], self.size[0]))] if self.size and device == "cpu" else None
        return VideoDecoder(
            self.path, seek_mode="exact", device=device, num_ffmpeg_threads=self.threads, transforms=transforms
        )

    def _decode_on_the_cpu(self, failure: Exception) -> None:
        """NVDEC failed: the CPU decoder decides whether the file is at fault."""
        # One message per device and kind of failure, so Python shows it once, not once per video.
        warnings.warn(
            f"TorchCodec could not decode on {self.device} ({type(failure).__name__}); decoding on the CPU "
            "instead, which takes CPU time the model may wait for (check the GPU's driver and NVDEC support "
            "for these videos' codec, or set decoder: pyav)",
            RuntimeWarning,
            stacklevel=2,
        )
        self.device = "cpu"
        self.decoder = self._open("cpu")

    def _undecodable(self, exc: Exception) -> StageError:
        return StageError(
            f"{self.name} could not be decoded by TorchCodec ({exc}); the file is corrupt or truncated",
            error_type="VideoDecodeError",
        )

    def read(self, indices: list[int]) -> tuple[np.ndarray, list[float]]:
        """Frames (T x H x W x 3 uint8 RGB, upright) at these frame numbers, and their times (s from the start)."""
        try:
            try:
                batch = self.decoder.get_frames_at(indices)
            except (RuntimeError, ValueError, IndexError) as exc:
                if self.device == "cpu":
                    raise
                self._decode_on_the_cpu(exc)
                batch = self.decoder.get_frames_at(indices)
        except (RuntimeError, ValueError, IndexError) as exc:
            raise self._undecodable(exc) from None
        data = batch.data  # N x C x H x W
        if self.device != "cpu" and self.size:
            import torch.nn.functional as F

            data = F.interpolate(data.float(), size=(self.size[1], self.size[0]), mode="bilinear", antialias=True)
            data = data.round().clamp(0, 255).to(dtype=batch.data.dtype)
        frames = np.ascontiguousarray(data.permute(0, 2, 3, 1).cpu().numpy())
        times = [round(float(t) - self.begin_s, 4) for t in batch.pts_seconds]
        return frames, times
