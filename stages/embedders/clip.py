"""CLIPEmbedder: one vector per clip from CLIP or SigLIP (the mean of `num_frames` frame embeddings).

Frames are sampled evenly over the record's clip window (or the whole file) in the runtime's
prepare threads, embedded in one batched call per batch, mean-pooled and L2-normalised. The
vector goes out as an `Embedding` under `output_key`: later steps (NearDuplicateFilter) read it
from the record, the outbox stores it in `<job>.embeddings.parquet` and the result line holds
`<output_key>_index`. When the record has text under `text_key`, `clip_text_score` is the cosine
between the clip's vector and the text's embedding.

The per-frame embeddings ride along (`InFlight`, never written) under `FRAME_EMBEDDINGS`, tagged
with the model, so an AestheticFilter on the same CLIP model scores them without running CLIP again.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import Field

from stages.base import FieldKind, InFlight, Requirements, Stage, StageConfig, StageError
from stages.embedding import Embedding
from stages.engines.clip import DEFAULT_CLIP, ClipEncoder, l2_normalise
from stages.video.frames import clip_window, record_video, sample_frames

FRAMES = "_clip_embedder_frames"  # prepared: the decoded frames (T x H x W x 3)
FRAME_EMBEDDINGS = "_clip_frame_embeddings"  # InFlight({"model_path", "vectors": T x D})


class CLIPEmbedderConfig(StageConfig):
    model_path: str = Field(DEFAULT_CLIP, description="CLIP or SigLIP checkpoint: a hub id or a local folder.")
    num_frames: int = Field(8, ge=1, le=256, description="Frames sampled evenly over the clip and mean-pooled.")
    dtype: str = Field("auto", description="Torch dtype: auto (float16 on a GPU, float32 on the CPU) or a name.")
    decode_short_side: int = Field(
        256,
        ge=16,
        le=2160,
        description="Frames are decoded with the shorter side at most this many pixels (the processor resizes after).",
    )
    output_key: str = Field(
        "embedding", description="Field for the clip's vector; the result line gets `<output_key>_index`."
    )
    score_key: str = Field(
        "clip_text_score", description="Field for the cosine between the clip and its text (when it has one)."
    )
    max_images: int = Field(64, ge=1, description="Most frames in one model call (a batch's frames are chunked).")
    keep_frame_embeddings: bool = Field(
        True, description="Leave the per-frame embeddings on the in-flight record for a later AestheticFilter."
    )

    def input_fields(self) -> dict[str, FieldKind]:
        return {self.video_key: "video"}


class CLIPEmbedder(Stage):
    """Adds `output_key` (an `Embedding`) and, with a text, `score_key`."""

    registered_as = ("VideoEmbedder",)

    Config = CLIPEmbedderConfig
    config: CLIPEmbedderConfig
    accelerated = True

    @classmethod
    def requirements(cls, config: CLIPEmbedderConfig) -> Requirements:
        return Requirements.of("captioners", "torch", "transformers", model_path=config.model_path)

    def load(self) -> None:
        c = self.config
        self.encoder = ClipEncoder(c.model_path, self.device, c.dtype, "CLIPEmbedder", c.max_images).load()

    def close(self) -> None:
        if getattr(self, "encoder", None) is not None:
            self.encoder.close()

    def prepare(self, record: dict[str, Any]) -> dict[str, Any]:
        c = self.config
        path = record_video(record, c.video_key, "CLIPEmbedder")
        sampled = sample_frames(path, num_frames=c.num_frames, size=self._decode_size, window=clip_window(record))
        return {**record, FRAMES: sampled.frames}

    def _decode_size(self, width: int, height: int) -> tuple[int, int]:
        scale = min(1.0, self.config.decode_short_side / min(width, height))
        return max(2, round(width * scale)), max(2, round(height * scale))

    def process(self, batch: list[dict[str, Any]]) -> list[dict[str, Any] | StageError]:
        c = self.config
        frames: list[np.ndarray | StageError] = []
        for record in batch:
            try:
                frames.append(record[FRAMES] if FRAMES in record else self.prepare(record)[FRAMES])
            except StageError as bad:
                frames.append(bad)
        good = [f for f in frames if not isinstance(f, StageError)]
        rows = self.encoder.image_embeddings([image for f in good for image in f]) if good else None
        texts = {i: r.get(c.text_key) for i, r in enumerate(batch) if isinstance(r.get(c.text_key), str)}
        texts = {i: t for i, t in texts.items() if t.strip() and not isinstance(frames[i], StageError)}
        text_rows = dict(zip(texts, self.encoder.text_embeddings(list(texts.values())), strict=True)) if texts else {}
        out: list[dict[str, Any] | StageError] = []
        start = 0
        for i, f in enumerate(frames):
            if isinstance(f, StageError):
                out.append(f)
                continue
            per_frame = rows[start : start + len(f)]
            start += len(f)
            vector = l2_normalise(per_frame.mean(axis=0))
            result: dict[str, Any] = {c.output_key: Embedding.of(vector)}
            if i in text_rows:
                result[c.score_key] = round(float(vector @ text_rows[i]), 6)
            if c.keep_frame_embeddings:
                result[FRAME_EMBEDDINGS] = InFlight({"model_path": c.model_path, "vectors": per_frame})
            out.append(result)
        self.usage["embedded_frames"] += sum(len(f) for f in good)
        return out
