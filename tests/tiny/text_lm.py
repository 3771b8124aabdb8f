"""A tiny random Qwen2 causal LM with a ChatML chat template, built offline (~150 KB).

Its output head never favours a special token (their rows are zero while every other
token's logit is random), so greedy answers are non-empty, deterministic text that runs to
`max_tokens`: the same prompt gives the same answer from `transformers serve`, from the
`transformers` backend and from LocalModelGenerator.
"""

from __future__ import annotations

from pathlib import Path

from daemon.demo.tiny_tokenizer import CHATML_TEMPLATE, train_bpe_tokenizer

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_text_lm(folder: str | Path, *, seed: int = 0, hidden_size: int = 32, heads: int = 4) -> Path:
    """Save the tiny model in `folder`. The defaults give heads of 8 dims; vLLM's CPU attention
    needs at least 32 (`build_text_lm(folder, hidden_size=64, heads=2)`)."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    folder = Path(folder)
    tokenizer = train_bpe_tokenizer(
        SPECIAL_TOKENS,
        vocab_size=400,
        chat_template=CHATML_TEMPLATE,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=heads // 2,
        max_position_embeddings=1024,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        for token in SPECIAL_TOKENS:
            model.lm_head.weight[tokenizer.convert_tokens_to_ids(token)] = 0.0
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=False
    )
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
