"""Structured captions (`output_format: json`): the schema check at config time, the instruction
added to the prompt, and the check of each answer against `json_schema`.

On the vLLM backend the schema also constrains decoding (`vllm_structured_params`), so an
answer is valid unless it was cut off by `max_new_tokens`; on transformers the answer is
checked here and the captioner samples again (`json_retries`). An answer that never passes
becomes an `InvalidStructuredCaption` error that names the field and what the schema expected.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from stages.base import StageError


def check_schema(schema: dict[str, Any]) -> None:
    """Config-time: the schema is a valid JSON Schema (the draft it declares, else 2020-12)."""
    import jsonschema

    validator = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        validator.check_schema(schema)
    except jsonschema.SchemaError as bad:
        where = "/".join(str(p) for p in bad.path) or "(top level)"
        raise ValueError(f"json_schema is not a valid JSON Schema at {where}: {bad.message}") from None


def schema_instruction(schema: dict[str, Any]) -> str:
    """What the prompt gains so the model knows the shape it must answer in."""
    return "\nAnswer only with one JSON object, no other text, that matches this JSON Schema:\n" + json.dumps(
        schema, separators=(",", ":"), sort_keys=True
    )


@dataclass(frozen=True)
class Invalid:
    """Why one answer is not a valid structured caption (`field` is a JSON path, or None)."""

    field: str | None
    message: str
    answer: str


class StructuredCaptions:
    """Parses and validates answers against one schema (built once per config)."""

    def __init__(self, schema: dict[str, Any]):
        import jsonschema

        self.schema = schema
        cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
        self.validator = cls(schema)

    def parse(self, text: str) -> dict[str, Any] | Invalid:
        import jsonschema

        try:
            value = json.loads(_strip_fence(text))
        except ValueError as bad:
            return Invalid(None, f"the answer is not JSON ({bad})", text)
        error = jsonschema.exceptions.best_match(self.validator.iter_errors(value))
        if error is None:
            return value
        field = "/".join(str(p) for p in error.absolute_path) or None
        if field is None and error.validator == "required":
            field = _missing_property(error)
        expected = "/".join(str(p) for p in error.absolute_schema_path)
        return Invalid(field, f"{error.message} (schema rule {expected})", text)

    def error(self, stage: str, invalid: Invalid, tries: int, sampled: bool) -> StageError:
        expected = ", ".join(self.schema.get("required", [])) or "the schema's properties"
        where = f"field {invalid.field!r}" if invalid.field else f"the caption (expected an object with {expected})"
        retry = (
            f"after {tries} tries"
            if sampled
            else "(one try: greedy decoding repeats the same answer; set temperature > 0 to use json_retries)"
        )
        return StageError(
            f"{stage}: the structured caption is invalid {retry}: {where}: {invalid.message}; last answer: "
            f"{invalid.answer[:200]!r}. Use a model that follows the schema, simplify json_schema, raise "
            "max_new_tokens if the answer was cut off, or raise json_retries",
            error_type="InvalidStructuredCaption",
        )


def caption_text(value: str | dict[str, Any]) -> str:
    """The words of a caption, for length and CLIP scores (a structured one: its values joined)."""
    if isinstance(value, str):
        return value
    parts: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for item in node.values():
                walk(item)
        elif isinstance(node, list):
            for item in node:
                walk(item)
        elif node is not None:
            parts.append(str(node))

    walk(value)
    return ". ".join(parts)


def vllm_structured_params(schema: dict[str, Any]) -> dict[str, Any]:
    """SamplingParams kwargs that constrain decoding to `schema` (vLLM >= 0.11; older: guided_decoding).

    JSON's grammar allows any whitespace between tokens, and a weak model can spend
    max_new_tokens on it; vLLM turns that off per engine, not per request: engine_args
    `structured_outputs_config: {backend: xgrammar, disable_any_whitespace: true}`."""
    try:
        from vllm.sampling_params import StructuredOutputsParams
    except ImportError:
        from vllm.sampling_params import GuidedDecodingParams

        return {"guided_decoding": GuidedDecodingParams(json=schema)}
    return {"structured_outputs": StructuredOutputsParams(json=schema)}


def _strip_fence(text: str) -> str:
    """Chat models often wrap JSON in a ```json fence; the object inside is the answer."""
    stripped = text.strip()
    if stripped.startswith("```"):
        stripped = stripped.split("\n", 1)[1] if "\n" in stripped else ""
        stripped = stripped.rsplit("```", 1)[0]
    return stripped


def _missing_property(error: Any) -> str | None:
    """jsonschema says "'camera' is a required property"; the field is the quoted name."""
    missing = [
        name for name in error.validator_value if isinstance(error.instance, dict) and name not in error.instance
    ]
    return missing[0] if missing else None
