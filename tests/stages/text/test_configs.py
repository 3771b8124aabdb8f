"""The shipped text configs validate (the chain's other steps may not be registered yet), and the
expanded key stays a secret in the parsed config."""

from __future__ import annotations

import pytest

from daemon.config import ConfigError, load_config
from stages.registry import known_stages
from tests.harness import REPO
from tests.stages.conftest import SECRET

CONFIGS = REPO / "configs"


@pytest.fixture(autouse=True)
def key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)


@pytest.mark.parametrize("name", ["text_rewrite.yaml", "text_local.yaml"])
def test_text_configs_validate(name):
    text = (CONFIGS / name).read_text()
    assert text.startswith("# reelflow ")  # the command that runs it comes first
    config = load_config(CONFIGS / name)
    (step,) = config.steps
    assert step.type == "TextGenerator"
    if name == "text_rewrite.yaml":
        assert step.config.api_key.get_secret_value() == SECRET
        assert SECRET not in repr(step.config) and SECRET not in step.config.model_dump_json()
        assert step.config.response_format == "json_object" and step.config.input_fields() == {"caption": "text"}


def test_caption_rewrite_generate_chain():
    path = CONFIGS / "caption_rewrite_generate.yaml"
    assert path.read_text().startswith("# reelflow serve")
    registered = known_stages()
    try:
        config = load_config(path)
    except ConfigError as error:
        # Steps 0 and 2 belong to other stage families; the text step itself must be clean.
        assert not [p for p in error.problems if p.startswith("steps[1]")], error.problems
        others = {0: ("VideoCaptioner", "Qwen2VLCaptioner"), 2: ("VideoGenerator", "CogVideoXT2VGenerator")}
        assert any(others[i] not in registered for i in others)  # not registered yet: that is the only excuse
        return
    rewrite = config.steps[1]
    assert (rewrite.name, rewrite.config.output_key) == ("GPTTextGenerator", "gen_prompt")


def test_a_structured_caption_reaches_the_model_as_json():
    """A captioner with output_format: json leaves an object in text_key; a text step after it
    must send that object as JSON (what the model was asked to read), not Python's dict repr."""
    from stages.text.common import user_message

    caption = {"subject": "a heron", "action": "lands", "camera": "static", "tags": ["bird", "water"]}
    message = user_message("Rewrite this caption as a prompt:", {"text": caption}, "text", where="step")
    assert message == 'Rewrite this caption as a prompt:\n{"subject": "a heron", "action": "lands", ' + (
        '"camera": "static", "tags": ["bird", "water"]}'
    )
    assert user_message(None, {"text": "a plain caption"}, "text", where="step") == "a plain caption"
