"""`Embedding`, the one field type the outbox treats specially (stages/base.py's interface, kept
apart so that importing a stage module never imports numpy: `reelflow check` stays cheap)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


class Embedding(np.ndarray):
    """A 1-d float32 vector returned as a field: later steps read it as an array; the outbox
    writes it to the job's `<job>.embeddings.parquet` (`id` + one column per vector field) and
    puts `<key>_index`, the row's position there, in the result line instead of the floats."""

    @classmethod
    def of(cls, vector: Any) -> Embedding:
        return np.ascontiguousarray(vector, dtype=np.float32).reshape(-1).view(cls)


def read_vectors(dataset: Path, key: str) -> tuple[list[str], np.ndarray]:
    """(ids, N x D float32) of one vector column of an embeddings dataset (a folder of parquet parts),
    read column-wise (no Python float per value); rows without the column or the vector are left out."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(dataset, columns=["id", key])
    except (pa.ArrowInvalid, KeyError, OSError):  # no such column in this job's vectors, or no parts yet
        return [], np.zeros((0, 0), dtype=np.float32)
    column = table.column(key).combine_chunks()
    present = pc.invert(pc.is_null(column)).to_numpy(zero_copy_only=False)
    ids = [rid for rid, ok in zip(table.column("id").to_pylist(), present, strict=True) if ok]
    column = column.filter(pa.array(present))
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    if len(lengths) == 0 or (lengths != lengths[0]).any():
        return [], np.zeros((0, 0), dtype=np.float32)
    values = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return ids, values.reshape(len(lengths), int(lengths[0]))
