"""GPTTextGenerator (`type: TextGenerator`): one chat completion per record over any
OpenAI-compatible API (OpenAI, vLLM's server, llama.cpp's server, `transformers serve`, ...).

    - type: TextGenerator
      name: GPTTextGenerator
      config:
        model: gpt-4o-mini
        api_key: ${OPENAI_API_KEY}
        base_url: http://127.0.0.1:8000/v1   # optional; default: api.openai.com
        max_num_seqs: 8                        # requests in flight
        temperature: 0.7
        sys_prompt: "You rewrite video captions into prompts for a video generator."
        prompt: "Rewrite this caption:"       # followed by the record's text_key content
        batch_size: 16

The answer goes to `output_key` (default: `text_key`). `response_format: json_object` asks
for JSON and accepts only answers that parse as a JSON object (others are retried).
`backend: transformers` runs the same config on a local causal LM instead
(stages/engines/hf_causal.py: `model` is a local folder or a cached hub id, one left-padded
`generate` per batch, `max_tokens` defaults to 256, a non-JSON answer in JSON mode is an error,
since there is no server to retry against); `backend: vllm` on a local vLLM engine
(stages/text/vllm_backend.py, prompts tokenized as transformers does, so greedy answers match);
`backend: auto` picks vLLM when it is installed and the worker's device is a GPU, else
transformers. The API keys are then unused. One class holds whichever backend the config
chooses (`self.lm`), as the captioners do; the request loop is `ChatBatch`'s.
"""

from __future__ import annotations

import importlib.util
from typing import Any, ClassVar, Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from stages.base import FieldKind, Requirements, Resources, Stage, StageConfig, StageError
from stages.engines import Generation, choose_backend
from stages.text.api_client import APIRequest, ChatAPI
from stages.text.common import ChatBatch, PromptTemplate, check_json_object, check_tensor_parallel, prompt_inputs


class GPTTextGeneratorConfig(StageConfig):
    # `model` names the local weights under backend: transformers (a reload is cheap for an API).
    heavy_keys: ClassVar[frozenset[str]] = StageConfig.heavy_keys | {
        "model",
        "max_model_len",
        "gpu_memory_utilization",
        "engine_args",
    }

    backend: Literal["openai", "transformers", "vllm", "auto"] = Field(
        "openai",
        description="openai: any OpenAI-compatible HTTP API; transformers: a local causal LM; vllm: a local vLLM "
        "engine; auto: vllm when installed and on a GPU, else transformers.",
    )
    model: str = Field(
        description="Model name the endpoint serves (transformers: a local folder, a hub id, or a .gguf file)."
    )
    api_key: SecretStr | None = Field(
        None,
        description="API key; write `${OPENAI_API_KEY}` to take it from the environment. Default: "
        "$OPENAI_API_KEY for api.openai.com, none for a base_url.",
    )
    base_url: str | None = Field(None, description="Endpoint root, e.g. http://127.0.0.1:8000/v1 (default: OpenAI).")
    max_num_seqs: int = Field(8, ge=1, le=1024, description="Most requests in flight at once (per worker).")
    temperature: float = Field(0.7, ge=0, le=2, description="Sampling temperature (0: greedy).")
    sys_prompt: str | None = Field(None, description="System message.")
    prompt: PromptTemplate = Field(
        None,
        description="Put before the record's text_key content in the user message; or a template with "
        "{field} placeholders filled from the record (then text_key is not appended).",
    )
    max_tokens: int | None = Field(None, ge=1, description="Most tokens per answer (default: the server's).")
    response_format: Literal["text", "json_object"] = Field(
        "text", description="json_object: ask for JSON and accept only answers that parse as a JSON object."
    )
    output_key: str | None = Field(None, description="Record field for the answer (default: text_key).")
    timeout_s: float = Field(60.0, gt=0, description="Deadline of one request attempt, connection included.")
    max_retries: int = Field(4, ge=0, le=50, description="Retries on timeouts, connection errors, 408, 429, 5xx.")
    backoff_s: float = Field(1.0, ge=0, description="First retry waits about this long, doubling each time.")
    max_backoff_s: float = Field(
        30.0, gt=0, description="Longest wait between retries; a longer Retry-After fails the record instead."
    )
    extra_body: dict[str, Any] | None = Field(
        None, description="Extra JSON fields sent with each request (server-specific, e.g. vLLM's top_k)."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="local backends only: weight dtype."
    )
    max_model_len: int | None = Field(None, ge=16, description="backend: vllm: context length (default: the model's).")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="backend: vllm: share of GPU memory to use.")
    tensor_parallel_size: int = Field(1, ge=1, description="backend: vllm: GPUs per engine.")
    engine_args: dict[str, Any] = Field(
        default_factory=dict, description="backend: vllm: extra AsyncEngineArgs, e.g. {enforce_eager: true}."
    )

    @field_validator("response_format", mode="before")
    @classmethod
    def _openai_form(cls, value: Any) -> Any:
        # Accept OpenAI's own spelling too: {"type": "json_object"}.
        if isinstance(value, dict) and set(value) == {"type"}:
            return value["type"]
        return value

    @field_validator("api_key", mode="before")
    @classmethod
    def _key_as_text(cls, value: Any) -> Any:
        # A key YAML reads as a number would otherwise be echoed in the validation error.
        return str(value) if isinstance(value, int | float) else value

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError(
                f"base_url must start with http:// or https://, got {value!r} (e.g. http://127.0.0.1:8000/v1)"
            )
        return value.rstrip("/") if value else value

    @model_validator(mode="after")
    def _backend_keys(self) -> GPTTextGeneratorConfig:
        check_tensor_parallel(self.tensor_parallel_size, self.backend)
        if self.backend != "openai":
            given = sorted({"base_url", "api_key", "extra_body"} & self.model_fields_set)
            if given:
                raise ValueError(
                    f"backend: {self.backend} runs the model locally and cannot use {', '.join(given)}; "
                    "remove them, or set backend: openai to call an API"
                )
        return self

    def input_fields(self) -> dict[str, FieldKind]:
        return prompt_inputs(self.prompt, self.text_key)


