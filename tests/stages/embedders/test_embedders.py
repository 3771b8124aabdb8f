"""CLIPEmbedder and AestheticFilter called directly, on a tiny random-weight CLIP and clips encoded here."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stages.base import Filtered, InFlight, StageError
from stages.embedders.clip import FRAME_EMBEDDINGS, CLIPEmbedder, CLIPEmbedderConfig
from stages.embedding import Embedding
from stages.filters.aesthetic import AestheticFilter, AestheticFilterConfig, load_head
from stages.registry import stage_class
from tests.stages.clip_media import clip, write_video
from tests.stages.embed_media import reencode, scene
from tests.tiny.clip import TINY_CLIP_DIM, build_tiny_clip


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scenes")
    found = {f"s{i}": scene(folder / f"s{i}.mp4", i) for i in range(3)}
    found["s0_low"] = reencode(found["s0"], folder / "s0_low.mp4", "40k")
    return found


@pytest.fixture(scope="module")
def embedder(tiny_clip):
    stage = CLIPEmbedder(CLIPEmbedderConfig(model_path=str(tiny_clip), num_frames=6), "cpu")
    stage.load()
    return stage


def test_registered_and_every_key_described():
    from stages.registry import builtin_stages

    assert stage_class("VideoEmbedder", "CLIPEmbedder") is CLIPEmbedder
    assert stage_class("VideoFilter", "AestheticFilter") is AestheticFilter
    # every built-in stage's keys, as `reelflow steps NAME` prints them: none without a description
    undescribed = {
        f"{t}/{n}": missing
        for t, n in builtin_stages()
        if (missing := [k for k, f in stage_class(t, n).Config.model_fields.items() if not f.description])
    }
    assert not undescribed


def test_embedding_is_a_unit_vector_and_a_reencode_lands_on_it(embedder, clips):
    out = embedder.process([{"id": k, "video": v} for k, v in clips.items()])
    vectors = {k: o["embedding"] for k, o in zip(clips, out, strict=True)}
    for vector in vectors.values():
        assert isinstance(vector, Embedding) and vector.shape == (TINY_CLIP_DIM,)
        assert abs(float(np.linalg.norm(vector)) - 1) < 1e-5
    # with random weights a re-encode (same frames, other bitrate) stays above 0.999; other scenes
    # are below 0.99 (measured: ~0.9999+ vs at most ~0.95): the e2e tests use threshold 0.995
    assert float(vectors["s0"] @ vectors["s0_low"]) > 0.999
    assert float(vectors["s0"] @ vectors["s1"]) < 0.99 and float(vectors["s1"] @ vectors["s2"]) < 0.99
    frames = out[0][FRAME_EMBEDDINGS]
    assert isinstance(frames, InFlight) and frames.value["vectors"].shape == (6, TINY_CLIP_DIM)
    # the clip's vector is the normalised mean of its frames'
    mean = frames.value["vectors"].mean(axis=0)
    np.testing.assert_allclose(vectors["s0"], mean / np.linalg.norm(mean), atol=1e-5)


def test_the_clip_window_is_what_is_embedded(embedder, clips, tmp_path):
    import av

    def frames_of(path):
        with av.open(str(path)) as container:
            return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]

    both = write_video(tmp_path / "both.mp4", frames_of(clips["s1"]) + frames_of(clips["s2"]))
    out = embedder.process(
        [
            {"id": "a", "video": both, "clip": clip(0, 0, 24, 12)},
            {"id": "b", "video": both, "clip": clip(1, 24, 24, 12)},
            {"id": "s1", "video": clips["s1"]},
            {"id": "s2", "video": clips["s2"]},
        ]
    )
    a, b, s1, s2 = (o["embedding"] for o in out)
    assert float(a @ s1) > 0.999 and float(b @ s2) > 0.999
    assert float(a @ b) < 0.99


def test_clip_text_score_when_the_record_has_text(embedder, clips, tiny_clip):
    out = embedder.process(
        [
            {"id": "t", "video": clips["s0"], "text": "a cat playing with a ball"},
            {"id": "n", "video": clips["s0"]},
            {"id": "e", "video": clips["s0"], "text": "  "},
        ]
    )
    text = embedder.encoder.text_embeddings(["a cat playing with a ball"])[0]
    assert out[0]["clip_text_score"] == pytest.approx(float(out[0]["embedding"] @ text), abs=1e-5)
    assert -1 <= out[0]["clip_text_score"] <= 1
    assert "clip_text_score" not in out[1] and "clip_text_score" not in out[2]


def test_a_bad_video_is_that_records_error(embedder, clips, tmp_path):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video at all")
    out = embedder.process([{"id": "x", "video": broken}, {"id": "ok", "video": clips["s0"]}, {"id": "none"}])
    assert isinstance(out[0], StageError) and "broken.mp4" in out[0].message
    assert isinstance(out[1]["embedding"], Embedding)
    assert isinstance(out[2], StageError) and out[2].error_type == "MissingField"


# --- AestheticFilter ----------------------------------------------------------------------------


def laion_head(dim: int, relu: bool = False, seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict named as improved-aesthetic-predictor's MLP names it (widths 1024, 128, 64, 16)."""
    torch.manual_seed(seed)
    widths = [dim, 1024, 128, 64, 16, 1]
    indices = [0, 3, 6, 9, 11] if relu else [0, 2, 4, 6, 7]
    state = {}
    for index, (n_in, n_out) in zip(indices, zip(widths, widths[1:], strict=False), strict=True):
        layer = torch.nn.Linear(n_in, n_out)
        state[f"layers.{index}.weight"], state[f"layers.{index}.bias"] = layer.weight.data, layer.bias.data
    return state


