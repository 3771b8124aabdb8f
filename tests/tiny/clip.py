"""A tiny random-weight CLIP dual encoder (~0.2 MB) built offline, loaded back through `from_pretrained`.

`build_tiny_clip(folder)` makes a `CLIPModel` from config objects (real patch size 14 at a 28 px
input: 4 patches a frame), the real `CLIPImageProcessor` and a `CLIPTokenizer` whose byte-level BPE
(CLIP's `</w>` word ends) is trained on the spot with `tokenizers` on a small corpus, and
`save_pretrained`s them into one folder that `AutoModel` + `AutoProcessor` load as they would a
hub checkpoint. `tiny_clip_path(tmp_path_factory)` builds it once per test session.

With random weights, near-identical frames still give near-identical embeddings (the
network is a smooth function of the pixels), which is what the duplicate tests rely on.
"""

from __future__ import annotations

from pathlib import Path

from daemon.demo.tiny_tokenizer import CORPUS

BOS, EOS = "<|startoftext|>", "<|endoftext|>"

TINY_CLIP_SIDE = 28
TINY_CLIP_DIM = 16


def clip_tokenizer(vocab_size: int = 300):
    """A real `CLIPTokenizer` over a BPE trained here: same normaliser, split and `</w>` suffix as CLIP's."""
    import json

    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    trainee = Tokenizer(models.BPE(end_of_word_suffix="</w>", unk_token=EOS))
    trainee.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    trainee.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    trainee.train_from_iterator(CORPUS, trainer=trainer)
    model = json.loads(trainee.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return CLIPTokenizer(vocab=model["vocab"], merges=merges, model_max_length=MAX_LENGTH)


MAX_LENGTH = 32


def build_tiny_clip(folder: Path, projection_dim: int = TINY_CLIP_DIM, seed: int = 0) -> Path:
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer = clip_tokenizer()
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=2,
            num_hidden_layers=2,
            vocab_size=len(tokenizer),
            max_position_embeddings=MAX_LENGTH,
            **ids,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=2,
            num_hidden_layers=2,
            image_size=TINY_CLIP_SIDE,
            patch_size=14,
        ),
        projection_dim=projection_dim,
    )
    model = CLIPModel(config).eval()
    side = {"shortest_edge": TINY_CLIP_SIDE}
    crop = {"height": TINY_CLIP_SIDE, "width": TINY_CLIP_SIDE}
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size=side, crop_size=crop),
        tokenizer=tokenizer,
    )
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def tiny_clip_path(tmp_path_factory) -> Path:
    """The tiny CLIP folder, built once per session (pass pytest's `tmp_path_factory`)."""
    root = tmp_path_factory.getbasetemp() / "tiny-clip"
    if not (root / "config.json").exists():
        build_tiny_clip(root)
    return root
