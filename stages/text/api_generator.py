"""APIGenerator (`type: TextGenerator`): DataFlow-Gen's API text step.

    - type: TextGenerator
      name: APIGenerator
      config:
        model_id: "openai:gpt-4o"     # provider:model
        prompt: "You are a helpful assistant"   # the SYSTEM prompt, as in DataFlow-Gen

The key comes from the environment, never from the file: `<PROVIDER>_API_KEY` (e.g.
OPENAI_API_KEY) unless `api_key_env` names another variable. Known providers have their
endpoint built in; any other provider works with an explicit `base_url`. Requests go
through the same client and retry policy as GPTTextGenerator.
"""

from __future__ import annotations

import os
import re
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from stages.base import FieldKind, Requirements, Resources, Stage, StageConfig, StageError
from stages.engines import Generation
from stages.text.api_client import APIRequest, ChatAPI
from stages.text.common import ChatBatch, PromptTemplate, check_json_object, prompt_inputs

PROVIDERS: dict[str, str] = {
    "openai": "https://api.openai.com/v1",
    "deepseek": "https://api.deepseek.com/v1",
    "together": "https://api.together.xyz/v1",
    "groq": "https://api.groq.com/openai/v1",
    "mistral": "https://api.mistral.ai/v1",
    "openrouter": "https://openrouter.ai/api/v1",
}

_MODEL_ID = re.compile(r"^([A-Za-z][A-Za-z0-9_-]*):(.+)$")


class APIGeneratorConfig(StageConfig):
    heavy_keys: ClassVar[frozenset[str]] = StageConfig.heavy_keys | {"model_id"}

    model_id: str = Field(description='provider:model, e.g. "openai:gpt-4o".')
    base_url: str | None = Field(None, description="Endpoint root; default: the provider's own.")
    api_key_env: str | None = Field(
        None, description="Environment variable holding the key (default: <PROVIDER>_API_KEY)."
    )
    prompt: str | None = Field("You are a helpful assistant", description="System prompt (DataFlow-Gen's meaning).")
    user_prompt: PromptTemplate = Field(
        None, description="Put before the record's text in the user turn, or a template with {field} placeholders."
    )
    temperature: float = Field(0.7, ge=0, le=2, description="Sampling temperature.")
    top_p: float | None = Field(None, gt=0, le=1, description="Nucleus sampling mass (default: the server's).")
    seed: int | None = Field(None, description="Sampling seed, where the provider supports one.")
    max_tokens: int | None = Field(None, ge=1, description="Most tokens per answer.")
    # DataFlow-Gen's configs/TextGeneration.yaml names these sampling keys too.
    stop: str | list[str] | None = Field(None, description="Stop sequence(s), passed to the API.")
    presence_penalty: float | None = Field(None, ge=-2, le=2, description="Presence penalty, passed to the API.")
    frequency_penalty: float | None = Field(None, ge=-2, le=2, description="Frequency penalty, passed to the API.")
    n: int = Field(1, ge=1, description="Answers per request: only 1 (a record has one answer field).")
    stream: bool = Field(False, description="Only false: answers are stored whole, so streaming gains nothing.")
    response_format: Literal["text", "json_object"] = Field(
        "text", description="json_object: accept only JSON objects."
    )
    output_key: str | None = Field(None, description="Record field for the answer (default: text_key).")
    max_num_seqs: int = Field(8, ge=1, le=1024, description="Most requests in flight at once (per worker).")
    timeout_s: float = Field(60.0, gt=0, description="Deadline of one request attempt.")
    max_retries: int = Field(4, ge=0, le=50, description="Retries on timeouts, connection errors, 408, 429, 5xx.")
    backoff_s: float = Field(1.0, ge=0, description="First retry waits about this long, doubling each time.")
    max_backoff_s: float = Field(30.0, gt=0, description="Longest wait; a longer Retry-After fails the record.")

    @field_validator("model_id")
    @classmethod
    def _provider_model(cls, value: str) -> str:
        if not _MODEL_ID.match(value):
            raise ValueError(f'model_id must be "provider:model", e.g. "openai:gpt-4o", got {value!r}')
        return value

    @field_validator("n")
    @classmethod
    def _one_answer(cls, value: int) -> int:
        if value != 1:
            raise ValueError(
                f"n: {value} would ask for {value} answers per record, but a record keeps one answer in output_key; "
                "set n: 1 (for several answers, add one APIGenerator step per answer with its own output_key and seed)"
            )
        return value

    @field_validator("stream")
    @classmethod
    def _whole_answers(cls, value: bool) -> bool:
        if value:
            raise ValueError(
                "stream: true is not supported: the answer is written to the results whole, once complete, so "
                "streaming its tokens gains nothing here; remove stream (or set it to false)"
            )
        return value

    @model_validator(mode="after")
    def _endpoint_and_key(self) -> APIGeneratorConfig:
        if self.provider not in PROVIDERS and self.base_url is None:
            raise ValueError(
                f"unknown provider {self.provider!r} in model_id; known: {', '.join(PROVIDERS)}; "
                "for another OpenAI-compatible provider set base_url"
            )
        if self.base_url is not None and not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {self.base_url!r}")
        if not os.environ.get(self.key_env):
            raise ValueError(f"APIGenerator takes its key from the environment: set {self.key_env} (or api_key_env)")
        return self

    @property
    def provider(self) -> str:
        return self.model_id.split(":", 1)[0].lower()

    @property
    def model(self) -> str:
        return self.model_id.split(":", 1)[1]

    @property
    def key_env(self) -> str:
        return self.api_key_env or f"{self.provider.upper().replace('-', '_')}_API_KEY"

    @property
    def endpoint(self) -> str:
        return (self.base_url or PROVIDERS[self.provider]).rstrip("/")

    def input_fields(self) -> dict[str, FieldKind]:
        return prompt_inputs(self.user_prompt, self.text_key)


