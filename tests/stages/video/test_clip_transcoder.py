"""ClipTranscoder on real encoded videos: exact frames, keyframe first, stream copy when the clip
sits on keyframes, audio kept or dropped, atomic files under kill -9, and a one-shot run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import textwrap
import time

import numpy as np
import pytest

from stages.base import media_path
from stages.video.clip_transcoder import ClipTranscoder
from stages.video.frames import probe, sample_frames
from tests.harness import PYTHON, REPO, read_jsonl, run_oneshot, write_config
from tests.stages.clip_media import child, clip, decoded_levels, numbered, pan

pytestmark = pytest.mark.timeout(180)

FPS = 12


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    # Keyframes every 12 frames (0, 12, 24, ...), 5 s of audio: clips on and off keyframes.
    return numbered(tmp_path_factory.mktemp("transcode") / "numbered.mp4", frames=60, fps=FPS, gop=12, audio_seconds=5)


def transcode(record, **config):
    stage = ClipTranscoder(ClipTranscoder.Config(**config))
    (out,) = stage.process([record])
    return out, stage.take_usage()


def first_packet_is_key(path) -> bool:
    import av

    with av.open(str(path)) as container:
        packet = next(p for p in container.demux(video=0) if p.size)
        return packet.is_keyframe


def frame_numbers(path) -> list[int]:
    return [round(level / 4) for level in decoded_levels(path)]


def test_a_clip_off_keyframes_is_encoded_with_exactly_its_frames(source, tmp_path):
    out, used = transcode(child(source, tmp_path, clip(1, start_frame=17, num_frames=20, fps=FPS)))
    assert out["transcode"]["method"] == "encode" and used["clips_encode"] == 1
    # media_path's name for id v:0000: a readable stem plus a hash of the exact id (':' is not kept)
    assert out["video"] == media_path({"id": "v:0000", "_job": "j", "_media_dir": tmp_path}, "mp4")
    assert out["video"].name.startswith("v_0000") and out["video"].is_file()
    assert out["source_video"] == source and out["clip_file"] is True
    assert frame_numbers(out["video"]) == list(range(17, 37))
    info = probe(out["video"])
    assert (info.codec, info.pix_fmt, info.num_frames, info.fps) == ("h264", "yuv420p", 20, 12.0)
    assert info.has_audio and abs(info.duration_s - 20 / FPS) < 0.1
    assert first_packet_is_key(out["video"])
    assert not list(tmp_path.glob("*.part"))


def test_a_clip_on_keyframes_is_cut_by_stream_copy(source, tmp_path):
    out, used = transcode(child(source, tmp_path, clip(0, start_frame=12, num_frames=24, fps=FPS)))
    assert out["transcode"]["method"] == "copy" and used["clips_copy"] == 1
    assert frame_numbers(out["video"]) == list(range(12, 36))
    assert first_packet_is_key(out["video"]) and probe(out["video"]).has_audio
    # The same clip with copying off is encoded, to the same frames.
    again, _ = transcode(child(source, tmp_path, clip(0, 12, 24, FPS), rid="v:0001"), copy_when_possible=False)
    assert again["transcode"]["method"] == "encode" and frame_numbers(again["video"]) == list(range(12, 36))


def test_resize_fps_and_dropping_audio(source, tmp_path):
    out, _ = transcode(
        child(source, tmp_path, clip(1, 17, 20, FPS)), max_short_side=32, fps=6, keep_audio=False, crf=30
    )
    info = probe(out["video"])
    assert (info.width, info.height, info.fps, info.num_frames) == (48, 32, 6.0, 10)
    assert not info.has_audio and out["transcode"]["method"] == "encode"
    assert frame_numbers(out["video"]) == list(range(17, 37, 2))  # every other source frame, no drift


def test_a_record_without_clip_is_the_whole_video(source, tmp_path):
    out, _ = transcode(child(source, tmp_path, None, rid="whole"), copy_when_possible=False)
    assert frame_numbers(out["video"]) == list(range(60))
    assert out["video"].name == "whole.mp4"


def test_bad_inputs_are_record_errors(source, tmp_path):
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(os.urandom(20_000))
    records = [
        child(garbage, tmp_path, None, rid="g"),
        child(source, tmp_path, clip(0, 50, 30, FPS), rid="outside"),
        {"id": "novideo", "_job": "test", "_media_dir": tmp_path},
        child(source, tmp_path, clip(1, 0, 12, FPS), rid="good"),
    ]
    results = ClipTranscoder(ClipTranscoder.Config()).process(records)
    assert [type(r).__name__ for r in results] == ["StageError", "StageError", "StageError", "dict"]
    assert results[0].error_type == "VideoDecodeError" and "garbage.mp4" in results[0].message
    assert results[1].error_type == "BadClip" and "60 frames" in results[1].message
    assert results[2].error_type == "MissingField"
    assert not (tmp_path / "g.mp4").exists() and not list(tmp_path.glob("*.part"))


def test_kill_9_mid_write_leaves_no_file_under_the_final_name(tmp_path):
    big = pan(tmp_path / "pan.mp4", frames=900, size=(320, 240), step=2)
    media = tmp_path / "media"
    script = textwrap.dedent(
        f"""
        from pathlib import Path
        from stages.video.clip_transcoder import ClipTranscoder
        stage = ClipTranscoder(ClipTranscoder.Config(preset="veryslow", crf=10, copy_when_possible=False))
        record = {{"id": "p:0000", "_job": "t", "_media_dir": Path({str(media)!r}), "video": Path({str(big)!r})}}
        print(stage.process([record]))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    worker = subprocess.Popen([PYTHON, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    final = media_path({"id": "p:0000", "_job": "j", "_media_dir": media}, "mp4")
    partial = final.with_name(final.name + ".part")
    try:
        # Wait (no deadline but the test timeout) until encoded data is being written, then kill.
        while worker.poll() is None and not partial.exists():
            time.sleep(0.02)  # poll, not spin: the worker needs the CPU
        assert worker.poll() is None, worker.communicate()
        os.kill(worker.pid, signal.SIGKILL)
    finally:
        worker.wait()
    assert worker.returncode == -signal.SIGKILL
    assert partial.exists() and not final.exists()
    # The rerun (as a restart would) replaces the half file and completes.
    stage = ClipTranscoder(ClipTranscoder.Config(preset="ultrafast", copy_when_possible=False))
    (out,) = stage.process([{"id": "p:0000", "_job": "t", "_media_dir": media, "video": big}])
    assert out["video"] == final and probe(final).num_frames == 900 and not partial.exists()


def test_oneshot_run_writes_clip_files(source, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rows = [
        {"id": "a", "video": source.name, "clip": clip(0, 0, 12, FPS)},
        {"id": "b", "video": source.name, "clip": clip(1, 17, 20, FPS)},
        {"id": "c", "video": "missing.mp4"},
    ]
    (data / "meta.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = write_config(
        tmp_path,
        {
            "meta_path": "data/meta.jsonl",
            "meta_folder": str(source.parent),
            "base_folder": "work",
            "save_folder": "out",
            "steps": [
                {"type": "VideoProcessor", "name": "ClipTranscoder", "config": {"preset": "ultrafast"}},
                {"type": "VideoProcessor", "name": "FrameSampler", "config": {"fps": 12}},
            ],
        },
    )
    result = run_oneshot(config)
    assert result.returncode == 0, result.stderr
    results = {r["id"]: r for r in read_jsonl(tmp_path / "out" / "meta.jsonl")}
    assert set(results) == {"a", "b"}, result.stdout
    errors = read_jsonl(tmp_path / "out" / "meta.errors.jsonl")
    assert [e["id"] for e in errors] == ["c"]
    for rid, frames in (("a", range(0, 12)), ("b", range(17, 37))):
        clip_file = (tmp_path / "out" / results[rid]["video"]).resolve()
        assert clip_file.is_file() and clip_file.parent.name == "media", clip_file
        assert frame_numbers(clip_file) == list(frames)
        # FrameSampler read the clip file whole (clip_file: true), not the window again.
        assert results[rid]["frame_indices"] == list(range(len(frames)))
        assert results[rid]["source_video"].endswith("numbered.mp4")


def test_config_refuses_unknown_keys_and_bad_values():
    with pytest.raises(ValueError, match="bitrate"):
        ClipTranscoder.Config(crf=20, bitrate="2M")
    with pytest.raises(ValueError, match="crf"):
        ClipTranscoder.Config(crf=60)


def test_a_rotated_source_is_written_upright(videos, tmp_path):
    if "rotated" not in videos:
        pytest.skip("ffmpeg not on PATH: no rotated test video")
    source = videos["rotated"]  # 96x64 coded, shown turned by 90 degrees
    out, _ = transcode(child(source, tmp_path, None, rid="turned"), crf=0, preset="ultrafast")
    info = probe(out["video"])
    assert out["transcode"]["method"] == "encode"  # copying would drop the display rotation
    assert (info.width, info.height, info.rotation, info.num_frames) == (64, 96, 0, probe(source).num_frames)
    shown = sample_frames(source, num_frames=3)
    written = sample_frames(out["video"], num_frames=3)
    assert written.frames.shape == shown.frames.shape
    assert np.abs(written.frames.astype(int) - shown.frames.astype(int)).mean() < 6


def test_a_batch_of_clips_of_one_source_shares_one_opening(source, tmp_path):
    # Out of order, overlapping, on and off keyframes: each clip gets exactly its own frames.
    windows = [(36, 24), (0, 12), (5, 30), (12, 24)]
    records = [child(source, tmp_path, clip(k, s, n, FPS), rid=f"v:{k:04d}") for k, (s, n) in enumerate(windows)]
    results = ClipTranscoder(ClipTranscoder.Config()).process(records)
    for (start, count), out in zip(windows, results, strict=True):
        assert frame_numbers(out["video"]) == list(range(start, start + count)), out
    assert [r["transcode"]["method"] for r in results] == ["copy", "copy", "encode", "copy"]


def test_a_matroska_source_with_b_frames_is_encoded_when_its_packets_cannot_be_copied(tmp_path):
    """Matroska keeps no DTS for a B-frame stream's first packets; copying them into mp4 with DTS
    taken from PTS runs backwards and the muxer refuses ("Invalid argument"): the clip must come
    out anyway, encoded, with exactly its frames (the README's curation run hit this on bars.mkv)."""
    source = numbered(tmp_path / "numbered.mkv", frames=24, fps=FPS)
    out, used = transcode(child(source, tmp_path, clip(0, start_frame=0, num_frames=24, fps=FPS)))
    assert not isinstance(out, Exception), out
    assert used["copy_fallbacks"] == 1 and out["transcode"]["method"] == "encode"
    assert frame_numbers(out["video"]) == list(range(24))
    assert first_packet_is_key(out["video"])
