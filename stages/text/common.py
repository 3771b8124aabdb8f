"""What the text steps share: building the chat messages for a record, checking JSON answers,
and keeping secrets out of messages.

The user message of a record is either a template (the prompt has `{field}` placeholders,
filled from the record; write literal braces as `{{` and `}}`), or the prompt followed by
the record's `text_key` content on the next line. A record without that field is an error
(`MissingField`) in its own slot, never a request made from the prompt alone.
"""

from __future__ import annotations

import json
import re
import string
from typing import Any

from stages.base import StageError, format_prompt

# A placeholder is `{name}`, `{name.attr}` or `{name[key]}`; a JSON example such as
# `{"a": 1}` is not one, so such prompts are used verbatim.
_PLACEHOLDER = re.compile(r"(?<!\{)\{([A-Za-z_][A-Za-z0-9_]*)(?:[.\[][^{}]*)?\}(?!\})")


def template_fields(prompt: str | None) -> list[str]:
    """The record fields a prompt template uses; empty when the prompt is not a template."""
    return list(dict.fromkeys(_PLACEHOLDER.findall(prompt or "")))


def check_template(prompt: str | None) -> str | None:
    """Config-time check: a template must parse as a `str.format` template."""
    if not template_fields(prompt):
        return prompt
    try:
        list(string.Formatter().parse(prompt))
    except ValueError as bad:
        raise ValueError(
            f"the prompt has {{field}} placeholders but is not a valid template ({bad}); "
            "write literal braces as {{ and }}"
        ) from None
    return prompt


def user_message(prompt: str | None, record: dict[str, Any], text_key: str, *, where: str) -> str:
    """The user turn for one record (see the module docstring)."""
    if template_fields(prompt):
        return format_prompt(prompt, record, where=where)
    text = record.get(text_key)
    if text is None:
        raise StageError(
            f"{where}: the record has no field {text_key!r} (fields: "
            f"{sorted(k for k in record if not k.startswith('_'))}); set `text_key`, or use a prompt template",
            error_type="MissingField",
        )
    text = str(text)
    if not text.strip() and not prompt:
        raise StageError(f"{where}: {text_key!r} is empty and no prompt is configured", error_type="EmptyText")
    return f"{prompt}\n{text}" if prompt else text


def chat_messages(system: str | None, user: str) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": user})
    return messages


def check_json_object(text: str) -> str:
    """Accept an answer in JSON mode only if it is one JSON object; return it unchanged."""
    try:
        value = json.loads(text)
    except (TypeError, ValueError) as bad:
        raise StageError(
            f"response_format is json_object but the model's answer is not valid JSON ({bad}): {text[:200]!r}",
            error_type="InvalidJSON",
        ) from None
    if not isinstance(value, dict):
        raise StageError(
            f"response_format is json_object but the answer is a JSON {type(value).__name__}, "
            f"not an object: {text[:200]!r}",
            error_type="InvalidJSON",
        )
    return text


def redact(text: str, *secrets: str | None) -> str:
    """`text` with every secret (and its first/last 8 characters) replaced by `***`."""
    for secret in secrets:
        if not secret or len(secret) < 4:
            continue
        text = text.replace(secret, "***")
        if len(secret) >= 16:  # servers often echo a key shortened: "sk-abc...wxyz"
            text = text.replace(secret[:8], "***").replace(secret[-8:], "***")
    return text