def reference_score(state: dict, vectors: np.ndarray, relu: bool) -> float:
    x = torch.from_numpy(vectors)
    keys = sorted({int(k.split(".")[1]) for k in state})
    for n, index in enumerate(keys):
        x = x @ state[f"layers.{index}.weight"].T + state[f"layers.{index}.bias"]
        if relu and n < len(keys) - 1:
            x = torch.relu(x)
    return float(x.mean())


@pytest.mark.parametrize("relu,suffix", [(False, ".pth"), (True, ".safetensors")])
def test_head_loads_both_laion_layouts(tmp_path, relu, suffix):
    state = laion_head(TINY_CLIP_DIM, relu)
    path = tmp_path / f"head{suffix}"
    if suffix == ".pth":
        torch.save(state, path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    head = load_head(path)
    assert any(isinstance(m, torch.nn.ReLU) for m in head) == relu
    vectors = np.random.default_rng(0).standard_normal((5, TINY_CLIP_DIM)).astype(np.float32)
    with torch.inference_mode():
        got = float(head(torch.from_numpy(vectors)).mean())
    assert got == pytest.approx(reference_score(state, vectors, relu), abs=1e-5)


def test_head_with_foreign_keys_is_refused(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"fc.weight": torch.zeros(1, 4)}, path)
    with pytest.raises(ValueError, match="layers"):
        load_head(path)


@pytest.fixture(scope="module")
def head_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("head") / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(laion_head(TINY_CLIP_DIM), path)
    return path


def _aesthetic(tiny_clip, head_path, **config) -> AestheticFilter:
    stage = AestheticFilter(AestheticFilterConfig(head_path=head_path, model_path=str(tiny_clip), **config), "cpu")
    stage.load()
    return stage


def test_aesthetic_score_is_the_mean_over_frames_and_reuses_the_embedders_frames(tiny_clip, head_path, embedder, clips):
    embedded = embedder.process([{"id": "a", "video": clips["s0"]}])[0]
    record = {"id": "a", "video": clips["s0"], **embedded}
    stage = _aesthetic(tiny_clip, head_path)
    [out] = stage.process([record])
    expected = reference_score(laion_head(TINY_CLIP_DIM), embedded[FRAME_EMBEDDINGS].value["vectors"], False)
    assert out["aesthetic_score"] == pytest.approx(expected, abs=1e-4)
    assert stage.encoder is None  # CLIP was not run (nor loaded) a second time
    assert stage.usage["reused_frame_embeddings"] == 6
    # without the embedder's frames it runs CLIP itself on its own num_frames: same scale of score
    [alone] = stage.process([{"id": "a", "video": clips["s0"]}])
    assert stage.encoder is not None and stage.usage["embedded_frames"] == 4
    assert alone["aesthetic_score"] == pytest.approx(expected, abs=0.05)


