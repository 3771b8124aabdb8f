"""Each of the nine generators, on its tiny model loaded through from_pretrained, writes playable
files of the requested frames, size and fps (PNG for the image models), deterministically."""

from __future__ import annotations

import errno

import numpy as np
import pytest

from stages.base import StageError, safe_file_stem
from stages.generators._common import record_seed
from stages.registry import stage_class
from tests.stages.generators.conftest import IMAGE_TO_VIDEO, TINY, make_record, read_png, read_video, stage_config


@pytest.fixture(scope="module")
def loaded(tiny_models):
    """One loaded stage per generator for the module (loading is what a daemon does once)."""
    stages = {}

    def get(name: str):
        if name not in stages:
            step_type, config = stage_config(name, tiny_models)
            cls = stage_class(step_type, name)
            stage = cls(cls.Config(**config), "cpu")
            stage.load()
            stages[name] = stage
        return stages[name]

    yield get
    for stage in stages.values():
        stage.close()


def _read(path):
    if path.suffix == ".png":
        return read_png(path)[None]
    frames, *_ = read_video(path)
    return frames


@pytest.mark.parametrize("name", list(TINY))
def test_generates_requested_media(name, loaded, tmp_path, cond_image):
    stage = loaded(name)
    config = stage.config
    image = cond_image if name in IMAGE_TO_VIDEO else None
    records = [make_record("a", tmp_path / "media", image), make_record("b/2", tmp_path / "media", image, "a dog")]

    results = stage.process(records)

    assert len(results) == 2
    for record, result in zip(records, results, strict=True):
        assert not isinstance(result, StageError), result
        is_video = TINY[name][0] == "VideoGenerator"
        key = config.video_key if is_video else config.image_key
        assert set(result) == {key}
        path = result[key]
        assert path.is_absolute() and path.parent == tmp_path / "media"
        assert path.name == f"{safe_file_stem(record['id'])}.{'mp4' if is_video else 'png'}"
        if is_video:
            frames, fps, codec, pix_fmt = read_video(path)
            height = config.height or 16  # CogVideoX-I2V: its trained resolution
            width = config.width or 16
            expected_frames = config.num_frames
            assert frames.shape == (expected_frames, height, width, 3)
            assert (fps, codec, pix_fmt) == (12.0, "h264", "yuv420p")
            # No grey (uncovered) frames: every frame has some structure.
            assert all(frame.std() > 1 for frame in frames)
        else:
            picture = read_png(path)
            assert picture.shape == (config.height, config.width, 3)
    per_record = config.num_frames if TINY[name][0] == "VideoGenerator" else 1
    assert stage.take_usage()["generated_frames"] == 2 * per_record
    # The file holds what the pipeline made (up to h264's loss): catches frames written with the
    # wrong memory layout, which still look like plausible noise.
    [[raw]] = stage._generate([stage.prepare(records[0])])
    written = _read(results[0][key])
    assert _blurred_error(written, raw.reshape(written.shape)) < 6