class APIGenerator(Stage):
    """One chat completion per record from a provider:model id; the key from the environment."""

    registered_as = ("TextGenerator",)

    Config = APIGeneratorConfig
    config: APIGeneratorConfig
    name = "APIGenerator"

    @classmethod
    def resources(cls, config: APIGeneratorConfig) -> Resources:
        return Resources(accelerators=0, concurrency_slots=config.max_num_seqs, asynchronous=True)

    @classmethod
    def requirements(cls, config: APIGeneratorConfig) -> Requirements:
        return Requirements.of("text", "openai")

    def __init__(self, config: APIGeneratorConfig, device: str = "cpu"):
        super().__init__(config, device)
        self.lm = ChatAPI(lambda: self.usage, self.name)

    def load(self) -> None:
        from stages.base import require

        require("openai", stage=self.name, extra="text")
        self._key()

    def _key(self) -> str:
        key = os.environ.get(self.config.key_env)
        if not key:
            raise RuntimeError(f"{self.name}: the environment variable {self.config.key_env} is not set")
        return key

    def _request(self, cfg: APIGeneratorConfig, chats: ChatBatch) -> APIRequest:
        body: dict[str, Any] = {"model": cfg.model, "temperature": cfg.temperature}
        optional = {
            "top_p": cfg.top_p,
            "seed": cfg.seed,
            "max_tokens": cfg.max_tokens,
            "stop": cfg.stop,
            "presence_penalty": cfg.presence_penalty,
            "frequency_penalty": cfg.frequency_penalty,
        }
        body.update({k: v for k, v in optional.items() if v is not None})
        json_mode = cfg.response_format == "json_object"
        if json_mode:
            body["response_format"] = {"type": "json_object"}
        return APIRequest(cfg, body, cfg.endpoint, self._key(), json_mode, chats.record_ids)

    async def aprocess(self, batch: list[dict[str, Any]]) -> list[dict[str, Any] | StageError]:
        cfg = self.config
        chats = ChatBatch.of(batch, system=cfg.prompt, prompt=cfg.user_prompt, text_key=cfg.text_key, stage=self.name)
        if not chats.chats:
            return chats.results
        outcomes = await self.lm.agenerate(chats.chats, self._request(cfg, chats))
        output_key = cfg.output_key or cfg.text_key

        def answer(generation: Generation) -> dict[str, Any]:
            return {
                output_key: check_json_object(generation.text)
                if cfg.response_format == "json_object"
                else generation.text
            }

        return chats.finish(outcomes, self.usage, answer)

    def close(self) -> None:
        self.lm.close()
