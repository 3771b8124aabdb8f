"""LocalModelGenerator (`type: TextGenerator`): DataFlow-Gen's local text step, on transformers or vLLM.

It takes DataFlow-Gen's config as it stands (examples/TextGenerator.yaml there): `model_path`,
`device`, `prompt` (the SYSTEM prompt, as DataFlow-Gen uses it) and vLLM's sampling keys.
Every key is either honoured or, when set to a value transformers cannot honour, refused by
name at `reelflow check`; the seed example's no-op values (`best_of: null`,
`presence_penalty: 0`, `logprobs: null`, ...) pass.

Honoured: n (a list of n answers when n > 1), temperature, top_p, top_k, min_p,
repetition_penalty, seed (per batch: the same batch gives the same answers), stop,
stop_token_ids, ignore_eos, max_tokens, min_tokens, include_stop_str_in_output,
skip_special_tokens, truncate_prompt_tokens (keeps the prompt's last N tokens), logit_bias,
allowed_token_ids, download_dir (the weights cache).
Refused unless no-op: best_of, presence_penalty, frequency_penalty, logprobs,
prompt_logprobs, detokenize: false, spaces_between_special_tokens: false, logits_processors.

`backend: vllm` runs the step on a vLLM engine (stages/text/vllm_backend.py), awaited on the
runtime's loop like GPTTextGenerator's so max_num_seqs requests stay in flight, which honours
presence_penalty, frequency_penalty, logprobs, prompt_logprobs and
spaces_between_special_tokens too (best_of, detokenize: false and logits_processors stay
refused: vLLM's v1 engine has none of them). `backend: auto` picks vLLM when it is installed
and the device is a GPU, else transformers; since that is only known at load time, it
refuses the vLLM-only keys like transformers does. The default is `transformers`.
"""

from __future__ import annotations

import importlib.util
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from stages.base import FieldKind, Requirements, Resources, Stage, StageConfig, StageError
from stages.engines import Generation, choose_backend
from stages.engines.hf_causal import Sampling, resolve_device
from stages.text.common import ChatBatch, PromptTemplate, check_tensor_parallel, prompt_inputs

_CANNOT = "the {backend} backend cannot honour {key}={value!r} ({why}); remove it or set it to {ok}"
_VLLM_TOO = " (or set backend: vllm, which honours it)"


def _refuse(key: str, value: Any, why: str, ok: str, backend: str = "transformers") -> ValueError:
    return ValueError(_CANNOT.format(backend=backend, key=key, value=value, why=why, ok=ok))


def _vllm_honours(info) -> bool:
    return info.data.get("backend") == "vllm"


