"""GPTTextGenerator with `backend: vllm` (or `auto` on a GPU with vLLM installed): the same
config on a local vLLM engine (stages/text/vllm_backend.py).

`model` is a local folder or a hub id already in the cache. Prompts are built and tokenized
exactly as the transformers backend does, so greedy answers match it. `max_num_seqs` is the
engine's limit of requests in flight; `max_tokens` defaults to 256 as for transformers;
`response_format: json_object` checks each answer and reports a non-JSON one as an error.
"""

from __future__ import annotations

from typing import Any

from stages.base import RECORD_ID, Stage, StageError
from stages.text.common import chat_messages, check_json_object, user_message
from stages.text.gpt import GPTTextGeneratorConfig
from stages.text.local_lm import Sampling


class VLLMTextGenerator(Stage):
    """What `GPTTextGenerator` builds when its config resolves to the vLLM backend."""

    Config = GPTTextGeneratorConfig
    accelerated = True
    backend_name = "vllm"

    def load(self) -> None:
        from stages.text.vllm_backend import VLLMTextLM, load_tokenizer

        cfg = self.config
        self.tokenizer = load_tokenizer(cfg.model, stage="GPTTextGenerator")
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
        self.lm = VLLMTextLM(engine_args, self.device, cfg.max_num_seqs, "GPTTextGenerator", self.tokenizer)
        self.lm.load()

    def process(self, batch: list[dict[str, Any]]) -> list[dict[str, Any] | StageError]:
        cfg = self.config
        results, slots, chats = self._chats(cfg, batch)
        if chats:
            self._finish(cfg, results, slots, self.lm.generate(chats, self._sampling(cfg)))
        return results

    async def aprocess(self, batch: list[dict[str, Any]]) -> list[dict[str, Any] | StageError]:
        # Awaited on the runtime's loop, so it keeps max_num_seqs / batch_size batches in flight and
        # vLLM batches their requests continuously.
        cfg = self.config
        results, slots, chats = self._chats(cfg, batch)
        if chats:
            self._finish(cfg, results, slots, await self.lm.agenerate(chats, self._sampling(cfg)))
        return results

    @staticmethod
    def _sampling(cfg: GPTTextGeneratorConfig) -> Sampling:
        return Sampling(max_tokens=cfg.max_tokens or 256, temperature=cfg.temperature)

    @staticmethod
    def _chats(cfg: GPTTextGeneratorConfig, batch: list[dict[str, Any]]):
        results: list[dict[str, Any] | StageError] = []
        chats, slots = [], []
        for record in batch:
            where = f"GPTTextGenerator (record {record.get(RECORD_ID)})"
            try:
                user = user_message(cfg.prompt, record, cfg.text_key, where=where)
            except StageError as error:
                results.append(error)
                continue
            slots.append(len(results))
            results.append({})
            chats.append(chat_messages(cfg.sys_prompt, user))
        return results, slots, chats

    def _finish(self, cfg: GPTTextGeneratorConfig, results: list, slots: list[int], outcomes: list) -> None:
        output_key = cfg.output_key or cfg.text_key
        for slot, generated in zip(slots, outcomes, strict=True):
            if isinstance(generated, StageError):
                results[slot] = generated
                continue
            self.usage["tokens_in"] += generated.tokens_in
            self.usage["tokens_out"] += generated.tokens_out
            text = generated.texts[0]
            try:
                results[slot] = {output_key: check_json_object(text) if cfg.response_format == "json_object" else text}
            except StageError as error:
                results[slot] = error

    def close(self) -> None:
        if getattr(self, "lm", None) is not None:
            self.lm.close()
        self.lm = self.tokenizer = None
