"""AestheticFilter: the LAION aesthetic predictor's score per clip, and a drop below `min_score`.

The predictor (christophschuhmann/improved-aesthetic-predictor) is a small head over the
L2-normalised CLIP ViT-L/14 image embedding: `layers` = Linear(768, 1024), Dropout,
Linear(1024, 128), Dropout, Linear(128, 64), Dropout, Linear(64, 16), Linear(16, 1) (the
"linearMSE" weights; "reluMSE" has a ReLU after each Linear but the last, which moves the
Linear indices: 0, 3, 6, 9, 11). `head_path` names its state dict (.pth or .safetensors); the
head is rebuilt from the state dict's own `layers.<n>` names and shapes, so both variants, a
single Linear, and other widths load. Each sampled frame is scored; the clip's score is the mean.

When a CLIPEmbedder on the same `model_path` ran before, its per-frame embeddings are on the
in-flight record and are scored as they are: CLIP does not run twice. Otherwise this stage
loads its own CLIP (on first need, so a pipeline that always reuses never loads it).
"""

from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from stages.base import FieldKind, Filtered, InFlight, Requirements, Stage, StageConfig, StageError, require
from stages.embedders.clip import FRAME_EMBEDDINGS
from stages.engines.clip import DEFAULT_CLIP, ClipEncoder
from stages.video.frames import clip_window, record_video, sample_frames

_LAYER = re.compile(r"^(?:.*\.)?layers\.(\d+)\.(weight|bias)$")
RELU_INDICES = [0, 3, 6, 9, 11]  # reluMSE: Linear, ReLU, Dropout, ... ; linearMSE: 0, 2, 4, 6, 7


class AestheticFilterConfig(StageConfig):
    head_path: Path = Field(
        ...,
        description="The aesthetic head's weights (.pth or .safetensors state dict), e.g. sac+logos+ava1-l14-linearMSE.pth.",
    )
    model_path: str = Field(
        DEFAULT_CLIP, description="The CLIP model the head was trained on (ViT-L/14 for the LAION heads)."
    )
    num_frames: int = Field(
        4, ge=1, le=256, description="Frames scored when no CLIPEmbedder's frame embeddings are reused."
    )
    activation: Literal["auto", "none", "relu"] = Field(
        "auto", description="ReLU between the head's Linear layers: auto reads it from the layer numbering."
    )
    min_score: float | None = Field(None, description="Drop clips scoring below this (LAION's scale is about 1-10).")
    score_key: str = Field("aesthetic_score", description="Record field that receives the score.")
    reuse_embeddings: bool = Field(
        True, description="Score a preceding CLIPEmbedder's frame embeddings when its model_path is this one."
    )
    decode_short_side: int = Field(
        256, ge=16, le=2160, description="Frames are decoded with the shorter side at most this many pixels."
    )
    dtype: str = Field("auto", description="Torch dtype of the CLIP model: auto or a name.")

    def input_fields(self) -> dict[str, FieldKind]:
        return {self.video_key: "video"}


def load_head(path: Path, activation: str = "auto"):
    """The LAION head as a torch Sequential, built from the state dict's layer names and shapes."""
    import torch

    if not path.is_file():
        raise FileNotFoundError(
            f"AestheticFilter: head_path {path} does not exist; expected the head's .pth/.safetensors"
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
    if set(state) == {"weight", "bias"}:
        state = {"layers.0.weight": state["weight"], "layers.0.bias": state["bias"]}
    linear: dict[int, dict[str, Any]] = {}
    for key, tensor in state.items():
        match = _LAYER.match(key)
        if match is None:
            raise ValueError(
                f"AestheticFilter: {path.name} holds {key!r}; expected the LAION head's `layers.<n>.weight`/`.bias` "
                "(improved-aesthetic-predictor's MLP) or a single Linear's weight/bias"
            )
        linear.setdefault(int(match.group(1)), {})[match.group(2)] = tensor
    order = sorted(linear)
    relu = activation == "relu" or (activation == "auto" and order == RELU_INDICES)
    modules: list[Any] = []
    for n, index in enumerate(order):
        weight = linear[index]["weight"]
        layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in linear[index])
        layer.load_state_dict(linear[index])
        modules.append(layer)
        if relu and n < len(order) - 1:
            modules.append(torch.nn.ReLU())
    if modules[-1].out_features != 1:
        raise ValueError(
            f"AestheticFilter: {path.name}'s last layer has {modules[-1].out_features} outputs; expected 1"
        )
    return torch.nn.Sequential(*modules).eval()


