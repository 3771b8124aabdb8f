"""A byte-level BPE tokenizer trained on the spot, so tiny models need no hub download."""

from __future__ import annotations

CORPUS = [
    "a video of a cat playing with a ball in the garden",
    "the camera pans across a city street at night with cars and lights",
    "describe this video in detail. a person walks a dog along the beach",
    "a rabbit wakes up under a tree, birds fly over a green meadow",
    "rewrite the caption as a prompt for a video generation model",
    "The quick brown fox jumps over the lazy dog. 0123456789",
] * 20

# A ChatML template that also renders image/video placeholders, as Qwen-style processors expect.
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] == 'video' %}{{ video_placeholder | default('<video>') }}"
    "{% elif part['type'] == 'image' %}{{ image_placeholder | default('<image>') }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def train_bpe_tokenizer(
    special_tokens: list[str], vocab_size: int = 400, chat_template: str | None = None, **token_roles
):
    """A `PreTrainedTokenizerFast` with `special_tokens` added as whole tokens.

    `token_roles` maps roles to tokens, e.g. `eos_token="<|im_end|>", pad_token="<|endoftext|>"`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(dict.fromkeys(special_tokens)),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, **token_roles)
    if chat_template:
        fast.chat_template = chat_template
    return fast
