"""What the text steps share: building the chat messages for a record, the request loop
(records -> chats -> answers back in their slots), checking JSON answers, and keeping secrets
out of messages.

The user message of a record is either a template (the prompt has `{field}` placeholders,
filled from the record; write literal braces as `{{` and `}}`), or the prompt followed by
the record's `text_key` content on the next line. A record without that field is an error
(`MissingField`) in its own slot, never a request made from the prompt alone.
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

from pydantic import AfterValidator

from stages.base import RECORD_ID, StageError, format_prompt, missing_field
from stages.engines import Generation

# A placeholder is `{name}`, `{name.attr}` or `{name[key]}`; a JSON example such as
# `{"a": 1}` is not one, so such prompts are used verbatim.
_PLACEHOLDER = re.compile(r"(?<!\{)\{([A-Za-z_][A-Za-z0-9_]*)(?:[.\[][^{}]*)?\}(?!\})")


def placeholder_fields(prompt: str | None) -> list[str]:
    """The record fields a prompt template uses; empty when the prompt is not a template."""
    return list(dict.fromkeys(_PLACEHOLDER.findall(prompt or "")))


def check_template(prompt: str | None) -> str | None:
    """Config-time check: a template must parse as a `str.format` template."""
    if not placeholder_fields(prompt):
        return prompt
    try:
        list(string.Formatter().parse(prompt))
    except ValueError as bad:
        raise ValueError(
            f"the prompt has {{field}} placeholders but is not a valid template ({bad}); "
            "write literal braces as {{ and }}"
        ) from None
    return prompt


# A config key holding a prompt that may be a template: checked when the config is read.
PromptTemplate = Annotated[str | None, AfterValidator(check_template)]


def check_tensor_parallel(tensor_parallel_size: int, backend: str) -> None:
    """Config-time check: only vLLM splits a model over GPUs."""
    if tensor_parallel_size > 1 and backend != "vllm":
        raise ValueError(
            f"tensor_parallel_size={tensor_parallel_size} splits the model over GPUs, which only "
            f"backend: vllm does (backend is {backend}); set backend: vllm or tensor_parallel_size: 1"
        )


def user_message(prompt: str | None, record: dict[str, Any], text_key: str, *, where: str) -> str:
    """The user turn for one record (see the module docstring)."""
    if placeholder_fields(prompt):
        return format_prompt(prompt, record, where=where)
    text = record.get(text_key)
    if text is None:
        raise missing_field(where, text_key, record, fix="set `text_key`, or use a prompt template")
    # A structured caption (output_format: json) is an object: the model reads it as JSON, not as
    # Python's repr of a dict.
    text = json.dumps(text, ensure_ascii=False) if isinstance(text, dict | list) else str(text)
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


def prompt_inputs(prompt: str | None, text_key: str) -> dict[str, str]:
    """A text step's input fields: the template's placeholders, else the record's `text_key`."""
    fields = placeholder_fields(prompt)
    return dict.fromkeys(fields, "text") if fields else {text_key: "text"}


@dataclass
class ChatBatch:
    """One batch as chats: a record that cannot become a chat holds its error in its slot at once;
    the others get their answers back in place with `finish`. The request loop of every text step."""

    results: list[dict[str, Any] | StageError] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)
    chats: list[list[dict[str, str]]] = field(default_factory=list)
    record_ids: list[str] = field(default_factory=list)

    @classmethod
    def of(
        cls, batch: list[dict[str, Any]], *, system: str | None, prompt: str | None, text_key: str, stage: str
    ) -> ChatBatch:
        chats = cls()
        for record in batch:
            try:
                user = user_message(prompt, record, text_key, where=f"{stage} (record {record.get(RECORD_ID)})")
            except StageError as error:
                chats.results.append(error)
                continue
            chats.slots.append(len(chats.results))
            chats.results.append({})
            chats.chats.append(chat_messages(system, user))
            chats.record_ids.append(str(record.get(RECORD_ID)))
        return chats

    def finish(
        self,
        outcomes: list[Generation | StageError],
        usage: Counter[str],
        answer: Callable[[Generation], dict[str, Any]],
    ) -> list[dict[str, Any] | StageError]:
        """Put each answer (`answer(generation)`, which may raise a StageError) in its record's slot."""
        for slot, outcome in zip(self.slots, outcomes, strict=True):
            if isinstance(outcome, StageError):
                self.results[slot] = outcome
                continue
            usage["tokens_in"] += outcome.tokens_in
            usage["tokens_out"] += outcome.tokens_out
            try:
                self.results[slot] = answer(outcome)
            except StageError as error:
                self.results[slot] = error
        return self.results
