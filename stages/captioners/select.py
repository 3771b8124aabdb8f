"""Choosing one caption among a clip's candidates (`num_candidates` > 1, `select`).

- `first`: candidate 0 (the one `num_candidates: 1` would give with the same seed).
- `longest`: the most characters (a structured caption: its values joined).
- `clip_score`: the highest cosine between the clip's frames (mean of their CLIP image
  embeddings, L2-normalised) and the candidate's CLIP text embedding, under
  `select_model_path` (stages/engines/clip.py). The per-frame embeddings a preceding
  CLIPEmbedder left on the record (`FRAME_EMBEDDINGS`) are used when they came from the same
  model, so CLIP does not run on the frames twice.
- `judge`: a GPTTextGenerator (the `judge:` config, any of its backends) is shown the numbered
  candidates and answers with a number; an answer without a number in range is the record's
  error (`JudgeUnparsable`), never a silent fallback.

What was chosen and why goes to the result's `caption_selection` (method, index, scores or the
judge's answer); every candidate goes to `caption_candidates`.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from stages.base import RECORD_ID, StageError
from stages.captioners.structured import caption_text

SELECT_FRAMES = "_select_frames"  # frames prepare() keeps for clip_score (uint8, T x H x W x 3)
# What a preceding CLIPEmbedder (stages/embedders/clip.py) leaves on a record for later steps:
# InFlight({"model_path": ..., "vectors": T x D per-frame unit embeddings}).
FRAME_EMBEDDINGS = "_clip_frame_embeddings"
SELECT_FRAME_COUNT = 8  # frames per clip for clip_score: CLIP scores vary little beyond a few

DEFAULT_JUDGE_PROMPT = (
    "Here are {num_candidates} candidate captions of the same video:\n{candidates}\n"
    "Answer with the number (1 to {num_candidates}) of the caption that describes the video most "
    "accurately and in the most detail, and nothing else."
)
_NUMBER = re.compile(r"\d+")


@dataclass
class Selection:
    method: str
    index: int
    reason: str
    scores: list[float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.method, "index": self.index, "reason": self.reason}
        if self.scores is not None:
            out["scores"] = self.scores
        return {**out, **self.extra}


class CandidateSelector:
    """Owns what a `select` mode needs (a CLIP encoder, a judge stage) for one captioner."""

    def __init__(self, config: Any, device: str, stage: str):
        self.config = config
        self.device = device
        self.stage = stage
        self.clip: Any = None
        self.judge: Any = None

    def load(self) -> None:
        c = self.config
        if c.select == "clip_score":
            from stages.engines.clip import ClipEncoder

            self.clip = ClipEncoder(c.select_model_path, self.device, stage=self.stage).load()
        elif c.select == "judge":
            from stages.text.gpt import GPTTextGenerator

            judge_config = (
                c.judge if c.judge.prompt is not None else c.judge.model_copy(update={"prompt": DEFAULT_JUDGE_PROMPT})
            )
            self.judge = GPTTextGenerator(judge_config, self.device)
            self.judge.load()

    def close(self) -> None:
        for owned in (self.clip, self.judge):
            if owned is not None:
                owned.close()
        self.clip = self.judge = None

    def take_usage(self) -> Counter[str]:
        if self.judge is None:
            return Counter()
        return Counter({f"judge_{k}": v for k, v in self.judge.take_usage().items()})

    def pick(
        self, config: Any, records: list[dict[str, Any]], candidates: list[list[Any]]
    ) -> list[Selection | StageError]:
        """One Selection (or the record's error) per record; `candidates[i]` is never empty.

        `config` is the captioner's config of this batch (a hot reload may have changed it)."""
        self.config = config
        method = config.select
        if method == "clip_score":
            return self._clip_scores(records, candidates)
        if method == "judge":
            return self._judge(records, candidates)
        picked: list[Selection | StageError] = []
        for options in candidates:
            if method == "longest":
                lengths = [float(len(caption_text(o))) for o in options]
                best = max(range(len(options)), key=lambda k: lengths[k])
                picked.append(Selection(method, best, "most characters", lengths))
            else:
                picked.append(Selection("first", 0, "first candidate"))
        return picked

    # -- clip_score ---------------------------------------------------------------------
    def _clip_scores(self, records: list[dict[str, Any]], candidates: list[list[Any]]) -> list[Selection | StageError]:
        import numpy as np

        texts = [caption_text(o) for options in candidates for o in options]
        text_vectors = self.clip.text_embeddings(texts)
        picked: list[Selection | StageError] = []
        start = 0
        for record, options in zip(records, candidates, strict=True):
            rows = text_vectors[start : start + len(options)]
            start += len(options)
            frame, source = self._frame_embedding(record)
            scores = [round(float(s), 6) for s in rows @ frame]
            best = int(np.argmax(scores))
            reason = f"highest CLIP cosine with the clip's frames ({self.config.select_model_path}, {source})"
            picked.append(Selection("clip_score", best, reason, scores))
        return picked

    def _frame_embedding(self, record: dict[str, Any]):
        import numpy as np

        from stages.engines.clip import l2_normalise

        held = getattr(record.get(FRAME_EMBEDDINGS), "value", None)
        if isinstance(held, dict) and held.get("model_path") == self.config.select_model_path:
            vectors = np.asarray(held["vectors"], dtype=np.float32)
            return l2_normalise(vectors.mean(axis=0)), f"{len(vectors)} frames embedded by CLIPEmbedder"
        vectors = self.clip.image_embeddings(record[SELECT_FRAMES])
        return l2_normalise(vectors.mean(axis=0)), f"{len(vectors)} frames"

    # -- judge --------------------------------------------------------------------------
    def _judge(self, records: list[dict[str, Any]], candidates: list[list[Any]]) -> list[Selection | StageError]:
        judge_config = self.judge.config
        asks = []
        for record, options in zip(records, candidates, strict=True):
            numbered = "\n".join(f"{k + 1}. {_shown(o)}" for k, o in enumerate(options))
            public = {k: v for k, v in record.items() if not k.startswith("_")}
            asks.append(
                {
                    **public,
                    RECORD_ID: record.get(RECORD_ID),
                    "candidates": numbered,
                    "num_candidates": len(options),
                    judge_config.text_key: numbered,
                }
            )
        answers = self.judge.process(asks)
        key = judge_config.output_key or judge_config.text_key
        picked: list[Selection | StageError] = []
        for answer, options in zip(answers, candidates, strict=True):
            if isinstance(answer, StageError):
                picked.append(
                    StageError(f"{self.stage}: the judge failed: {answer.message}", error_type=answer.error_type)
                )
                continue
            text = str(answer[key])
            numbers = [int(n) for n in _NUMBER.findall(text) if 1 <= int(n) <= len(options)]
            if not numbers:
                picked.append(
                    StageError(
                        f"{self.stage}: the judge ({judge_config.model}) was asked for a number from 1 to "
                        f"{len(options)} and answered {text[:200]!r}; use a judge model or prompt that answers "
                        "with the number (temperature: 0 helps), or select: clip_score",
                        error_type="JudgeUnparsable",
                    )
                )
                continue
            extra = {"judge_answer": text[:500], "judge_model": judge_config.model}
            picked.append(Selection("judge", numbers[0] - 1, "the judge's answer", None, extra))
        return picked


def _shown(option: Any) -> str:
    return option if isinstance(option, str) else json.dumps(option, ensure_ascii=False, sort_keys=True)
