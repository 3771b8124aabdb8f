"""The `decoder` key: PyAV and TorchCodec return the same frames, and every frame-reading stage takes the key.

Same frames means the same frame numbers, times, window and frame rate, and at the native size
the same pixels (both convert with ffmpeg's swscale). Resized frames go through different
filters (PyAV scales the YUV planes with AREA, TorchCodec's Resize the RGB frame, bilinear), so
there the pixels only agree on average. Videos are encoded by the tests (tests/media.py, ffmpeg).
"""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

from daemon.config import ConfigError, parse_config
from stages.base import MEDIA_DIR, RECORD_ID, StageError
from stages.registry import stage_class
from stages.video.decoders import Facts, choose, torchcodec_available
from stages.video.frames import ClipWindow, probe, sample_frames

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(not torchcodec_available(), reason="torchcodec is not installed (pip install torchcodec)"),
]

PATTERNS = {
    "8 uniform": dict(num_frames=8),
    "32 uniform": dict(num_frames=32),
    "2 fps": dict(fps=2.0),
    "at": dict(at=[0, 1, 5, 6, 11]),
    "clip in frames": dict(num_frames=4, window=ClipWindow(0.2, 0.8, 2, 6)),
    "clip in seconds": dict(num_frames=4, window=ClipWindow(0.2, 0.8)),
}


def ffmpeg_clip(path, size: str, gop: int, seconds: float = 3.0, bframes: int = 2):
    """testsrc2 with moving noise, x264 with B-frames (pts order differs from decode order)."""
    subprocess.run(
        [
            "ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", f"testsrc2=size={size}:rate=24,noise=alls=8:allf=t",
            "-t", str(seconds), "-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p", "-bf", str(bframes),
            "-g", str(gop), "-keyint_min", str(gop), "-sc_threshold", "0", str(path),
        ],
        check=True,
    )  # fmt: skip
    return path


@pytest.fixture(scope="module")
def clips(tmp_path_factory, videos):
    folder = tmp_path_factory.mktemp("decoders")
    made = {
        "360p dense": ffmpeg_clip(folder / "dense.mp4", "640x360", gop=6),
        "360p sparse": ffmpeg_clip(folder / "sparse.mp4", "640x360", gop=250),
    }
    keep = ("bunny", "bikes", "h264", "sparse_gop", "vp9_webm", "mpeg4_avi", "mkv", "rotated")
    return {**made, **{name: videos[name] for name in keep}}


def both(path, **kwargs):
    return sample_frames(path, decoder="pyav", **kwargs), sample_frames(path, decoder="torchcodec", **kwargs)


def assert_same_frames(a, b):
    assert b.indices == a.indices
    assert b.timestamps_s == pytest.approx(a.timestamps_s, abs=1e-3)
    assert (b.fps, b.total_frames, b.first_frame) == (a.fps, a.total_frames, a.first_frame)
    assert b.frames.shape == a.frames.shape and b.frames.dtype == np.uint8


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
@pytest.mark.parametrize(
    "name",
    ["360p dense", "360p sparse", "bunny", "bikes", "h264", "sparse_gop", "vp9_webm", "mpeg4_avi", "mkv", "rotated"],
)
def test_same_frames_at_the_native_size(clips, name, pattern):
    a, b = both(clips[name], **PATTERNS[pattern])
    assert_same_frames(a, b)
    difference = np.abs(a.frames.astype(np.int16) - b.frames.astype(np.int16))
    assert difference.mean() < 0.05 and difference.max() <= 2, (difference.mean(), difference.max())