class GPTTextGenerator(Stage):
    """Chat completions over an OpenAI-compatible API, or the same config on a local LM (`backend`)."""

    registered_as = ("TextGenerator",)

    Config = GPTTextGeneratorConfig
    config: GPTTextGeneratorConfig
    name = "GPTTextGenerator"

    @classmethod
    def resources(cls, config: GPTTextGeneratorConfig) -> Resources:
        # `auto` resolves on the worker's device at load; a GPU worker with vLLM installed gets vLLM.
        vllm = config.backend == "vllm" or (config.backend == "auto" and importlib.util.find_spec("vllm") is not None)
        if config.backend == "openai":
            return Resources(accelerators=0, concurrency_slots=config.max_num_seqs, asynchronous=True)
        if vllm:
            return Resources(
                accelerators=config.tensor_parallel_size, concurrency_slots=config.max_num_seqs, asynchronous=True
            )
        return Resources(accelerators=1, concurrency_slots=1, asynchronous=False)  # one generate at a time

    @classmethod
    def requirements(cls, config: GPTTextGeneratorConfig) -> Requirements:
        if config.backend == "openai":
            return Requirements.of("text", "openai")
        if config.backend == "vllm":
            return Requirements.of("vllm", "vllm", "transformers", model=config.model)
        return Requirements.of("text", "torch", "transformers", model=config.model)  # auto: at least these

    def loaded_resources(self) -> Resources:
        # `auto` picks its backend at load, by the worker's device: answer for the one it picked.
        if self.backend_name == "transformers":
            return Resources(accelerators=1, concurrency_slots=1, asynchronous=False)
        return type(self).resources(self.config)

    def __init__(self, config: GPTTextGeneratorConfig, device: str = "cpu"):
        super().__init__(config, device)
        self.backend_name = "openai" if config.backend == "openai" else None  # local: chosen at load
        self.lm: Any = ChatAPI(lambda: self.usage, self.name) if config.backend == "openai" else None

    def load(self) -> None:
        from stages.base import require

        cfg = self.config
        if cfg.backend == "openai":
            require("openai", stage=self.name, extra="text")
            self._api_key()  # fail at start-up, not per record, when no key can be found
            return
        self.backend_name = choose_backend(cfg.backend, self.device, self.name)
        if self.backend_name == "vllm":
            from stages.text.vllm_backend import VLLMTextLM, load_tokenizer

            engine_args = {
                "model": cfg.model,
                "dtype": cfg.dtype,
                "max_num_seqs": cfg.max_num_seqs,
                "max_model_len": cfg.max_model_len,
                "gpu_memory_utilization": cfg.gpu_memory_utilization,
                "tensor_parallel_size": cfg.tensor_parallel_size,
                "disable_log_stats": True,
                **cfg.engine_args,
            }
            tokenizer = load_tokenizer(cfg.model, stage=self.name)
            self.lm = VLLMTextLM(engine_args, self.device, cfg.max_num_seqs, self.name, tokenizer)
        else:
            from stages.engines.hf_causal import CausalLM

            self.lm = CausalLM(cfg.model, self.device, stage=self.name, dtype=cfg.dtype)
        self.lm.load()

    def _api_key(self) -> str:
        import os

        if self.config.api_key is not None:
            return self.config.api_key.get_secret_value()
        if self.config.base_url is None:
            key = os.environ.get("OPENAI_API_KEY")
            if not key:
                raise RuntimeError(
                    "GPTTextGenerator calls api.openai.com but has no key: set api_key: ${OPENAI_API_KEY} "
                    "(and export OPENAI_API_KEY), or set base_url to your own server"
                )
            return key
        return "EMPTY"  # local servers take any key; never send the environment's key to a third party

    def _settings(self, cfg: GPTTextGeneratorConfig, chats: ChatBatch):
        """The backend's per-batch settings: an APIRequest for the API, else the local Sampling."""
        if self.backend_name != "openai":
            from stages.engines.hf_causal import Sampling

            return Sampling(max_tokens=cfg.max_tokens or 256, temperature=cfg.temperature)
        body: dict[str, Any] = {"model": cfg.model, "temperature": cfg.temperature}
        if cfg.max_tokens is not None:
            body["max_tokens"] = cfg.max_tokens
        if cfg.response_format == "json_object":
            body["response_format"] = {"type": "json_object"}
        if cfg.extra_body:
            body["extra_body"] = dict(cfg.extra_body)
        json_mode = cfg.response_format == "json_object"
        return APIRequest(cfg, body, cfg.base_url, self._api_key(), json_mode, chats.record_ids)

    def _chats(self, cfg: GPTTextGeneratorConfig, batch: list[dict[str, Any]]) -> ChatBatch:
        return ChatBatch.of(batch, system=cfg.sys_prompt, prompt=cfg.prompt, text_key=cfg.text_key, stage=self.name)

    def _finish(self, cfg: GPTTextGeneratorConfig, chats: ChatBatch, outcomes: list) -> list:
        output_key = cfg.output_key or cfg.text_key
        json_mode = cfg.response_format == "json_object"

        def answer(generation: Generation) -> dict[str, Any]:
            return {output_key: check_json_object(generation.text) if json_mode else generation.text}

        return chats.finish(outcomes, self.usage, answer)

    def process(self, batch: list[dict[str, Any]]) -> list[dict[str, Any] | StageError]:
        cfg = self.config  # one snapshot per batch: a hot reload applies from the next batch
        chats = self._chats(cfg, batch)
        if not chats.chats:
            return chats.results
        return self._finish(cfg, chats, self.lm.generate(chats.chats, self._settings(cfg, chats)))

    async def aprocess(self, batch: list[dict[str, Any]]) -> list[dict[str, Any] | StageError]:
        # Awaited on the runtime's loop for the API and vLLM (resources() says so), which keep
        # max_num_seqs requests in flight; the transformers backend's agenerate runs in a thread.
        cfg = self.config
        chats = self._chats(cfg, batch)
        if not chats.chats:
            return chats.results
        return self._finish(cfg, chats, await self.lm.agenerate(chats.chats, self._settings(cfg, chats)))

    def close(self) -> None:
        if self.lm is not None:
            self.lm.close()
        if self.backend_name != "openai":
            self.lm = None
