"""`Embedding`, the one field type the outbox treats specially (stages/base.py's interface, kept
apart so that importing a stage module never imports numpy: `reelflow check` stays cheap)."""

from __future__ import annotations

from typing import Any

import numpy as np


class Embedding(np.ndarray):
    """A 1-d float32 vector returned as a field: later steps read it as an array; the outbox
    writes it to the job's `<job>.embeddings.parquet` (`id` + one column per vector field) and
    puts `<key>_index`, the row's position there, in the result line instead of the floats."""

    @classmethod
    def of(cls, vector: Any) -> Embedding:
        return np.ascontiguousarray(vector, dtype=np.float32).reshape(-1).view(cls)
