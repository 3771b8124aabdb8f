"""Each captioner, loaded from a tiny checkpoint through from_pretrained, captions real and
synthetic clips on the transformers backend; broken files become StageErrors."""

from __future__ import annotations

import asyncio

import pytest

from stages.base import StageError, is_async
from stages.captioners.common import PREPARED, choose_backend
from stages.registry import stage_class
from tests.stages.captioners.conftest import FAMILIES, record

GOOD = ["bigbuckbunny", "bikes", "moving_h264", "portrait_vp9", "five_frames_mpeg4"]


def test_registered_names_and_alias():
    classes = {name: stage_class("VideoCaptioner", name) for name in FAMILIES.values()}
    assert classes["QwenVLCaptioner"] is classes["Qwen2VLCaptioner"]
    assert {cls.__name__ for cls in classes.values()} == {
        "Qwen2VLCaptioner",
        "LLaVANeXTVideoCaptioner",
        "LLaVAOVCaptioner",
    }
    for cls in classes.values():
        assert is_async(cls.__new__(cls)), "captioners must expose aprocess (see stages/captioners/common.py)"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_captions_real_and_synthetic_videos_batched_like_single(family, make_captioner, clips):
    stage = make_captioner(family, prompt="Describe the clip {title}.")
    records = [record(clips[name], rid=name, title=name) for name in GOOD]
    prepared = [stage.prepare(r) for r in records]
    batch = stage.process(prepared)

    assert len(batch) == len(records)
    for result in batch:
        assert not isinstance(result, StageError), result
        assert set(result) == {"text"}
        assert isinstance(result["text"], str)
    # Left padding and per-shape grouping must not change anything: each record alone gives
    # the same caption, in the same slot.
    alone = [stage.process([p])[0] for p in prepared]
    assert alone == batch
    # Different clips and prompts give different captions (the random model does see its input).
    assert len({r["text"] for r in batch}) >= 3, batch
    used = stage.take_usage()
    assert used["captions"] == 2 * len(records)
    assert used["tokens_out"] > 0 and used["tokens_in"] > 0 and used["sampled_frames"] > 0


@pytest.mark.parametrize("family", list(FAMILIES))
def test_broken_videos_become_errors_and_the_batch_goes_on(family, make_captioner, clips, broken_videos):
    stage = make_captioner(family)
    records = [record(clips["bikes"], rid="good-1")]
    records += [record(path, rid=name) for name, (path, _) in broken_videos.items()]
    records += [record(clips["moving_h264"], rid="good-2")]
    # Unprepared records (a caller with no prepare step) are prepared inside process.
    results = stage.process(records)

    assert len(results) == len(records)
    assert "text" in results[0] and "text" in results[-1]
    for (name, (path, error_type)), result in zip(broken_videos.items(), results[1:-1], strict=True):
        assert isinstance(result, StageError), (name, result)
        assert result.error_type == error_type, (name, result)
        assert path.name in result.message
        assert type(stage).__name__ in result.message
    assert "re-encode" in results[1].message  # truncated: says what to do
    assert "remove it" in results[1 + list(broken_videos).index("audio_only")].message


def test_prepare_raises_stage_error_for_the_runtime(make_captioner, broken_videos):
    stage = make_captioner("qwen2_vl")
    with pytest.raises(StageError) as caught:
        stage.prepare(record(broken_videos["garbage"][0]))
    assert caught.value.error_type == "VideoDecodeError"
    with pytest.raises(StageError, match="has no field 'video'.*set .video_key."):
        stage.prepare({"id": "1", "_job": "t", "clip": "x.mp4"})


def test_prompt_placeholders_come_from_the_record(make_captioner, clips):
    stage = make_captioner("llava_onevision", prompt="Caption {title} shot by {author}.")
    prepared = stage.prepare(record(clips["bikes"], title="Bikes at dusk", author="Ana"))
    tokens = prepared[PREPARED]["input_ids"][0]
    text = stage.processor.decode(tokens, skip_special_tokens=False)
    assert "Caption Bikes at dusk shot by Ana." in text
    assert text.count("<video>") == prepared[PREPARED]["pixel_values_videos"].shape[1] * 16 + 1

    results = stage.process([record(clips["bikes"], title="no author here")])
    assert isinstance(results[0], StageError) and results[0].error_type == "MissingField"
    assert "{author}" in results[0].message


def test_output_key_and_text_key(make_captioner, clips):
    stage = make_captioner("llava_next_video", output_key="caption")
    assert set(stage.process([record(clips["bikes"])])[0]) == {"caption"}
    stage = make_captioner("llava_next_video", text_key="description")
    assert set(stage.process([record(clips["bikes"])])[0]) == {"description"}


