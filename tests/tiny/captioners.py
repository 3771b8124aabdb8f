"""Tiny video-language models (~0.2 M parameters each) built offline for the captioner tests.

Each builder makes a random-weight model from a config object, a byte-level BPE tokenizer
trained on the spot with the family's special tokens and a chat template shaped like the
real checkpoint's, and the family's real processor; then `save_pretrained` everything into
one folder that `AutoProcessor` + `AutoModelForImageTextToText` load back, exactly as a hub
checkpoint would be loaded.

Sizes follow two constraints: the vision side keeps the real patch size (14), so the token
arithmetic (tokens per frame, frame pairs) is the real one at a smaller resolution; and every
attention head is 32 wide, since vLLM's CPU attention needs head size >= 32, so the same
folders also run on vLLM.
"""

from __future__ import annotations

from pathlib import Path

from daemon.demo.tiny_qwen2vl import (  # shared with `reelflow demo`
    HEAD,
    TINY_SIDE,
    build_qwen2_vl,
    peaked,
    save_model,
    seeded,
    text_dims,
)
from daemon.demo.tiny_tokenizer import train_bpe_tokenizer

# LLaVA-NeXT-Video's tower: vLLM's video pooler computes image_size // patch_size**2, which
# must not be 0, so the side is at least 14^2 = 196.
NEXT_VIDEO_SIDE = 224

# LLaVA-NeXT-Video (Vicuna style): media first, then the text.
LLAVA_NEXT_VIDEO_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for part in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>\n' }}{% endfor %}"
    "{% for part in message['content'] | selectattr('type', 'equalto', 'text') %}{{ part['text'] + ' ' }}{% endfor %}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

ONEVISION_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for part in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>\n' }}{% endfor %}"
    "{% for part in message['content'] | selectattr('type', 'equalto', 'text') %}{{ part['text'] }}{% endfor %}"
    "{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _hub_vision_names(folder: Path) -> None:
    """Rename `vision_tower.*` weights to `vision_tower.vision_model.*`, as hub checkpoints name them.

    transformers 5 saves LLaVA vision towers without the `vision_model.` level; the released
    checkpoints (and vLLM's loader) have it, and transformers loads both.
    """
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    weights = load_file(path)
    prefix = "vision_tower."
    renamed = {
        (f"{prefix}vision_model.{k[len(prefix) :]}" if k.startswith(prefix) and ".vision_model." not in k else k): v
        for k, v in weights.items()
    }
    save_file(renamed, path, metadata={"format": "pt"})


def build_llava_next_video(folder: Path) -> Path:
    """LLaVA-NeXT-Video: CLIP tower (224 px), 2x2 average pooling per frame, Vicuna-style prompt."""
    from transformers import (
        LlavaNextImageProcessor,
        LlavaNextVideoConfig,
        LlavaNextVideoForConditionalGeneration,
        LlavaNextVideoProcessor,
        LlavaNextVideoVideoProcessor,
    )

    specials = ["<s>", "</s>", "<pad>", "<image>", "<video>"]
    tokenizer = train_bpe_tokenizer(
        specials, bos_token="<s>", eos_token="</s>", pad_token="<pad>", chat_template=LLAVA_NEXT_VIDEO_TEMPLATE
    )
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in specials}
    vision = dict(
        model_type="clip_vision_model",
        hidden_size=HEAD,
        intermediate_size=2 * HEAD,
        num_hidden_layers=2,
        num_attention_heads=1,
        patch_size=14,
        image_size=NEXT_VIDEO_SIDE,
        projection_dim=HEAD,
    )
    text = dict(
        text_dims(len(tokenizer)),
        model_type="llama",
        bos_token_id=ids["<s>"],
        eos_token_id=ids["</s>"],
        pad_token_id=ids["<pad>"],
    )
    patches = (NEXT_VIDEO_SIDE // 14) ** 2
    config = LlavaNextVideoConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=ids["<image>"],
        video_token_index=ids["<video>"],
        vision_feature_layer=-1,
        image_grid_pinpoints=[
            [NEXT_VIDEO_SIDE, NEXT_VIDEO_SIDE],
            [NEXT_VIDEO_SIDE, 2 * NEXT_VIDEO_SIDE],
            [2 * NEXT_VIDEO_SIDE, NEXT_VIDEO_SIDE],
        ],
        image_seq_length=patches,
        video_seq_length=patches // 4,
        tie_word_embeddings=True,
    )
    seeded(0)
    model = peaked(LlavaNextVideoForConditionalGeneration(config).eval())
    side = {"shortest_edge": NEXT_VIDEO_SIDE}
    crop = {"height": NEXT_VIDEO_SIDE, "width": NEXT_VIDEO_SIDE}
    processor = LlavaNextVideoProcessor(
        video_processor=LlavaNextVideoVideoProcessor(size=side, crop_size=crop),
        image_processor=LlavaNextImageProcessor(
            size=side, crop_size=crop, image_grid_pinpoints=config.image_grid_pinpoints
        ),
        tokenizer=tokenizer,
        chat_template=LLAVA_NEXT_VIDEO_TEMPLATE,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    save_model(model, processor, folder)
    _hub_vision_names(folder)
    return folder


def build_llava_onevision(folder: Path) -> Path:
    """LLaVA-OneVision: SigLIP tower, bilinear 2x pooling per frame, ChatML prompt."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
    )

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
    tokenizer = train_bpe_tokenizer(
        specials, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=ONEVISION_TEMPLATE
    )
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in specials}
    vision = dict(
        model_type="siglip_vision_model",
        hidden_size=HEAD,
        intermediate_size=2 * HEAD,
        num_hidden_layers=2,
        num_attention_heads=1,
        patch_size=14,
        image_size=TINY_SIDE,
        vision_use_head=False,
    )
    text = dict(
        text_dims(len(tokenizer)),
        model_type="qwen2",
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    pinpoints = [[TINY_SIDE, TINY_SIDE], [TINY_SIDE, 2 * TINY_SIDE], [2 * TINY_SIDE, TINY_SIDE]]
    config = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=ids["<image>"],
        video_token_index=ids["<video>"],
        image_grid_pinpoints=pinpoints,
        tie_word_embeddings=True,
    )
    seeded(0)
    model = peaked(LlavaOnevisionForConditionalGeneration(config).eval())
    side = {"height": TINY_SIDE, "width": TINY_SIDE}
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size=side, image_grid_pinpoints=pinpoints),
        video_processor=LlavaOnevisionVideoProcessor(size=side),
        tokenizer=tokenizer,
        chat_template=ONEVISION_TEMPLATE,
        num_image_tokens=(TINY_SIDE // 14) ** 2,
        vision_feature_select_strategy="full",
    )
    save_model(model, processor, folder)
    _hub_vision_names(folder)
    return folder


BUILDERS = {
    "qwen2_vl": build_qwen2_vl,
    "qwen2_5_vl": lambda folder: build_qwen2_vl(folder, qwen25=True),
    "llava_next_video": build_llava_next_video,
    "llava_onevision": build_llava_onevision,
}
