"""GPTTextGenerator with `backend: transformers`: the same config on a local causal LM.

For people with no API: `model` is a local folder (or a hub id already in the cache), the
model stays resident on the worker's device, and each batch is one left-padded `generate`
call. `temperature: 0` is greedy; `max_tokens` defaults to 256; `response_format:
json_object` checks each answer and reports a non-JSON one as an error (there is no
server to retry against; sample again by re-running the record). `max_num_seqs` and the
retry keys do not apply (the runtime's `batch_size` sets how many records go per call).
"""

from __future__ import annotations

from typing import Any

from stages.base import RECORD_ID, Stage, StageError
from stages.text.common import chat_messages, check_json_object, user_message
from stages.text.gpt import GPTTextGeneratorConfig
from stages.text.local_lm import Sampling, generate, load_causal_lm


class TransformersTextGenerator(Stage):
    """What `GPTTextGenerator` builds when its config says `backend: transformers`."""

    Config = GPTTextGeneratorConfig
    accelerated = True

    def load(self) -> None:
        self.model, self.tokenizer = load_causal_lm(
            self.config.model, self.device, dtype=self.config.dtype, stage="GPTTextGenerator"
        )

    def process(self, batch: list[dict[str, Any]]) -> list[dict[str, Any] | StageError]:
        cfg = self.config
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
        if not chats:
            return results
        sampling = Sampling(max_tokens=cfg.max_tokens or 256, temperature=cfg.temperature)
        output_key = cfg.output_key or cfg.text_key
        for slot, generated in zip(slots, generate(self.model, self.tokenizer, chats, sampling), strict=True):
            self.usage["tokens_in"] += generated.tokens_in
            self.usage["tokens_out"] += generated.tokens_out
            text = generated.texts[0]
            try:
                results[slot] = {output_key: check_json_object(text) if cfg.response_format == "json_object" else text}
            except StageError as error:
                results[slot] = error
        return results

    def close(self) -> None:
        self.model = self.tokenizer = None
