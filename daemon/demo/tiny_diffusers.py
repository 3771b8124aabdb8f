"""A tiny random-weight ModelScope text-to-video pipeline, built offline from config objects.

The shapes follow the real model's wiring (CLIP text encoder, SD VAE, 3-D UNet, DDIM), the
weights are random and small, and the CLIP tokenizer is a byte-level `vocab.json` written on
the spot (no merges: every character is a token). `reelflow demo` runs it; the tests build
their tiny diffusers pipelines from the same pieces. Frame sides must be multiples of 8.
"""

from __future__ import annotations

import json
from pathlib import Path

CLIP_MAX_LENGTH = 32


def _bytes_to_unicode() -> list[str]:
    """The byte -> printable character table of GPT-2/CLIP byte-level BPE."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for byte in range(256):
        if byte in printable:
            chars.append(chr(byte))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def clip_tokenizer(folder: Path):
    """A CLIPTokenizer whose vocabulary is every byte character, alone and word-final.

    Ids: 0 = <|startoftext|> (bos), 1 = <|endoftext|> (eos and pad).
    """
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in _bytes_to_unicode():
        vocab.setdefault(char, len(vocab))
        vocab.setdefault(char + "</w>", len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(
        vocab_file=str(folder / "vocab.json"),
        merges_file=str(folder / "merges.txt"),
        model_max_length=CLIP_MAX_LENGTH,
        pad_token="<|endoftext|>",
    )


CLIP_VOCAB = 2 + 2 * 256
CLIP_IDS = {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}


def clip_text(hidden: int, with_projection: bool = False, projection_dim: int = 32, layers: int = 2):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    config = CLIPTextConfig(
        hidden_size=hidden,
        intermediate_size=37,
        num_attention_heads=4 if hidden % 4 == 0 else 2,
        num_hidden_layers=layers,
        vocab_size=CLIP_VOCAB,
        max_position_embeddings=CLIP_MAX_LENGTH,
        projection_dim=projection_dim,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        **CLIP_IDS,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def sd_vae(blocks: int = 2, channels: int = 8):
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * blocks,
        up_block_types=["UpDecoderBlock2D"] * blocks,
        block_out_channels=(channels,) * blocks,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=2,
        sample_size=32,
    )


def sd_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False
    )


def modelscope_t2v(work: Path):
    import torch
    from diffusers import TextToVideoSDPipeline, UNet3DConditionModel

    torch.manual_seed(0)
    unet = UNet3DConditionModel(
        block_out_channels=(8, 8),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        cross_attention_dim=4,
        attention_head_dim=4,
        norm_num_groups=2,
    )
    return TextToVideoSDPipeline(
        vae=sd_vae(),
        text_encoder=clip_text(4),
        tokenizer=clip_tokenizer(work / "clip"),
        unet=unet,
        scheduler=sd_scheduler(),
    )
