"""A tiny random-weight Qwen2-VL captioner (~0.2 M parameters), built offline from config objects.

The model is made from a config object, its byte-level BPE tokenizer is trained on the spot
with the family's special tokens and a ChatML template shaped like the real checkpoint's, and
the family's real processor wraps them; everything is saved into one folder that
`AutoProcessor` + `AutoModelForImageTextToText` load back, as a hub checkpoint would be.
`reelflow demo` runs it; the tests build their captioners from the same code.

Sizes follow two constraints: the vision side keeps the real patch size (14), so the token
arithmetic (tokens per frame, frame pairs) is the real one at a smaller resolution; and every
attention head is 32 wide, since vLLM's CPU attention needs head size >= 32.
"""

from __future__ import annotations

from pathlib import Path

from daemon.demo.tiny_tokenizer import train_bpe_tokenizer

# Frames are resized to this side by the LLaVA processors; Qwen gets it as max_pixels.
TINY_SIDE = 112
HEAD = 32  # attention head width (vLLM CPU needs >= 32)

QWEN_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# ChatML as Qwen2-VL's own template renders it: a default system turn, then the user's parts.
QWEN_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def text_dims(vocab_size: int) -> dict:
    return dict(
        vocab_size=vocab_size,
        hidden_size=2 * HEAD,
        intermediate_size=4 * HEAD,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        # Wider than the usual 0.02 so that random weights give captions that vary with the
        # input instead of one token repeated.
        initializer_range=0.2,
    )


def save_model(model, processor, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def seeded(seed: int):
    import torch

    torch.manual_seed(seed)


def peaked(model):
    """Scale the final norm so next-token distributions are peaked: greedy captions then do not
    flip on float noise, and transformers and vLLM runs of one checkpoint can be compared."""
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("language_model.norm.weight"):
                param.mul_(8.0)
    return model


def build_qwen2_vl(folder: Path, *, qwen25: bool = False) -> Path:
    """Qwen2-VL (or Qwen2.5-VL with `qwen25=True`): ChatML, frame pairs, dynamic resolution."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    tokenizer = train_bpe_tokenizer(
        QWEN_SPECIALS, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=QWEN_TEMPLATE
    )
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in QWEN_SPECIALS}
    text = dict(text_dims(len(tokenizer)), eos_token_id=ids["<|im_end|>"], bos_token_id=None)
    text["pad_token_id"] = ids["<|endoftext|>"]
    # M-RoPE splits the rotary half-dimension (HEAD / 2) into temporal, height and width sections.
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]}
    vision = dict(depth=1, num_heads=1, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    common = dict(
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    if qwen25:
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

        vision.update(
            hidden_size=HEAD,
            intermediate_size=2 * HEAD,
            out_hidden_size=2 * HEAD,
            window_size=56,
            fullatt_block_indexes=[0],
        )
        config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **common)
        model_cls, processor_cls = Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
    else:
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

        vision.update(embed_dim=HEAD, mlp_ratio=2, hidden_size=2 * HEAD)
        config = Qwen2VLConfig(text_config=text, vision_config=vision, **common)
        model_cls, processor_cls = Qwen2VLForConditionalGeneration, Qwen2VLProcessor
    seeded(0)
    model = peaked(model_cls(config).eval())
    pixels = {"shortest_edge": 56 * 56, "longest_edge": TINY_SIDE * TINY_SIDE}
    processor = processor_cls(
        image_processor=Qwen2VLImageProcessor(size=pixels),
        video_processor=Qwen2VLVideoProcessor(size=pixels),
        tokenizer=tokenizer,
        chat_template=QWEN_TEMPLATE,
    )
    return save_model(model, processor, folder)
