"""The frame budget: automatic frame counts that fit max_model_len, refusals at validation,
and clips too long for the context."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from stages.base import StageError
from stages.captioners.common import PREPARED
from stages.registry import stage_class
from tests.stages.captioners.conftest import FAMILIES, TINY_CONFIG, record

# What one frame (group) of the tiny models costs: 112 px frames (LLaVA-NeXT-Video 224), 14 px patches.
TINY_COST = {
    "qwen2_vl": (16, 2, 0),  # (112 / 28)^2 tokens per frame pair
    "qwen2_5_vl": (16, 2, 0),
    "llava_next_video": (64, 1, 0),  # (224 / 14)^2 / 4 per frame
    "llava_onevision": (16, 1, 1),  # ceil(8 / 2)^2 per frame + 1 newline per video
}


def config_for(family: str, tiny_models, **settings):
    cls = stage_class("VideoCaptioner", FAMILIES[family])
    return cls.Config(**{**TINY_CONFIG, "model_path": str(tiny_models[family]), **settings})


def video_frames(prepared: dict) -> int:
    if "video_grid_thw" in prepared:
        return int(prepared["video_grid_thw"][0, 0]) * 2
    return int(prepared["pixel_values_videos"].shape[1])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_costs_read_from_the_checkpoint_before_loading(family, tiny_models):
    cost = config_for(family, tiny_models).video_cost()
    assert (cost.per_group, cost.group, cost.fixed) == TINY_COST[family]


@pytest.mark.parametrize(
    ("name", "per_frame_group"),
    [("Qwen2VLCaptioner", (144, 2)), ("LLaVANeXTVideoCaptioner", (144, 1)), ("LLaVAOVCaptioner", (196, 1))],
)
def test_seed_config_fits_every_captioner_with_hub_defaults(name, per_frame_group):
    """The seed's `max_model_len: 2048` validates for a hub id (released checkpoints' sizes)."""
    cls = stage_class("VideoCaptioner", name)
    config = cls.Config(model_path="org/not-downloaded", max_model_len=2048, max_num_seqs=8, temperature=0.1)
    cost = config.video_cost()
    assert (cost.per_group, cost.group) == per_frame_group
    room = 2048 - config.max_new_tokens - 40 - len(config.prompt) // 3
    assert cost.frames_within(room, 32) >= 8


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("max_model_len", [200, 640])
def test_automatic_frame_count_fills_the_context(family, max_model_len, make_captioner, clips):
    stage = make_captioner(family, max_model_len=max_model_len)
    prepared = stage.prepare(record(clips["bikes"]))[PREPARED]
    frames = video_frames(prepared)
    prompt_tokens = int(prepared["input_ids"].shape[1])
    per_group, group, _ = TINY_COST[family]

    assert prompt_tokens + stage.config.max_new_tokens <= max_model_len
    assert frames % group == 0 and frames <= stage.config.max_frames
    if "video_grid_thw" in prepared:
        # Qwen budgets each pair at its largest shape (max_pixels); bikes' 640x272 costs less.
        t, h, w = prepared["video_grid_thw"][0].tolist()
        assert t * h * w // 4 <= t * per_group
        prompt_tokens += t * per_group - t * h * w // 4
    if frames < stage.config.max_frames:
        # One more group of frames would not have fitted.
        assert prompt_tokens + per_group + stage.config.max_new_tokens > max_model_len
    assert frames >= group


def test_automatic_count_is_capped_at_max_frames(make_captioner, clips):
    stage = make_captioner("llava_next_video", max_model_len=4096, max_frames=32)
    assert video_frames(stage.prepare(record(clips["bikes"]))[PREPARED]) == 32
    stage = make_captioner("llava_next_video", max_model_len=4096, max_frames=6)
    assert video_frames(stage.prepare(record(clips["bikes"]))[PREPARED]) == 6


@pytest.mark.parametrize("family", list(FAMILIES))
def test_num_frames_that_cannot_fit_is_refused_with_the_number_that_would(family, tiny_models):
    with pytest.raises(ValidationError) as caught:
        config_for(family, tiny_models, max_model_len=300, num_frames=40)
    message = str(caught.value)
    assert "num_frames=40 does not fit" in message and "max_model_len=300" in message
    most = int(message.split("at most ")[1].split(" frames fit")[0])
    assert most > 0
    config_for(family, tiny_models, max_model_len=300, num_frames=most)  # the suggested number is accepted
    with pytest.raises(ValidationError):
        config_for(family, tiny_models, max_model_len=300, num_frames=most + TINY_COST[family][1])


def test_context_without_room_for_video_is_refused(tiny_models):
    with pytest.raises(ValidationError, match="leaves room for no video"):
        config_for("llava_onevision", tiny_models, max_model_len=64, max_new_tokens=32)


def test_qwen_takes_frames_in_pairs(tiny_models):
    with pytest.raises(ValidationError, match="groups of 2; use 8 or 6"):
        config_for("qwen2_vl", tiny_models, num_frames=7)
    assert config_for("qwen2_vl", tiny_models, num_frames=8).num_frames == 8


def test_num_frames_and_fps_are_exclusive(tiny_models):
    with pytest.raises(ValidationError, match="not both"):
        config_for("llava_next_video", tiny_models, num_frames=4, fps=1.0)


def test_video_too_long_for_the_context_at_that_fps(make_captioner, clips):
    stage = make_captioner("llava_next_video", fps=8.0, max_model_len=400)
    results = stage.process([record(clips["bikes"], rid="long"), record(clips["five_frames_mpeg4"], rid="short")])
    error = results[0]
    assert isinstance(error, StageError) and error.error_type == "VideoTooLong"
    assert "bikes.mp4 lasts 10.0 s" in error.message and "80 frames" in error.message
    assert "lower fps" in error.message and "max_model_len" in error.message
    assert "text" in results[1]  # 5 frames at 24 fps sampled at 8 fps: 1 frame, fits


def test_fps_sampling_takes_frames_at_that_rate(make_captioner, clips):
    stage = make_captioner("llava_onevision", fps=2.0, max_model_len=640)
    prepared = stage.prepare(record(clips["bikes"]))[PREPARED]  # 10 s
    assert video_frames(prepared) == 20


def test_prompt_longer_than_the_context_is_an_error(make_captioner, clips):
    stage = make_captioner("llava_onevision", prompt="Describe {notes}", max_model_len=300)
    results = stage.process([record(clips["bikes"], notes="word " * 400)])
    assert isinstance(results[0], StageError) and results[0].error_type == "PromptTooLong"
    assert "shorten the prompt" in results[0].message