def test_another_model_s_frames_are_not_reused(tiny_clip, head_path, clips, tmp_path):
    other = build_tiny_clip(tmp_path / "other-clip", seed=1)
    stage = _aesthetic(other, head_path)
    foreign = InFlight({"model_path": str(tiny_clip), "vectors": np.ones((3, TINY_CLIP_DIM), np.float32)})
    stage.process([{"id": "a", "video": clips["s0"], FRAME_EMBEDDINGS: foreign}])
    assert stage.encoder is not None and stage.usage["reused_frame_embeddings"] == 0


def test_min_score_filters_with_reason_and_score(tiny_clip, head_path, clips):
    probe = _aesthetic(tiny_clip, head_path)
    scores = [probe.process([{"id": k, "video": v}])[0]["aesthetic_score"] for k, v in clips.items()]
    cut = sorted(scores)[1]  # the lowest one below, the others at or above
    stage = _aesthetic(tiny_clip, head_path, min_score=cut)
    out = stage.process([{"id": k, "video": v} for k, v in clips.items()])
    dropped = [o for o in out if isinstance(o, Filtered)]
    assert len(dropped) == 1 and dropped[0].scores["aesthetic_score"] == min(scores)
    assert "below min_score" in dropped[0].reason
    assert sorted(o["aesthetic_score"] for o in out if not isinstance(o, Filtered)) == sorted(scores)[1:]


def test_a_head_for_other_dimensions_is_a_record_error(tiny_clip, clips, tmp_path):
    path = tmp_path / "l14.pth"
    torch.save(laion_head(768), path)
    stage = _aesthetic(tiny_clip, path)
    [out] = stage.process([{"id": "a", "video": clips["s0"]}])
    assert isinstance(out, StageError) and out.error_type == "ModelMismatch" and "768" in out.message


def test_reelflow_check_validates_the_steps_keys_and_the_head_file(tmp_path, tiny_clip, head_path):
    import subprocess
    import sys

    import yaml

    from tests.harness import REPO, _env

    def check(steps) -> subprocess.CompletedProcess:
        config = tmp_path / "c.yaml"
        config.write_text(yaml.safe_dump({"steps": steps}))
        return subprocess.run(
            [sys.executable, "-m", "daemon.cli", "check", "--offline", "--config", str(config)],
            cwd=REPO,
            env=_env(None),
            capture_output=True,
            text=True,
            timeout=120,
        )

    embed = {"type": "VideoEmbedder", "name": "CLIPEmbedder", "config": {"model_path": str(tiny_clip)}}
    score = {"type": "VideoFilter", "name": "AestheticFilter", "config": {"model_path": str(tiny_clip)}}
    dedup = {"type": "VideoFilter", "name": "NearDuplicateFilter", "config": {"threshold": 0.99}}
    good = check([embed, {**score, "config": {**score["config"], "head_path": str(head_path)}}, dedup])
    assert good.returncode == 0, good.stdout + good.stderr
    bad = check(
        [
            {**embed, "config": {**embed["config"], "num_frame": 4}},
            {**score, "config": {**score["config"], "head_path": str(tmp_path / "nope.pth")}},
        ]
    )
    assert bad.returncode == 2
    assert "num_frame" in bad.stderr + bad.stdout and "did you mean 'num_frames'" in bad.stderr + bad.stdout
    missing = check([{**score, "config": {**score["config"], "head_path": str(tmp_path / "nope.pth")}}])
    assert missing.returncode == 2 and "head_path" in missing.stdout + missing.stderr