class LocalModelGeneratorConfig(StageConfig):
    heavy_keys: ClassVar[frozenset[str]] = StageConfig.heavy_keys | {
        "device",
        "download_dir",
        "max_num_seqs",
        "max_model_len",
        "gpu_memory_utilization",
        "engine_args",
    }

    model_path: str = Field(
        description="Local model folder, a .gguf file, or a hub id already in the cache / download_dir."
    )
    backend: Literal["transformers", "vllm", "auto"] = Field(
        "transformers",
        description="transformers; vllm (a vLLM engine); auto: vLLM when installed and on a GPU, else transformers.",
    )
    device: str | None = Field(
        None, description="cpu, cuda (the worker's GPU) or cuda:N; default: the worker's device (runtime `devices`)."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="Weight dtype.")
    trust_remote_code: bool = Field(False, description="Allow model code from the model folder.")
    download_dir: str | None = Field(None, description="Cache folder for weights (from_pretrained's cache_dir).")
    prompt: str | None = Field("You are a helpful assistant", description="System prompt (DataFlow-Gen's meaning).")
    user_prompt: PromptTemplate = Field(
        None, description="Put before the record's text in the user turn, or a template with {field} placeholders."
    )
    output_key: str | None = Field(None, description="Record field for the answer (default: text_key).")
    # vLLM SamplingParams names and defaults.
    n: int = Field(1, ge=1, le=64, description="Answers per record (a list when n > 1).")
    best_of: int | None = Field(None, description="vLLM only; must be null or equal to n.")
    presence_penalty: float = Field(0.0, description="vLLM only; must be 0.")
    frequency_penalty: float = Field(0.0, description="vLLM only; must be 0.")
    repetition_penalty: float = Field(1.0, gt=0, description="> 1 discourages repeating tokens.")
    temperature: float = Field(0.7, ge=0, description="0: greedy.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    top_k: int = Field(-1, ge=-1, description="-1 or 0: off.")
    min_p: float = Field(0.0, ge=0, le=1, description="Drop tokens below min_p x the top probability.")
    seed: int | None = Field(None, description="Seeds each batch's sampling.")
    stop: list[str] | str | None = Field(None, description="Stop strings (cut from the answer).")
    stop_token_ids: list[int] | None = Field(None, description="Token ids that end an answer, besides EOS.")
    ignore_eos: bool = Field(False, description="Keep generating past EOS up to max_tokens.")
    max_tokens: int = Field(256, ge=1, description="Most new tokens per answer.")
    min_tokens: int = Field(0, ge=0, description="No EOS before this many tokens.")
    logprobs: int | None = Field(None, description="vLLM only; must be null.")
    prompt_logprobs: int | None = Field(None, description="vLLM only; must be null.")
    detokenize: bool = Field(True, description="Must be true (answers are text).")
    skip_special_tokens: bool = Field(True, description="Drop special tokens from the answer.")
    spaces_between_special_tokens: bool = Field(True, description="Must be true (fast tokenizers only).")
    logits_processors: list[Any] | None = Field(None, description="vLLM only; must be null.")
    include_stop_str_in_output: bool = Field(False, description="Keep the stop string at the answer's end.")
    truncate_prompt_tokens: int | None = Field(None, ge=1, description="Keep only the prompt's last N tokens.")
    logit_bias: dict[int, float] | None = Field(None, description="Token id -> bias added to its logit.")
    allowed_token_ids: list[int] | None = Field(None, description="Only these token ids may be generated.")
    # backend: vllm only (the engine's settings).
    max_num_seqs: int = Field(64, ge=1, le=4096, description="vllm: most requests in flight per engine.")
    max_model_len: int | None = Field(None, ge=16, description="vllm: context length (default: the model's).")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="vllm: share of GPU memory to use.")
    tensor_parallel_size: int = Field(1, ge=1, description="vllm: GPUs per engine.")
    engine_args: dict[str, Any] = Field(
        default_factory=dict, description="vllm: extra AsyncEngineArgs, e.g. {enforce_eager: true}."
    )

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, value: float, info) -> float:
        if value != 0 and not _vllm_honours(info):
            raise _refuse(
                info.field_name,
                value,
                "transformers has no such logits processor; repetition_penalty is the one it has",
                "0" + _VLLM_TOO,
            )
        return value

    @field_validator("logprobs", "prompt_logprobs")
    @classmethod
    def _vllm_only(cls, value: Any, info) -> Any:
        if value is not None and not _vllm_honours(info):
            raise _refuse(info.field_name, value, "vLLM only", "null" + _VLLM_TOO)
        return value

    @field_validator("logits_processors")
    @classmethod
    def _no_processors(cls, value: Any, info) -> Any:
        if value is not None:
            backend = info.data.get("backend", "transformers")
            raise _refuse(info.field_name, value, "vLLM's v1 engine takes no per-request processors", "null", backend)
        return value

    @field_validator("detokenize")
    @classmethod
    def _detokenize(cls, value: bool, info) -> bool:
        if not value:
            backend = info.data.get("backend", "transformers")
            raise _refuse(info.field_name, value, "answers are text", "true", backend)
        return value

    @field_validator("spaces_between_special_tokens")
    @classmethod
    def _must_be_true(cls, value: bool, info) -> bool:
        if not value and not _vllm_honours(info):
            raise _refuse(info.field_name, value, "answers are always decoded by a fast tokenizer", "true" + _VLLM_TOO)
        return value

    @model_validator(mode="after")
    def _best_of(self) -> LocalModelGeneratorConfig:
        check_tensor_parallel(self.tensor_parallel_size, self.backend)
        if self.best_of is not None and self.best_of != self.n:
            raise _refuse(
                "best_of",
                self.best_of,
                "it ranked extra samples by log-probability in vLLM's old engine; the v1 engine has no best_of",
                f"null or n={self.n}",
                self.backend,
            )
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens={self.min_tokens} is larger than max_tokens={self.max_tokens}")
        return self

    def input_fields(self) -> dict[str, FieldKind]:
        return prompt_inputs(self.user_prompt, self.text_key)

    def sampling(self) -> Sampling:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return Sampling(
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            n=self.n,
            min_tokens=self.min_tokens,
            stop=stop,
            stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=self.ignore_eos,
            seed=self.seed,
            include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens,
            truncate_prompt_tokens=self.truncate_prompt_tokens,
            logit_bias=dict(self.logit_bias or {}),
            allowed_token_ids=self.allowed_token_ids,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            logprobs=self.logprobs,
            prompt_logprobs=self.prompt_logprobs,
            spaces_between_special_tokens=self.spaces_between_special_tokens,
        )

    def vllm_engine_args(self, model: str) -> dict[str, Any]:
        args: dict[str, Any] = {
            "model": model,
            "download_dir": self.download_dir,
            "trust_remote_code": self.trust_remote_code,
            "dtype": self.dtype,
            "max_num_seqs": self.max_num_seqs,
            "max_model_len": self.max_model_len,
            "gpu_memory_utilization": self.gpu_memory_utilization,
            "tensor_parallel_size": self.tensor_parallel_size,
            "disable_log_stats": True,
        }
        return {**args, **self.engine_args}


