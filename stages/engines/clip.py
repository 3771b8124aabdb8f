"""A resident CLIP / SigLIP dual encoder on one device: L2-normalised image and text embeddings.

Shared by the stages that score or embed frames and texts (CLIPEmbedder, AestheticFilter, a
captioner's `select: clip_score`), so each loads the model the same way: `AutoModel` +
`AutoProcessor.from_pretrained(model_path)`, hence a local folder and a hub id load alike,
and any checkpoint with `get_image_features` / `get_text_features` (CLIP, SigLIP, SigLIP 2)
works. Embeddings come back as float32 numpy rows of unit length, so a dot product is a cosine.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from stages.base import require
from stages.engines import torch_dtype

DEFAULT_CLIP = "openai/clip-vit-large-patch14"


def _features(output: Any):
    """transformers 5 returns a ModelOutput whose pooler_output is the projected embedding; 4.x a tensor."""
    if hasattr(output, "pooler_output"):
        return output.pooler_output
    return output


def l2_normalise(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (a zero row stays zero rather than becoming NaN)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.where(norms == 0, 1.0, norms)


class ClipEncoder:
    """A processor plus a resident dual-encoder model. `load` once; then thread-safe calls.

    `max_images` bounds one forward pass (frames of a whole batch of clips can be many).
    """

    def __init__(
        self,
        model_path: str = DEFAULT_CLIP,
        device: str = "cpu",
        dtype: str = "auto",
        stage: str = "CLIP",
        max_images: int = 64,
    ):
        self.model_path = model_path
        self.device = device.split(",")[0]  # a dual encoder fits on one device
        self.dtype_name = dtype
        self.stage = stage
        self.max_images = max_images
        self.model: Any = None
        self.processor: Any = None
        # one forward at a time, and the fast tokenizer is not safe across threads
        self._lock = threading.Lock()

    def load(self) -> ClipEncoder:
        torch = require("torch", stage=self.stage, extra="captioners")
        transformers = require("transformers", stage=self.stage, extra="captioners")
        self.processor = transformers.AutoProcessor.from_pretrained(self.model_path)
        model = transformers.AutoModel.from_pretrained(
            self.model_path, dtype=torch_dtype(self.dtype_name, self.device, recommended="float16")
        )
        for method in ("get_image_features", "get_text_features"):
            if not callable(getattr(model, method, None)):
                raise ValueError(
                    f"`{self.stage}`: {self.model_path} loads as {type(model).__name__}, which has no {method}; "
                    "expected a CLIP or SigLIP dual encoder (e.g. openai/clip-vit-large-patch14)"
                )
        self.model = model.to(self.device).eval()
        self._torch = torch
        return self

    @property
    def dim(self) -> int:
        config = self.model.config
        return int(getattr(config, "projection_dim", None) or config.vision_config.hidden_size)

    @property
    def siglip(self) -> bool:
        return "siglip" in type(self.model).__name__.lower()

    def image_embeddings(self, frames) -> np.ndarray:
        """N x D unit rows for N RGB frames (an N x H x W x 3 uint8 array, or a list of H x W x 3 arrays)."""
        images = list(frames)
        if not images:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = []
        with self._lock, self._torch.inference_mode():
            for start in range(0, len(images), self.max_images):
                chunk = images[start : start + self.max_images]
                inputs = self.processor(images=chunk, return_tensors="pt")
                pixels = inputs["pixel_values"].to(self.device, dtype=self.model.dtype)
                out.append(_features(self.model.get_image_features(pixel_values=pixels)).float().cpu().numpy())
        return l2_normalise(np.concatenate(out))

    def text_embeddings(self, texts: list[str]) -> np.ndarray:
        """N x D unit rows for N texts, truncated to the model's text length."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        # SigLIP was trained on max_length padding; its pooled text embedding depends on it.
        padding = "max_length" if self.siglip else True
        with self._lock, self._torch.inference_mode():
            inputs = self.processor(text=list(texts), padding=padding, truncation=True, return_tensors="pt")
            inputs = {k: v.to(self.device) for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
            features = _features(self.model.get_text_features(**inputs))
        return l2_normalise(features.float().cpu().numpy())

    def close(self) -> None:
        self.model = None
        self.processor = None