def test_qwen25_gets_the_real_frame_rate(make_captioner, clips):
    """Qwen2.5-VL's time encoding: seconds per frame pair from the video's own fps (25), not 24."""
    stage = make_captioner("qwen2_5_vl", num_frames=8)
    prepared = stage.prepare(record(clips["bikes"]))[PREPARED]  # 250 frames at 25 fps
    sampled_fps = 8 / 250 * 25
    assert prepared["second_per_grid_ts"].tolist() == pytest.approx([2 / sampled_fps])


def test_qwen_short_clip_is_padded_to_frame_pairs(make_captioner, clips):
    stage = make_captioner("qwen2_vl", num_frames=8)
    prepared = stage.prepare(record(clips["five_frames_mpeg4"]))[PREPARED]
    assert prepared["video_grid_thw"][0, 0].item() == 3  # 5 frames -> 6 -> 3 pairs
    assert "text" in stage.process([record(clips["five_frames_mpeg4"])])[0]


def test_frames_are_decoded_at_the_size_the_processor_wants(make_captioner, clips):
    """Qwen: decoded straight at smart_resize's size; nothing is resized twice."""
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import smart_resize

    stage = make_captioner("qwen2_vl", num_frames=2)
    prepared = stage.prepare(record(clips["bigbuckbunny"]))[PREPARED]
    height, width = smart_resize(720, 1280, factor=28, min_pixels=56 * 56, max_pixels=112 * 112)
    assert prepared["video_grid_thw"][0].tolist() == [1, height // 14, width // 14]
    assert stage.decode_size(1280, 720) == (width, height)


async def test_aprocess_runs_the_transformers_path_off_the_event_loop(make_captioner, clips):
    stage = make_captioner("llava_onevision")
    prepared = [stage.prepare(record(clips[name], rid=name)) for name in ("bikes", "moving_h264")]
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.001)

    task = asyncio.create_task(ticker())
    try:
        results = await stage.aprocess(prepared)
    finally:
        task.cancel()
    assert results == stage.process(prepared)
    assert ticks > 3, "the event loop was blocked while the model generated"


def test_backend_choice():
    assert choose_backend("auto", "cpu", "test") == "transformers"
    assert choose_backend("transformers", "cuda:0", "test") == "transformers"
    assert choose_backend("vllm", "cpu", "test") == "vllm"


def test_vllm_backend_without_vllm_says_how_to_install(make_captioner):
    pytest.importorskip("torch")
    try:
        import vllm  # noqa: F401

        pytest.skip("vLLM is installed here")
    except ImportError:
        pass
    with pytest.raises(ImportError, match=r"pip install 'reelflow\[vllm\]'"):
        make_captioner("qwen2_vl", backend="vllm")


def test_rotated_video_is_captioned_upright(make_captioner, videos):
    """A phone clip stored landscape with a 90 degree display rotation reaches Qwen as portrait."""
    if "rotated" not in videos:
        pytest.skip("needs the ffmpeg CLI to tag the rotation")
    stage = make_captioner("qwen2_vl", num_frames=2)
    prepared = stage.prepare(record(videos["rotated"]))[PREPARED]  # coded 96x64, displayed 64x96
    assert prepared["video_grid_thw"][0].tolist() == [1, 84 // 14, 56 // 14]
    assert "text" in stage.process([record(videos["rotated"])])[0]


def test_transformers_backend_on_a_tensor_parallel_group_uses_its_first_gpu():
    from daemon.hosts.devices import visible_devices
    from stages.engines.hf_vision import single_device

    assert single_device("cuda:1", "S") == "cuda:1"
    assert single_device("cuda:2,cuda:3", "S") == "cuda:2"
    assert visible_devices("cuda:2,cuda:3", None) == "2,3" and visible_devices("cpu", None) is None


def test_light_settings_apply_on_the_next_record_after_a_reload(make_captioner, clips):
    """Hot reload swaps `stage.config`; prompt, frame and pixel settings are read per record."""
    stage = make_captioner("qwen2_vl", num_frames=4)
    before = stage.prepare(record(clips["bikes"]))[PREPARED]
    settings = {**stage.config.model_dump(), "prompt": "Only colours.", "num_frames": 2, "max_pixels": 56 * 56}
    stage.config = type(stage.config)(**settings)
    after = stage.prepare(record(clips["bikes"]))[PREPARED]
    assert before["video_grid_thw"][0, 0] == 2 and after["video_grid_thw"][0, 0] == 1
    assert after["video_grid_thw"][0, 1:].prod() < before["video_grid_thw"][0, 1:].prod()
    assert "Only colours." in stage.processor.decode(after["input_ids"][0])
    heavy = type(stage.config).heavy_keys
    assert {"model_path", "backend", "dtype", "max_model_len", "engine_args"} <= heavy
    assert not {"prompt", "num_frames", "max_pixels", "temperature"} & heavy