class LocalModelGenerator(Stage):
    """A local causal LM with vLLM-style sampling keys; the backend object in `self.lm`."""

    registered_as = ("TextGenerator",)

    Config = LocalModelGeneratorConfig
    config: LocalModelGeneratorConfig
    name = "LocalModelGenerator"

    lm: Any = None  # hf_causal.CausalLM or vllm_backend.VLLMTextLM
    backend_name: str | None = None

    @classmethod
    def resources(cls, config: LocalModelGeneratorConfig) -> Resources:
        gpu = config.device != "cpu"
        has_vllm = importlib.util.find_spec("vllm") is not None
        if config.backend == "vllm" or (config.backend == "auto" and gpu and has_vllm):
            return Resources(
                accelerators=config.tensor_parallel_size, concurrency_slots=config.max_num_seqs, asynchronous=True
            )
        return Resources(accelerators=1 if gpu else 0, concurrency_slots=1, asynchronous=False)

    @classmethod
    def requirements(cls, config: LocalModelGeneratorConfig) -> Requirements:
        if config.backend == "vllm":
            return Requirements.of("vllm", "vllm", "transformers", model_path=config.model_path)
        return Requirements.of("text", "torch", "transformers", model_path=config.model_path)

    def loaded_resources(self) -> Resources:
        # `auto` picks its backend at load, by the device: answer for the one it picked.
        if self.backend_name == "transformers":
            return Resources(accelerators=1 if self.config.device != "cpu" else 0, asynchronous=False)
        return type(self).resources(self.config)

    def load(self) -> None:
        cfg = self.config
        device = resolve_device(cfg.device, self.device)
        self.backend_name = choose_backend(cfg.backend, device, self.name)
        if self.backend_name == "vllm":
            from stages.text.vllm_backend import VLLMTextLM, load_tokenizer

            tokenizer = load_tokenizer(
                cfg.model_path, cache_dir=cfg.download_dir, trust_remote_code=cfg.trust_remote_code, stage=self.name
            )
            self.lm = VLLMTextLM(cfg.vllm_engine_args(cfg.model_path), device, cfg.max_num_seqs, self.name, tokenizer)
        else:
            from stages.engines.hf_causal import CausalLM

            self.lm = CausalLM(
                cfg.model_path,
                device,
                stage=self.name,
                dtype=cfg.dtype,
                cache_dir=cfg.download_dir,
                trust_remote_code=cfg.trust_remote_code,
            )
        self.lm.load()

    @property
    def tokenizer(self):
        return getattr(self.lm, "tokenizer", None)

    def _chats(self, cfg: LocalModelGeneratorConfig, batch: list[dict[str, Any]]) -> ChatBatch:
        return ChatBatch.of(batch, system=cfg.prompt, prompt=cfg.user_prompt, text_key=cfg.text_key, stage=self.name)

    def _finish(self, cfg: LocalModelGeneratorConfig, chats: ChatBatch, outcomes: list) -> list:
        output_key = cfg.output_key or cfg.text_key

        def answer(generation: Generation) -> dict[str, Any]:
            return {output_key: generation.texts if cfg.n > 1 else generation.text}

        return chats.finish(outcomes, self.usage, answer)

    def process(self, batch: list[dict[str, Any]]) -> list[dict[str, Any] | StageError]:
        cfg = self.config
        chats = self._chats(cfg, batch)
        if not chats.chats:
            return chats.results
        return self._finish(cfg, chats, self.lm.generate(chats.chats, cfg.sampling()))

    async def aprocess(self, batch: list[dict[str, Any]]) -> list[dict[str, Any] | StageError]:
        # vLLM: awaited on the runtime's loop, batches overlap in the engine; transformers: a thread.
        cfg = self.config
        chats = self._chats(cfg, batch)
        if not chats.chats:
            return chats.results
        return self._finish(cfg, chats, await self.lm.agenerate(chats.chats, cfg.sampling()))

    def close(self) -> None:
        if self.lm is not None:
            self.lm.close()
        self.lm = None
