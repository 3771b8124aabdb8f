"""The shared CLIP wrapper (stages/engines/clip.py) on a tiny random-weight CLIP loaded from disk."""

from __future__ import annotations

import numpy as np
import pytest

from stages.engines.clip import ClipEncoder
from tests.tiny.clip import TINY_CLIP_DIM


@pytest.fixture(scope="module")
def encoder(tiny_clip):
    return ClipEncoder(str(tiny_clip), "cpu").load()


def test_image_embeddings_are_unit_rows_and_deterministic(encoder):
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (3, 40, 52, 3), dtype=np.uint8)
    first = encoder.image_embeddings(frames)
    assert first.shape == (3, TINY_CLIP_DIM) and first.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(encoder.image_embeddings(list(frames)), first, atol=1e-6)
    # a slightly noisy copy is closer to its original than to another frame
    noisy = np.clip(frames[0].astype(int) + rng.integers(-3, 4, frames[0].shape), 0, 255).astype(np.uint8)
    copy = encoder.image_embeddings(noisy[None])[0]
    assert copy @ first[0] > max(copy @ first[1], copy @ first[2])


def test_chunks_give_the_same_rows(tiny_clip):
    frames = np.random.default_rng(1).integers(0, 256, (5, 28, 28, 3), dtype=np.uint8)
    whole = ClipEncoder(str(tiny_clip), "cpu").load().image_embeddings(frames)
    chunked = ClipEncoder(str(tiny_clip), "cpu", max_images=2).load().image_embeddings(frames)
    np.testing.assert_allclose(chunked, whole, atol=1e-5)


def test_text_embeddings(encoder):
    texts = ["a cat playing with a ball", "a city street at night", "a cat playing with a ball"]
    rows = encoder.text_embeddings(texts)
    assert rows.shape == (3, TINY_CLIP_DIM)
    np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(rows[0], rows[2], atol=1e-6)
    assert rows[0] @ rows[1] < 0.9999
    assert encoder.text_embeddings([]).shape == (0, TINY_CLIP_DIM)


def test_not_a_dual_encoder_is_refused(tmp_path):
    from tests.tiny.text_lm import build_text_lm

    folder = build_text_lm(tmp_path / "lm")
    with pytest.raises((ValueError, OSError), match="CLIP|processor|Processor"):
        ClipEncoder(str(folder), "cpu").load()
