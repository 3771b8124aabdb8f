"""Structured captions (output_format: json): answers checked against json_schema; the tiny
random-weight captioners never write valid JSON, which is the realistic invalid case: after the
retries the record is an error that names what the schema expected."""

from __future__ import annotations

import json
import re

import pytest
from pydantic import ValidationError

from stages.base import StageError
from stages.captioners.structured import Invalid, StructuredCaptions, caption_text
from stages.registry import stage_class
from tests.stages.captioners.conftest import FAMILIES, record

SCHEMA = {
    "type": "object",
    "properties": {
        "subject": {"type": "string"},
        "action": {"type": "string"},
        "camera": {"enum": ["static", "pan", "tilt", "zoom", "handheld"]},
        "scene": {"type": "string"},
        "style": {"type": "string"},
    },
    "required": ["subject", "action", "camera"],
    "additionalProperties": False,
}


def test_valid_answers_parse_and_invalid_ones_name_the_field():
    check = StructuredCaptions(SCHEMA)
    good = {"subject": "a cyclist", "action": "rides", "camera": "pan", "scene": "a street"}
    assert check.parse(json.dumps(good)) == good
    assert check.parse("```json\n" + json.dumps(good) + "\n```") == good  # chat models' fence

    wrong_type = check.parse(json.dumps({**good, "subject": 3}))
    assert isinstance(wrong_type, Invalid) and wrong_type.field == "subject"
    assert "is not of type 'string'" in wrong_type.message
    not_in_enum = check.parse(json.dumps({**good, "camera": "drone"}))
    assert not_in_enum.field == "camera" and "'drone' is not one of" in not_in_enum.message
    missing = check.parse(json.dumps({"subject": "x", "action": "y"}))
    assert missing.field == "camera" and "required" in missing.message
    not_json = check.parse("a cyclist rides")
    assert not_json.field is None and "not JSON" in not_json.message

    error = check.error("Qwen2VLCaptioner", not_in_enum, tries=3, sampled=True)
    assert error.error_type == "InvalidStructuredCaption"
    assert "field 'camera'" in error.message and "after 3 tries" in error.message and "drone" in error.message
    assert caption_text(good) == "a cyclist. rides. pan. a street"


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_onevision", "llava_next_video"])
def test_random_model_gives_an_error_line_after_the_retries(family, make_captioner, clips):
    stage = make_captioner(
        family,
        output_format="json",
        json_schema=SCHEMA,
        json_retries=2,
        temperature=1.0,
        seed=3,
        max_new_tokens=12,
        max_model_len=1024,
    )
    prepared = stage.prepare(record(clips["bikes"]))
    text = stage.processor.decode(prepared["_caption_input"]["input_ids"][0], skip_special_tokens=True)
    assert '"camera":{"enum":["static"' in text  # the model is told the schema
    results = stage.process([prepared, record(clips["moving_h264"], rid="2")])
    for result in results:
        assert isinstance(result, StageError), result  # never a silent string
        assert result.error_type == "InvalidStructuredCaption"
        assert "after 3 tries" in result.message
        assert "expected an object with subject, action, camera" in result.message
        assert re.search(r"last answer: '.*'", result.message)
    used = stage.take_usage()
    assert used["caption_samples"] == 2 * 3 and used["json_retries"] == 2 * 2


def test_greedy_json_is_tried_once_and_says_so(make_captioner, clips):
    stage = make_captioner("qwen2_vl", output_format="json", json_schema=SCHEMA, max_model_len=1024)
    (result,) = stage.process([record(clips["bikes"])])
    assert isinstance(result, StageError) and "greedy decoding" in result.message
    assert stage.take_usage()["caption_samples"] == 1


def test_candidates_in_json_mode_all_invalid_is_an_error(make_captioner, clips):
    stage = make_captioner(
        "qwen2_vl",
        output_format="json",
        json_schema=SCHEMA,
        json_retries=1,
        num_candidates=2,
        select="longest",
        temperature=1.0,
        max_model_len=1024,
    )
    (result,) = stage.process([record(clips["bikes"])])
    assert isinstance(result, StageError) and result.error_type == "InvalidStructuredCaption"
    assert stage.take_usage()["caption_samples"] == 4


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(output_format="json"), "needs `json_schema`"),
        (dict(json_schema=SCHEMA), "output_format is text"),
        (dict(output_format="json", json_schema={"type": "objekt"}), "not a valid JSON Schema at type"),
        (dict(output_format="json", json_schema={"required": "subject"}), "not a valid JSON Schema at required"),
    ],
)
def test_schema_errors_at_config_time(settings, message, tiny_models):
    cls = stage_class("VideoCaptioner", FAMILIES["qwen2_vl"])
    with pytest.raises(ValidationError, match=re.escape(message)):
        cls.Config(model_path=str(tiny_models["qwen2_vl"]), **settings)