@pytest.mark.parametrize("name", ["360p dense", "bikes", "rotated"])
@pytest.mark.parametrize("resize", ["max_side", "size rule"])
def test_resized_frames_agree_within_the_resize_filter(clips, name, resize):
    kwargs = dict(max_side=200) if resize == "max_side" else dict(size=lambda w, h: (w // 3, h // 3))
    a, b = both(clips[name], num_frames=6, **kwargs)
    assert_same_frames(a, b)
    # AREA on YUV vs bilinear on RGB: equal on flat areas, apart by a few levels at edges.
    assert np.abs(a.frames.astype(np.int16) - b.frames.astype(np.int16)).mean() < 5.0


def test_rotated_frames_come_out_upright_with_both(clips):
    a, b = both(clips["rotated"], num_frames=2, max_side=48)
    assert a.frames.shape[1:3] == b.frames.shape[1:3] == (48, 32)  # 96x64 coded, turned a quarter


def test_probe_reads_the_same_facts_with_both(clips):
    for name in ("360p sparse", "bikes", "rotated", "vp9_webm"):
        for window in (None, ClipWindow(0.5, 1.0, 6, 6), ClipWindow(0.5, 1.0)):
            assert probe(clips[name], window, decoder="torchcodec") == probe(clips[name], window)


@pytest.fixture(scope="module")
def broken(tmp_path_factory, videos):
    """tests/media.py's broken files, plus an mp4 cut right after its index and one zeroed in the middle."""
    folder = tmp_path_factory.mktemp("broken")
    whole = ffmpeg_clip(folder / "whole.mp4", "160x96", gop=12, seconds=2)
    faststart = folder / "faststart.mp4"
    subprocess.run(
        ["ffmpeg", "-v", "error", "-i", whole, "-c", "copy", "-movflags", "faststart", faststart], check=True
    )
    data = bytearray(faststart.read_bytes())
    (folder / "header_only.mp4").write_bytes(data[: len(data) // 50])  # the index survives, the frames do not
    third = len(data) // 3
    data[third : 2 * third] = bytes(third)
    (folder / "zeroed_middle.mp4").write_bytes(bytes(data))
    made = {name: folder / f"{name}.mp4" for name in ("header_only", "zeroed_middle")}
    return {**{name: videos[name] for name in ("truncated", "empty", "garbage", "audio_only")}, **made}


@pytest.mark.parametrize("name", ["truncated", "empty", "garbage", "audio_only", "header_only", "zeroed_middle"])
def test_broken_files_fail_the_same_way(broken, name):
    kinds = []
    for decoder in ("pyav", "torchcodec"):
        with pytest.raises(StageError) as failed:
            sample_frames(broken[name], num_frames=4, decoder=decoder)
        kinds.append(failed.value.error_type)
    assert kinds[0] == kinds[1] and kinds[0] in {"VideoDecodeError", "NoVideoStream", "EmptyVideo"}, kinds


def test_auto_follows_the_measured_rule(monkeypatch):
    from stages.video import decoders

    small, large = Facts(320, 176, 300), Facts(1920, 1080, 300)
    assert decoders.AUTO_MIN_PIXELS is None  # bench/decode.py: TorchCodec won no CPU case
    assert choose("auto", small) == choose("auto", large) == ("pyav", "cpu")
    if not decoders.cuda_usable():
        # A "cuda:N" worker without a driver (Ray's logical GPUs, as tests/daemon/hosts/ray use):
        # NVDEC would fail every video, so auto stays on PyAV.
        assert choose("auto", small, "cuda:1") == ("pyav", "cpu")
        assert choose("torchcodec", small, "cuda:1") == ("torchcodec", "cpu")  # asked for, but no GPU to use
    monkeypatch.setattr(decoders, "cuda_usable", lambda: True)  # the rule on a machine with a GPU
    assert choose("auto", small, "cuda:1") == ("torchcodec", "cuda:1")  # NVDEC: decoding leaves the CPU
    assert choose("pyav", large, "cuda:0") == ("pyav", "cpu")
    assert choose("torchcodec", small) == ("torchcodec", "cpu")
    assert choose("torchcodec", small, "cuda:0") == ("torchcodec", "cuda:0")


@pytest.fixture
def failing_gpu_decoder(monkeypatch):
    """A machine that claims a GPU whose decoder fails: here torch has no driver, so TorchCodec's
    CUDA decoder fails for real ("Found no NVIDIA driver"), as NVDEC does on a GPU without it."""
    from stages.video import decoders

    if decoders.cuda_usable():
        pytest.skip("this machine's GPU decodes: the fault cannot be made here")
    monkeypatch.setattr(decoders, "cuda_usable", lambda: True)


@pytest.mark.parametrize("resize", [None, 160], ids=["native", "resized"])
def test_a_gpu_decoder_that_fails_decodes_on_the_cpu_instead_of_failing_the_record(clips, failing_gpu_decoder, resize):
    on_cpu = sample_frames(clips["360p dense"], num_frames=8, decoder="torchcodec", max_side=resize)
    with pytest.warns(RuntimeWarning, match=r"could not decode on cuda:0 .*decoding on the CPU instead"):
        fell_back = sample_frames(
            clips["360p dense"], num_frames=8, decoder="torchcodec", max_side=resize, device="cuda:0"
        )
    assert_same_frames(on_cpu, fell_back)
    assert np.array_equal(on_cpu.frames, fell_back.frames)


def test_a_broken_file_still_fails_as_the_records_when_the_gpu_decoder_fails_too(broken, failing_gpu_decoder):
    with pytest.warns(RuntimeWarning, match="decoding on the CPU instead"), pytest.raises(StageError) as failed:
        sample_frames(broken["zeroed_middle"], num_frames=4, decoder="torchcodec", device="cuda:0")
    assert failed.value.error_type == "VideoDecodeError" and "zeroed" in str(failed.value), failed.value


def test_shot_splitter_on_a_failing_gpu_decoder_finds_the_cpu_cuts(tmp_path, failing_gpu_decoder):
    from stages.video.shot_splitter import ShotSplitterConfig, detect_cuts
    from tests.stages.video.test_shot_splitter import shots_video

    video = shots_video(tmp_path / "cuts.mp4", [30, 45, 36])
    config = ShotSplitterConfig(decoder="torchcodec")
    with pytest.warns(RuntimeWarning, match="decoding on the CPU instead"):
        cuts, frames, _ = detect_cuts(video, config, device="cuda:0")
    assert (cuts, frames) == ([30, 75], 111)


FRAME_READERS = [
    ("VideoProcessor", "FrameSampler", {}),
    ("VideoProcessor", "VideoProbe", {}),
    ("VideoFilter", "MotionFilter", {}),
    ("VideoProcessor", "ShotSplitter", {}),
    ("VideoCaptioner", "Qwen2VLCaptioner", {"model_path": "Qwen/Qwen2-VL-2B-Instruct"}),
    ("VideoCaptioner", "LLaVANeXTVideoCaptioner", {"model_path": "llava-hf/LLaVA-NeXT-Video-7B-hf"}),
    ("VideoCaptioner", "LLaVAOVCaptioner", {"model_path": "llava-hf/llava-onevision-qwen2-0.5b-ov-hf"}),
]


@pytest.mark.parametrize(("kind", "name", "settings"), FRAME_READERS, ids=[n for _, n, _ in FRAME_READERS])
def test_every_frame_reading_stage_takes_the_decoder_key(kind, name, settings):
    config = stage_class(kind, name).Config
    assert config(**settings).decoder == "auto"
    for value in ("pyav", "torchcodec"):
        assert config(**settings, decoder=value).decoder == value
    step = {"type": kind, "name": name, "config": {**settings, "decoder": "ffmpeg"}}
    with pytest.raises(ConfigError) as refused:
        parse_config(f"steps: [{step}]".replace("'", '"'))
    message = str(refused.value)
    assert "decoder" in message and "ffmpeg" in message and "torchcodec" in message, message


def test_torchcodec_that_does_not_import_is_refused_at_check_with_the_install_line(tmp_path):
    # A real import failure in a fresh interpreter (the module is blocked before anything imports it).
    script = (
        "import sys; sys.modules['torchcodec'] = None\n"
        "from daemon.config import ConfigError, parse_config\n"
        "try:\n"
        "    parse_config('steps: [{type: VideoProcessor, name: FrameSampler, config: {decoder: torchcodec}}]')\n"
        "except ConfigError as error:\n"
        "    print(error)\n"
        "print(parse_config('steps: [{type: VideoProcessor, name: FrameSampler, config: {}}]').steps[0].config.decoder)\n"
    )
    import sys

    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert "decoder" in out and "pip install 'reelflow[captioners]'" in out, out
    assert out.strip().endswith("auto"), out  # auto still loads: it falls back to PyAV


def test_frame_sampler_writes_the_same_frames_with_either_decoder(clips, tmp_path):
    cls = stage_class("VideoProcessor", "FrameSampler")
    got = {}
    for decoder in ("pyav", "torchcodec"):
        stage = cls(cls.Config(num_frames=5, decoder=decoder), "cpu")
        record = {"video": str(clips["360p sparse"]), RECORD_ID: decoder, MEDIA_DIR: str(tmp_path)}
        got[decoder] = stage.process([stage.prepare(record)])[0]
    assert got["pyav"]["frame_indices"] == got["torchcodec"]["frame_indices"]
    assert [p.name for p in got["pyav"]["frames"]] == [p.name for p in got["torchcodec"]["frames"]]


def test_motion_filter_scores_alike_with_either_decoder(clips):
    cls = stage_class("VideoFilter", "MotionFilter")
    scores = []
    for decoder in ("pyav", "torchcodec"):
        stage = cls(cls.Config(method="diff", pairs=4, decoder=decoder), "cpu")
        stage.load()
        scores.append(stage.score({"video": str(clips["360p dense"])}))
    # Frames are decoded small (analysis_short_side): the two resize filters move the score a little.
    assert scores[0] > 1.0 and scores[1] == pytest.approx(scores[0], rel=0.1), scores


def test_shot_splitter_finds_the_same_cuts_with_either_decoder(tmp_path):
    from tests.stages.video.test_shot_splitter import shots_video, split

    video = shots_video(tmp_path / "cuts.mp4", [30, 45, 36])
    clips = {
        decoder: [c["clip"]["start_frame"] for c in split(video, min_clip_s=0.5, decoder=decoder)]
        for decoder in ("pyav", "torchcodec")
    }
    assert clips["pyav"] == clips["torchcodec"] == [0, 30, 75], clips


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda(), reason="needs a CUDA GPU")
def test_torchcodec_cuda_returns_the_cpu_frames(clips):
    cpu = sample_frames(clips["360p dense"], num_frames=8, decoder="torchcodec")
    gpu = sample_frames(clips["360p dense"], num_frames=8, decoder="torchcodec", device="cuda:0")
    assert_same_frames(cpu, gpu)
    # NVDEC's own yuv->rgb conversion: close, not bit-identical.
    assert np.abs(cpu.frames.astype(np.int16) - gpu.frames.astype(np.int16)).mean() < 2.0