def _blurred_error(a, b) -> float:
    """Mean absolute difference of 4x4-block means (h264 + 4:2:0 chroma lose fine detail, not blocks)."""
    t, h, w, c = a.shape
    blocks = (t, h // 4, 4, w // 4, 4, c)
    a = a[:, : h // 4 * 4, : w // 4 * 4].astype(float).reshape(blocks).mean(axis=(2, 4))
    b = b[:, : h // 4 * 4, : w // 4 * 4].astype(float).reshape(blocks).mean(axis=(2, 4))
    return float(np.abs(a - b).mean())


@pytest.mark.parametrize("name", list(TINY))
def test_same_record_and_seed_give_identical_frames(name, loaded, tmp_path, cond_image):
    stage = loaded(name)
    image = cond_image if name in IMAGE_TO_VIDEO else None
    first = stage.process([make_record("r1", tmp_path / "one", image), make_record("r2", tmp_path / "one", image)])
    again = stage.process([make_record("r1", tmp_path / "two", image), make_record("r2", tmp_path / "two", image)])
    key = next(iter(first[0]))
    for a, b in zip(first, again, strict=True):
        assert a[key] != b[key]
        assert np.array_equal(_read(a[key]), _read(b[key]))
    # Different records get different noise.
    assert not np.array_equal(_read(first[0][key]), _read(first[1][key]))


@pytest.mark.parametrize("name", list(TINY))
def test_output_does_not_depend_on_the_batch(name, loaded, tmp_path, cond_image):
    """Each sample has its own seeded generator, so a record's frames are the same alone or in a
    batch; batched matmuls may round differently, hence up to 1/255 apart (compared before
    encoding: h264 can turn a 1-level difference into a larger one)."""
    stage = loaded(name)
    image = cond_image if name in IMAGE_TO_VIDEO else None
    records = [stage.prepare(make_record(i, tmp_path, image, f"prompt {i}")) for i in ("r1", "r2", "r3")]
    batched = stage._generate(records)
    alone = stage._generate(records[1:2])
    assert len(batched) == 3 and len(alone) == 1
    assert np.abs(batched[1][0].astype(int) - alone[0][0].astype(int)).max() <= 1


def test_seed_changes_output(loaded, tmp_path):
    stage = loaded("CogVideoXT2VGenerator")
    before = stage.process([make_record("x", tmp_path / "a")])[0]["video"]
    stage.config = stage.config.model_copy(update={"seed": 7})
    try:
        after = stage.process([make_record("x", tmp_path / "b")])[0]["video"]
    finally:
        stage.config = stage.config.model_copy(update={"seed": 42})
    assert not np.array_equal(_read(before), _read(after))


def test_several_videos_per_prompt_and_filename_template(tiny_models, tmp_path):
    step_type, config = stage_config(
        "ModelScopeT2VGenerator", tiny_models, num_videos_per_prompt=2, filename="{job}-{id}", output_key="clip"
    )
    cls = stage_class(step_type, "ModelScopeT2VGenerator")
    stage = cls(cls.Config(**config), "cpu")
    stage.load()
    [result] = stage.process([make_record("7", tmp_path)])
    assert [p.name for p in result["clip"]] == ["job-7~0.mp4", "job-7~1.mp4"]
    first, second = (_read(p) for p in result["clip"])
    assert first.shape == second.shape == (8, 24, 32, 3)
    assert not np.array_equal(first, second)


def test_several_outputs_never_share_a_file_with_another_record(loaded, tmp_path):
    """Record `a`'s outputs 0 and 1, then (after a hot reload to one image per record, as the
    runtime swaps `stage.config`) records whose ids are the names `<id>_<index>` used to give
    a's outputs, and `a~0`: five files side by side in one media folder, each holding what the
    pipeline made for its own (record, output index) (PNG is lossless: compared exactly)."""
    stage = loaded("FLUXGenerator")
    media = tmp_path / "media"
    records = {i: make_record(i, media, text=f"a fox, take {i}") for i in ("a", "a_0", "a_1", "a~0")}
    try:
        stage.config = stage.config.model_copy(update={"num_images_per_prompt": 2})
        [first] = stage.process([records["a"]])
        [made_for_a] = stage._generate([stage.prepare(records["a"])])
        stage.config = stage.config.model_copy(update={"num_images_per_prompt": 1})
        later = stage.process([records[i] for i in ("a_0", "a_1", "a~0")])
        made_later = [made for [made] in stage._generate([stage.prepare(records[i]) for i in ("a_0", "a_1", "a~0")])]
    finally:
        stage.config = stage.config.model_copy(update={"num_images_per_prompt": 1})
    paths = [*first["image"], *(result["image"] for result in later)]
    assert sorted(media.glob("*.png")) == sorted(paths)  # five files, none written over
    for path, made in zip(paths, [*made_for_a, *made_later], strict=True):
        assert np.array_equal(read_png(path), made), path
    assert not np.array_equal(made_for_a[0], made_later[0])  # a's first image is not a_0's
    assert [p.name for p in paths] == ["a~0.png", "a~1.png", "a_0.png", "a_1.png", paths[4].name]
    assert paths[4].name.startswith("a_0~") and len(paths[4].stem) == len("a_0~") + 16  # `a~0` is hashed


def test_a_step_with_its_own_output_key_never_takes_another_records_file(loaded, tmp_path):
    """A step writing under `output_key: first_frame` names record `a`'s file after it; the
    default file of a record whose id is `a_first_frame` (what the old `{id}_<output_key>` gave
    `a`) must be another file, each holding its own image."""
    stage = loaded("FLUXGenerator")
    media = tmp_path / "media"
    baseline = stage.config
    try:
        stage.config = baseline.model_copy(update={"output_key": "first_frame"})
        [tagged] = stage.process([make_record("a", media, text="a fox")])
        [made_for_a] = stage._generate([stage.prepare(make_record("a", media, text="a fox"))])
        stage.config = baseline
        [plain] = stage.process([make_record("a_first_frame", media, text="a heron")])
    finally:
        stage.config = baseline
    assert tagged["first_frame"].name == "a~first_frame.png" and plain["image"].name == "a_first_frame.png"
    assert sorted(media.glob("*.png")) == sorted([tagged["first_frame"], plain["image"]])
    assert np.array_equal(read_png(tagged["first_frame"]), made_for_a[0])  # not written over by the heron


def test_a_full_disk_is_not_the_records_fault_a_bad_path_is(loaded, tmp_path, tmpfs):
    """A PNG that does not fit on a full tmpfs raises out of `process` with its errno (the
    failure contract: transient, the batch is asked again later and no record is failed); once
    there is space the same call writes it. A directory where the file goes is the record's own
    problem: record-level."""
    from daemon.runtime.failures import RECORD, TRANSIENT, classify
    from tests.harness import fill

    stage = loaded("FLUXGenerator")
    media = tmpfs(tmp_path / "media", 64)
    ballast = fill(media)
    with pytest.raises(OSError) as full:
        stage.process([make_record("d1", media)])
    assert full.value.errno == errno.ENOSPC and classify(full.value) == TRANSIENT
    assert "cannot write the generated file" in str(full.value)
    ballast.unlink()
    [result] = stage.process([make_record("d1", media)])
    assert read_png(result["image"]).shape == (16, 32, 3)

    (media / "d2.png" / "taken").mkdir(parents=True)
    with pytest.raises(OSError) as taken:
        stage.process([make_record("d2", media)])
    assert classify(taken.value) == RECORD and str(taken.value).endswith(f"-> '{media / 'd2.png'}'")


def test_prompt_template_and_missing_fields(loaded, tmp_path):
    stage = loaded("FLUXGenerator")
    stage.config = stage.config.model_copy(update={"prompt": "a photo of {subject}, {style}"})
    try:
        good = make_record("1", tmp_path) | {"subject": "a fox", "style": "watercolour"}
        bad = make_record("2", tmp_path)
        results = stage.process([good, bad])
    finally:
        stage.config = stage.config.model_copy(update={"prompt": None})
    assert results[0]["image"].is_file()
    assert isinstance(results[1], StageError) and results[1].error_type == "MissingField"
    assert "subject" in results[1].message

    [missing] = stage.process([{"id": "3", "_job": "job", "_media_dir": tmp_path, "caption": "x"}])
    assert isinstance(missing, StageError) and missing.error_type == "MissingPrompt"
    assert "'text'" in missing.message and "text_key" in missing.message


@pytest.mark.parametrize("name", sorted(IMAGE_TO_VIDEO))
def test_image_to_video_needs_an_image(name, loaded, tmp_path):
    stage = loaded(name)
    assert stage.config.input_fields()["image"] == "image"
    not_an_image = tmp_path / "notes.txt"
    not_an_image.write_text("hello")
    results = stage.process(
        [
            make_record("1", tmp_path),
            make_record("2", tmp_path, tmp_path / "missing.png"),
            make_record("3", tmp_path, not_an_image),
        ]
    )
    assert [r.error_type for r in results] == ["MissingImage", "ImageNotFound", "ImageDecodeError"]


def test_prepare_then_process_as_the_runtime_does(loaded, tmp_path, cond_image):
    stage = loaded("SVDGenerator")
    prepared = stage.prepare(make_record("p", tmp_path, cond_image))
    assert prepared["_gen"]["image"].size == (48, 32)  # centre-cropped to the output size
    [result] = stage.process([prepared])
    assert read_video(result["video"])[0].shape == (4, 32, 48, 3)


def test_scheduler_follows_the_config_between_batches(loaded, tmp_path):
    stage = loaded("AnimateDiffGenerator")
    assert type(stage.pipe.scheduler).__name__ == "DDIMScheduler"
    assert stage.pipe.scheduler.config.beta_schedule == "linear"  # AnimateDiff's recommended setup
    stage.config = stage.config.model_copy(update={"scheduler": "EulerDiscreteScheduler", "scheduler_config": {}})
    try:
        stage.process([make_record("s", tmp_path)])
        assert type(stage.pipe.scheduler).__name__ == "EulerDiscreteScheduler"
        stage.config = stage.config.model_copy(update={"scheduler": "NoSuchScheduler"})
        with pytest.raises(ValueError, match="compatible with this checkpoint: .*DDIMScheduler"):
            stage.process([make_record("s", tmp_path)])
    finally:
        stage.config = type(stage.config)(**stage_config("AnimateDiffGenerator", _models_of(stage))[1])
    stage.process([make_record("s", tmp_path)])
    assert type(stage.pipe.scheduler).__name__ == "DDIMScheduler"


def _models_of(stage):
    from pathlib import Path

    paths = {"motion_adapter": Path(stage.config.model_path), "animatediff_base": Path(stage.config.base_model_path)}
    return paths.__getitem__


def test_animatediff_model_path_may_be_the_base_model(tiny_models, tmp_path):
    step_type, config = stage_config(
        "AnimateDiffGenerator",
        tiny_models,
        model_path=str(tiny_models("animatediff_base")),
        motion_adapter_path=str(tiny_models("motion_adapter")),
        base_model_path="unused/never-loaded",
        clip_skip=1,
    )
    cls = stage_class(step_type, "AnimateDiffGenerator")
    stage = cls(cls.Config(**config), "cpu")
    stage.load()
    assert type(stage.pipe.motion_adapter).__name__ == "MotionAdapter"
    [result] = stage.process([make_record("m", tmp_path)])
    assert read_video(result["video"])[0].shape == (8, 32, 32, 3)


def test_weights_variant_is_loaded(tiny_models, tmp_path):
    from tests.tiny.diffusers_pipelines import save_tiny

    folder = save_tiny("cogvideox_t2v", tmp_path / "fp16", work=tmp_path / "tok", variant="fp16")
    assert list(folder.glob("transformer/*.fp16.safetensors"))
    step_type, config = stage_config("CogVideoXT2VGenerator", tiny_models, model_path=str(folder), variant="fp16")
    cls = stage_class(step_type, "CogVideoXT2VGenerator")
    stage = cls(cls.Config(**config), "cpu")
    stage.load()
    [result] = stage.process([make_record("v", tmp_path)])
    assert read_video(result["video"])[0].shape == (9, 16, 32, 3)


class Spy:
    """Stands in for the pipeline: records each call's keyword arguments, then runs it."""

    def __init__(self, pipe):
        self.pipe, self.calls = pipe, []

    def __call__(self, **kwargs):
        self.calls.append(kwargs)
        return self.pipe(**kwargs)

    def __getattr__(self, name):
        return getattr(self.pipe, name)


# Non-default values for every generation key, and what the pipeline must receive for them.
HONOURED = {
    "FLUXGenerator": (
        {"guidance_scale": 2.5, "true_cfg_scale": 1.5, "negative_prompt": "blurry", "max_sequence_length": 12},
        {"guidance_scale": 2.5, "true_cfg_scale": 1.5, "negative_prompt": ["blurry"], "max_sequence_length": 12},
    ),
    "StableDiffusionGenerator": (
        {"guidance_scale": 2.5, "negative_prompt": "blurry", "max_sequence_length": 12},
        {"guidance_scale": 2.5, "negative_prompt": ["blurry"], "max_sequence_length": 12},
    ),
    "AllegroGenerator": (
        {"guidance_scale": 2.5, "negative_prompt": "blurry", "max_sequence_length": 12, "clean_caption": False},
        {"guidance_scale": 2.5, "negative_prompt": ["blurry"], "max_sequence_length": 12, "clean_caption": False},
    ),
    "AnimateDiffGenerator": (
        {"guidance_scale": 2.5, "negative_prompt": "blurry", "decode_chunk_size": 3, "clip_skip": 1},
        {"guidance_scale": 2.5, "negative_prompt": ["blurry"], "decode_chunk_size": 3, "clip_skip": 1},
    ),
    "CogVideoXT2VGenerator": (
        {"guidance_scale": 2.5, "negative_prompt": "blurry", "use_dynamic_cfg": True, "max_sequence_length": 16},
        {"guidance_scale": 2.5, "negative_prompt": ["blurry"], "use_dynamic_cfg": True, "max_sequence_length": 16},
    ),
    "CogVideoXGenerator": (
        {"guidance_scale": 2.5, "negative_prompt": "blurry", "use_dynamic_cfg": True},
        {"guidance_scale": 2.5, "negative_prompt": ["blurry"], "use_dynamic_cfg": True, "height": 16, "width": 16},
    ),
    "I2VGenXLGenerator": (
        {"guidance_scale": 2.5, "negative_prompt": "blurry", "decode_chunk_size": 2, "clip_skip": None, "fps": 10},
        {
            "guidance_scale": 2.5,
            "negative_prompt": ["blurry"],
            "decode_chunk_size": 2,
            "clip_skip": None,
            "target_fps": 10,
        },
    ),
    "ModelScopeT2VGenerator": (
        {"guidance_scale": 2.5, "negative_prompt": "blurry", "clip_skip": 1},
        {"guidance_scale": 2.5, "negative_prompt": ["blurry"], "clip_skip": 1},
    ),
    "SVDGenerator": (
        {"min_guidance_scale": 1.5, "guidance_scale": 2.5, "motion_bucket_id": 60, "noise_aug_strength": 0.1, "fps": 6},
        {
            "min_guidance_scale": 1.5,
            "max_guidance_scale": 2.5,
            "motion_bucket_id": 60,
            "noise_aug_strength": 0.1,
            "fps": 6,
        },
    ),
}


@pytest.mark.parametrize("name", list(TINY))
def test_every_generation_setting_reaches_the_pipeline(name, tiny_models, tmp_path, cond_image):
    """The seed's CogVideoX ignored its config; here each key is passed on (or the run fails)."""
    settings, expected = HONOURED[name]
    step_type, config = stage_config(name, tiny_models, num_inference_steps=1, seed=3, **settings)
    cls = stage_class(step_type, name)
    stage = cls(cls.Config(**config), "cpu")
    stage.load()
    stage.pipe = spy = Spy(stage.pipe)
    image = cond_image if name in IMAGE_TO_VIDEO else None
    [result] = stage.process([make_record("k", tmp_path, image)])
    assert not isinstance(result, StageError), result
    [call] = spy.calls
    sizes = {k: v for k, v in TINY[name][2].items() if k in ("height", "width", "num_frames")}
    for key, value in {"num_inference_steps": 1, **sizes, **expected}.items():
        assert call[key] == value, (key, call[key], value)
    assert len(call["generator"]) == 1 and call["generator"][0].initial_seed() == record_seed(3, "k", 0)


@pytest.mark.parametrize(
    ("name", "negative", "passed"), [("AllegroGenerator", "", [""]), ("FLUXGenerator", None, None)]
)
def test_an_unset_negative_prompt_reaches_the_pipeline_as_its_own_none(name, negative, passed, tiny_models, tmp_path):
    """None fails in Allegro's text cleaning, so its "no negative prompt" is "" and goes through as it
    is; the others take None."""
    step_type, config = stage_config(name, tiny_models, num_inference_steps=1, negative_prompt=negative)
    cls = stage_class(step_type, name)
    stage = cls(cls.Config(**config), "cpu")
    stage.load()
    stage.pipe = spy = Spy(stage.pipe)
    [result] = stage.process([make_record("k", tmp_path)])
    assert not isinstance(result, StageError), result
    assert spy.calls[0]["negative_prompt"] == passed


def test_dtype_and_vae_switches_are_applied(loaded, tiny_models, tmp_path):
    import torch

    stage = loaded("CogVideoXT2VGenerator")
    assert stage.pipe.transformer.dtype == torch.float32  # dtype auto on the CPU
    stage.process([make_record("t", tmp_path)])  # settings are applied before each batch
    assert stage.pipe.vae.use_tiling and stage.pipe.vae.use_slicing  # CogVideoX's defaults
    stage.config = stage.config.model_copy(update={"enable_vae_tiling": False, "enable_vae_slicing": False})
    try:
        stage.process([make_record("t", tmp_path)])
        assert not stage.pipe.vae.use_tiling and not stage.pipe.vae.use_slicing
    finally:
        stage.config = stage.config.model_copy(update={"enable_vae_tiling": True, "enable_vae_slicing": True})

    step_type, config = stage_config("ModelScopeT2VGenerator", tiny_models, dtype="bfloat16")
    cls = stage_class(step_type, "ModelScopeT2VGenerator")
    half = cls(cls.Config(**config), "cpu")
    half.load()
    assert half.pipe.unet.dtype == torch.bfloat16
    [result] = half.process([make_record("h", tmp_path)])
    assert read_video(result["video"])[0].shape == (8, 24, 32, 3)
