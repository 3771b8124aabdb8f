"""Every constraint of the nine generators is refused when the config is validated, before any
weights load, with a message that says what is allowed."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from pydantic import ValidationError

from stages.registry import known_stages, stage_class
from tests.stages.generators.conftest import TINY, stage_config

GENERATORS = {name: step_type for name, (step_type, _, _) in TINY.items()}


def config_of(name: str, **values):
    return stage_class(GENERATORS[name], name).Config(**values)


def refused(name: str, **values) -> str:
    with pytest.raises(ValidationError) as caught:
        config_of(name, **values)
    return str(caught.value)


def test_all_nine_registered_under_their_seed_names():
    stages = known_stages()
    for name, step_type in GENERATORS.items():
        assert (step_type, name) in stages
    # FLUX and SD3.5 make images but the seed lists them under video generation: both types work.
    for name in ("FLUXGenerator", "StableDiffusionGenerator"):
        assert stage_class("VideoGenerator", name) is stage_class("ImageGenerator", name)
    assert stage_class("ImageGenerator", "StableDiffusion3Generator") is stage_class(
        "ImageGenerator", "StableDiffusionGenerator"
    )


def test_modules_import_without_torch_or_diffusers():
    """`reelflow check` imports every configured stage module; that must stay cheap."""
    modules = sorted({path.partition(":")[0] for path in known_stages().values() if ".generators." in path})
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'av', 'PIL', 'numpy') if m in sys.modules]\n"
        "print(heavy)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr


def test_defaults_are_the_models_recommended_ones():
    flux = config_of("FLUXGenerator")
    assert (flux.model_path, flux.height, flux.width, flux.guidance_scale) == (
        "black-forest-labs/FLUX.1-dev",
        1024,
        1024,
        3.5,
    )
    assert config_of("CogVideoXT2VGenerator").model_path == "THUDM/CogVideoX-2b"  # not Allegro's path
    svd = config_of("SVDGenerator")
    assert (svd.motion_bucket_id, svd.noise_aug_strength, svd.decode_chunk_size, svd.fps) == (127, 0.02, 8, 7)
    assert config_of("AllegroGenerator").num_frames == 88
    assert config_of("I2VGenXLGenerator").clip_skip == 1


@pytest.mark.parametrize("name", ["StableDiffusionGenerator", "CogVideoXT2VGenerator", "FLUXGenerator"])
def test_sides_must_be_multiples_of_16(name):
    extra = {"num_frames": 49} if name.startswith("CogVideoX") else {}
    message = refused(name, height=500, width=720, **extra)
    assert "height must be a multiple of 16" in message and "input_value=500" in message and "496 or 512" in message


def test_multiples_of_8_for_the_unet_video_models():
    for name in ("AnimateDiffGenerator", "ModelScopeT2VGenerator", "I2VGenXLGenerator", "SVDGenerator"):
        assert "width must be a multiple of 8" in refused(name, width=100)


def test_cogvideox_frames_are_8k_plus_1():
    message = refused("CogVideoXT2VGenerator", num_frames=48)
    assert "num_frames must be 8k+1" in message and "input_value=48" in message and "41 or 49" in message
    assert "8k+1" in refused("CogVideoXGenerator", num_frames=50)
    config_of("CogVideoXT2VGenerator", num_frames=33)


def test_cogvideox_i2v_only_at_its_trained_resolution(tiny_models):
    # Known checkpoint not on disk: CogVideoX-5b-I2V's 480x720.
    message = refused("CogVideoXGenerator", height=768, width=1360)
    assert "trained resolution 480x720" in message and "got 768x1360" in message
    assert config_of("CogVideoXGenerator", height=480, width=720).height == 480
    # A checkpoint on disk: read from its transformer config (the tiny one is 16x16).
    _, config = stage_config("CogVideoXGenerator", tiny_models, height=32, width=32)
    assert "trained resolution 16x16" in refused("CogVideoXGenerator", **config)


def test_animatediff_frames_at_most_the_adapters_limit(tiny_models):
    _, config = stage_config("AnimateDiffGenerator", tiny_models, num_frames=33)
    message = refused("AnimateDiffGenerator", **config)
    assert "num_frames must be at most 32" in message and "motion_max_seq_length" in message
    assert "at most 32" in refused("AnimateDiffGenerator", num_frames=48)  # the default adapter, not on disk


def test_animatediff_tells_adapter_from_base_by_the_checkpoint(tiny_models):
    adapter, base = str(tiny_models("motion_adapter")), str(tiny_models("animatediff_base"))
    config_of("AnimateDiffGenerator", model_path=adapter, base_model_path=base)
    config_of("AnimateDiffGenerator", model_path=base, motion_adapter_path=adapter)
    # The adapter named as the base, or a FLUX pipeline as the base: refused.
    message = refused("AnimateDiffGenerator", model_path=adapter, base_model_path=adapter)
    assert "no model_index.json" in message
    message = refused("AnimateDiffGenerator", model_path=base, motion_adapter_path=str(tiny_models("flux")))
    assert "not a MotionAdapter" in message or "MotionAdapter" in message
    message = refused("AnimateDiffGenerator", model_path=adapter, base_model_path=str(tiny_models("flux")))
    assert "holds a FluxPipeline" in message and "StableDiffusionPipeline" in message


def test_allegro_output_must_sit_on_the_vae_tile_grid(tiny_models):
    # DataFlow-Gen's config asked for 16 frames: Allegro decoded all-grey videos.
    message = refused("AllegroGenerator", num_frames=16)
    assert "num_frames=16 leaves 16 frames grey" in message and "24, 40, 56, 72, 88" in message
    message = refused("AllegroGenerator", height=480, width=848)
    assert "height=480" in message and "320, 520, 720" in message and "width=848" in message
    config_of("AllegroGenerator", num_frames=40, height=520, width=560)
    # From the checkpoint's VAE config when it is on disk (the tiny VAE tiles 128 px).
    _, config = stage_config("AllegroGenerator", tiny_models, height=136, width=136)
    message = refused("AllegroGenerator", **config)
    assert "width=136 leaves 8 px uncovered (valid: 128, 176," in message and "height" not in message
    assert "must be true" in refused("AllegroGenerator", enable_vae_tiling=False)


@pytest.mark.parametrize("name", ["SVDGenerator", "I2VGenXLGenerator", "CogVideoXGenerator"])
def test_image_to_video_declares_the_image_it_needs(name):
    config = config_of(name, image_key="first_frame")
    assert config.input_fields()["first_frame"] == "image"


def test_text_inputs_follow_text_key_or_the_template():
    assert config_of("ModelScopeT2VGenerator", text_key="caption").input_fields() == {"caption": "text"}
    config = config_of("ModelScopeT2VGenerator", prompt="{style} video of {subject} ({id})")
    assert config.input_fields() == {"style": "text", "subject": "text"}
    assert config_of("SVDGenerator").input_fields() == {"image": "image"}


@pytest.mark.parametrize(
    ("name", "wrong"),
    [("FLUXGenerator", "sd3"), ("StableDiffusionGenerator", "flux"), ("SVDGenerator", "i2vgen_xl")]
    + [("CogVideoXGenerator", "cogvideox_t2v"), ("CogVideoXT2VGenerator", "cogvideox_i2v")]
    + [("AllegroGenerator", "modelscope_t2v"), ("ModelScopeT2VGenerator", "allegro"), ("I2VGenXLGenerator", "svd")],
)
def test_a_checkpoint_of_another_pipeline_is_refused(name, wrong, tiny_models):
    folder = tiny_models(wrong)
    found = json.loads((folder / "model_index.json").read_text())["_class_name"]
    message = refused(name, model_path=str(folder))
    assert f"holds a {found} (model_index.json _class_name)" in message


def test_model_path_must_exist_or_look_like_a_hub_id(tmp_path):
    assert "not an existing directory" in refused("FLUXGenerator", model_path=str(tmp_path / "nope"))
    (tmp_path / "weights.bin").write_bytes(b"x")
    assert "is a file" in refused("FLUXGenerator", model_path=str(tmp_path / "weights.bin"))
    assert "has no model_index.json" in refused("FLUXGenerator", model_path=str(tmp_path))
    config_of("FLUXGenerator", model_path="some-org/some-flux")  # checked at load


def test_other_refusals_say_how_to_fix():
    assert "true_cfg_scale" in refused("FLUXGenerator", negative_prompt="blurry")
    config_of("FLUXGenerator", negative_prompt="blurry", true_cfg_scale=4.0)
    assert "SVD takes no prompt" in refused("SVDGenerator", prompt="a cat")
    assert "decode_chunk_size" in refused("SVDGenerator", enable_vae_tiling=True)
    assert "diffusers scheduler class" in refused("ModelScopeT2VGenerator", scheduler="fast please")
    assert "Extra inputs are not permitted" in refused("SVDGenerator", negative_prompt="x")


def test_seed_spellings_are_accepted():
    # DataFlow-Gen's image config says `weight` for the width; SVD's guidance goes by guidance_scale.
    assert config_of("FLUXGenerator", weight=512).width == 512
    assert config_of("StableDiffusionGenerator", weight=768).width == 768
    assert config_of("SVDGenerator", guidance_scale=2.5).max_guidance_scale == 2.5


def test_cpu_offload_is_refused_without_an_accelerator(tiny_models):
    step_type, config = stage_config("ModelScopeT2VGenerator", tiny_models, cpu_offload=True)
    cls = stage_class(step_type, "ModelScopeT2VGenerator")
    stage = cls(cls.Config(**config), "cpu")
    with pytest.raises(ValueError, match="cpu_offload: true needs a CUDA GPU.*set cpu_offload: false"):
        stage.load()


def test_cogvideox_text_length_must_match_absolute_position_embeddings(tiny_models):
    step_type, config = stage_config("CogVideoXGenerator", tiny_models, max_sequence_length=32)
    cls = stage_class(step_type, "CogVideoXGenerator")
    with pytest.raises(ValueError, match="max_sequence_length must be 16 for this checkpoint"):
        cls(cls.Config(**config), "cpu").load()


def test_reelflow_check_refuses_each_constraint(tiny_models, tmp_path):
    """The constraints as a user meets them: `reelflow check` lists every one, exit code 2."""
    from tests.harness import PYTHON, REPO, _env, write_config

    steps = [
        ("ImageGenerator", "StableDiffusionGenerator", {"height": 1000}),
        ("ImageGenerator", "FLUXGenerator", {"model_path": str(tiny_models("sd3"))}),
        ("VideoGenerator", "CogVideoXT2VGenerator", {"num_frames": 48, "width": 700}),
        ("VideoGenerator", "CogVideoXGenerator", {"height": 512}),
        ("VideoGenerator", "AnimateDiffGenerator", {"num_frames": 40}),
        ("VideoGenerator", "AllegroGenerator", {"num_frames": 16}),
        ("VideoGenerator", "SVDGenerator", {"prompt": "a cat"}),
    ]
    config = {"meta_path": "x.jsonl", "save_folder": "out"}
    config["steps"] = [{"type": t, "name": n, "config": c} for t, n, c in steps]
    done = subprocess.run(
        [PYTHON, "-m", "daemon.cli", "check", "--config", str(write_config(tmp_path, config))],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=_env(None),
        timeout=120,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    for expected in [
        "steps[0].config.height: Value error, height must be a multiple of 16 for StableDiffusionGenerator",
        "steps[1].config.model_path: Value error, model_path",
        "holds a StableDiffusion3Pipeline (model_index.json _class_name), but FLUXGenerator runs FluxPipeline",
        "steps[2].config.width: Value error, width must be a multiple of 16 for CogVideoXT2VGenerator",
        "steps[2].config.num_frames: Value error, num_frames must be 8k+1",
        "steps[3].config: Value error, THUDM/CogVideoX-5b-I2V generates only at its trained resolution 480x720",
        "steps[4].config: Value error, num_frames must be at most 32",
        "steps[5].config: Value error, Allegro's VAE decodes in tiles",
        "steps[6].config.prompt: Value error, SVD takes no prompt",
    ]:
        assert expected in output, output


def test_shipped_chained_config_validates():
    from daemon.config import load_config
    from tests.harness import REPO

    path = REPO / "configs" / "flux_then_svd.yaml"
    assert path.read_text().startswith("# One shot:  reelflow run --config configs/flux_then_svd.yaml")
    config = load_config(path)
    flux, svd = config.steps
    assert (flux.name, svd.name) == ("FLUXGenerator", "SVDGenerator")
    assert svd.config.image_key == flux.config.output_key == "first_frame"
    assert (flux.config.height, flux.config.width) == (svd.config.height, svd.config.width) == (576, 1024)


# DataFlow-Gen's configs/VideoGeneration.yaml generator steps, keys as they stand.
SEED_STEPS = [
    (
        "CogVideoXGenerator",
        {
            "model_path": "THUDM/CogVideoX-5b-I2V",
            "num_videos_per_prompt": 1,
            "num_inference_steps": 50,
            "num_frames": 49,
            "guidance_scale": 6,
        },
    ),
    (
        "AllegroGenerator",
        {
            "model_path": "rhymes-ai/Allegro",
            "subfolder": "vae",
            "num_frames": 16,
            "num_inference_steps": 100,
            "guidance_scale": 7.5,
            "negative_prompt": "",
            "max_sequence_length": 512,
        },
    ),
    (
        "CogVideoXT2VGenerator",
        {
            "model_path": "THUDM/CogVideoX-2b",
            "num_videos_per_prompt": 1,
            "num_inference_steps": 50,
            "num_frames": 49,
            "guidance_scale": 6,
        },
    ),
    ("I2VGenXLGenerator", {"model_path": "ali-vilab/i2vgen-xl", "variant": "fp16"}),
    (
        "SVDGenerator",
        {"model_path": "stabilityai/stable-video-diffusion-img2vid-xt", "variant": "fp16", "decode_chunk_size": 8},
    ),
    (
        "AnimateDiffGenerator",
        {
            "model_path": "emilianJR/epiCRealism",
            "cpu_offload": True,
            "num_frames": 16,
            "num_inference_steps": 59,
            "guidance_scale": 7.5,
        },
    ),
    ("ModelScopeT2VGenerator", {"model_path": "damo-vilab/text-to-video-ms-1.7b", "variant": "fp16"}),
]


@pytest.mark.parametrize(("name", "keys"), SEED_STEPS, ids=[name for name, _ in SEED_STEPS])
def test_seed_video_generation_keys_are_accepted(name, keys):
    if name == "AllegroGenerator":
        # Its 16 frames fall off Allegro's VAE tile grid: the seed got grey videos. Refused.
        assert "num_frames=16 leaves 16 frames grey" in refused(name, **keys)
        keys = keys | {"num_frames": 88}
    config = config_of(name, **keys)
    for key, value in keys.items():
        assert getattr(config, key) == value


def test_a_model_sets_its_defaults_and_notes_in_one_place():
    """`defaults` and `notes` change only that model's keys; a key the config lacks is refused at import."""
    from stages.generators import _common as common

    class Model(common.VideoGeneratorConfig, common.Guided):
        side_multiple = 8
        defaults = dict(model_path="org/model", guidance_scale=2.0, height=256)
        notes = dict(height="trained at 256")

    fields, base = Model.model_fields, common.VideoGeneratorConfig.model_fields
    assert (fields["guidance_scale"].default, fields["height"].default, base["height"].default) == (2.0, 256, 512)
    assert fields["height"].description == "Frame height in pixels (a multiple of 8, trained at 256)."
    assert base["height"].description == "Frame height in pixels."
    assert Model().model_path == "org/model"
    with pytest.raises(ValueError, match="greater than or equal to 8"):
        Model(height=0)
    with pytest.raises(TypeError, match="defaults/notes name 'guidance', which is not a key of this config"):

        class Typo(common.VideoGeneratorConfig):
            defaults = dict(guidance=2.0)