class AestheticFilter(Stage):
    """Adds `aesthetic_score`; a clip below `min_score` becomes `Filtered`."""

    registered_as = ("VideoFilter",)

    Config = AestheticFilterConfig
    config: AestheticFilterConfig
    accelerated = True

    @classmethod
    def requirements(cls, config: AestheticFilterConfig) -> Requirements:
        needs = Requirements.of("captioners", "torch", "transformers", model_path=config.model_path)
        return Requirements(needs.packages, needs.checkpoints, (("head_path", str(config.head_path)),))

    def load(self) -> None:
        self._torch = require("torch", stage="AestheticFilter", extra="captioners")
        self.head = load_head(self.config.head_path, self.config.activation).to(self.device.split(",")[0])
        self.input_dim = self.head[0].in_features
        self.encoder: ClipEncoder | None = None
        self._encoder_lock = threading.Lock()

    def close(self) -> None:
        if getattr(self, "encoder", None) is not None:
            self.encoder.close()

    def _reusable(self, record: dict[str, Any]) -> np.ndarray | None:
        held = record.get(FRAME_EMBEDDINGS)
        if not self.config.reuse_embeddings or not isinstance(held, InFlight):
            return None
        if held.value.get("model_path") != self.config.model_path:
            return None
        return np.asarray(held.value["vectors"], dtype=np.float32)

    def _own_encoder(self) -> ClipEncoder:
        with self._encoder_lock:
            if self.encoder is None:
                c = self.config
                self.encoder = ClipEncoder(c.model_path, self.device, c.dtype, "AestheticFilter").load()
            return self.encoder

    def _frame_vectors(self, record: dict[str, Any]) -> np.ndarray:
        reused = self._reusable(record)
        if reused is not None:
            self.usage["reused_frame_embeddings"] += len(reused)
            return reused
        c = self.config
        path = record_video(record, c.video_key, "AestheticFilter")
        sampled = sample_frames(path, num_frames=c.num_frames, size=self._decode_size, window=clip_window(record))
        self.usage["embedded_frames"] += len(sampled.frames)
        return self._own_encoder().image_embeddings(sampled.frames)

    def _decode_size(self, width: int, height: int) -> tuple[int, int]:
        scale = min(1.0, self.config.decode_short_side / min(width, height))
        return max(2, round(width * scale)), max(2, round(height * scale))

    def process(self, batch: list[dict[str, Any]]) -> list[dict[str, Any] | StageError | Filtered]:
        out: list[dict[str, Any] | StageError | Filtered] = []
        for record in batch:
            try:
                vectors = self._frame_vectors(record)
                if vectors.shape[1] != self.input_dim:
                    raise StageError(
                        f"AestheticFilter: the CLIP embeddings have {vectors.shape[1]} dimensions, the head "
                        f"{self.config.head_path.name} takes {self.input_dim}; use the CLIP model the head was trained "
                        "on (model_path; ViT-L/14 for the LAION heads)",
                        error_type="ModelMismatch",
                    )
                out.append(self.judge(self.score(vectors)))
            except StageError as error:
                out.append(error)
        return out

    def score(self, vectors: np.ndarray) -> float:
        torch = self._torch
        with torch.inference_mode():
            weight = self.head[0].weight
            values = self.head(torch.from_numpy(vectors).to(weight.device, dtype=weight.dtype))
        return round(float(values.float().mean()), 4)

    def judge(self, score: float) -> dict[str, Any] | Filtered:
        c, key = self.config, self.config.score_key
        if c.min_score is not None and score < c.min_score:
            return Filtered(f"{key} {score:g} is below min_score {c.min_score:g}", {key: score})
        return {key: score}
