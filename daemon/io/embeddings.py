"""A job's vectors beside its results: `<job>.embeddings.parquet`, appended per batch, crash-safe.

Layout: the name is a *folder* (a parquet dataset) of part files `part-00000000.parquet`, ...,
one per results batch, each with `id` (string) and one `list<float32>` column per vector field.
`pyarrow.parquet.read_table(folder)` reads it whole; a row's index is its position in part
order, which is what the result line's `<key>_index` holds.

Why parts: a parquet file cannot be appended to once its footer is written, and one left open
with a ParquetWriter is unreadable after kill -9 (no footer), so "append per batch, resumable"
means one closed file per batch. Rewriting one file on close would lose everything on a crash.
A part is written as `.part-*.tmp`, fsynced and renamed in before the batch's result lines are
appended, so every result line points at a durable row. The cost is one small file per batch
(no compaction yet).

Resume: a crash after a part was renamed in but before (all of) its result lines were written
leaves rows whose ids the results ledger lacks; they can only be in the last part, since the
next part is written only after the previous batch's lines. `open` cuts that part back to the
rows whose ids are in the ledger (a prefix: lines are written in row order) or removes it, so
the re-run batch appends them again and no id is in the dataset twice.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from daemon.io.records import IdSet

_PART = re.compile(r"^part-(\d{8})\.parquet$")


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class EmbeddingStore:
    """One job's embeddings dataset. Not thread-safe: the JobWriter serialises calls."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.rows = 0  # rows in the dataset: the index the next row gets
        self._next = 0  # number of the next part file

    def parts(self) -> list[Path]:
        if not self.folder.is_dir():
            return []
        named = [(int(m.group(1)), p) for p in self.folder.iterdir() if (m := _PART.match(p.name))]
        return [p for _, p in sorted(named)]

    def open(self, done: IdSet) -> None:
        """Drop leftovers of a crash (temp files, rows the results never got) and count the rows."""
        import pyarrow.parquet as pq

        if not self.folder.is_dir():
            return
        for leftover in self.folder.glob(".part-*.tmp"):
            leftover.unlink()
        parts = self.parts()
        if parts:
            self._repair_last(parts[-1], done)
        parts = self.parts()
        self.rows = sum(pq.ParquetFile(p).metadata.num_rows for p in parts)
        self._next = int(_PART.match(parts[-1].name).group(1)) + 1 if parts else 0

    def _repair_last(self, part: Path, done: IdSet) -> None:
        import pyarrow.parquet as pq

        table = pq.read_table(part)
        ids = table.column("id").to_pylist()
        keep = [i for i, rid in enumerate(ids) if rid in done]
        if len(keep) == len(ids):
            return
        if not keep:
            part.unlink()
        else:
            self._write(table.take(keep), part)
        _fsync_dir(self.folder)

    def _write(self, table, target: Path) -> None:
        import pyarrow.parquet as pq

        tmp = target.with_name(f".{target.name}.tmp")
        try:
            pq.write_table(table, tmp)
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
            tmp.replace(target)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise OSError(exc.errno, exc.strerror, str(target)) from exc

    def append(self, ids: list[str], columns: dict[str, list[np.ndarray | None]]) -> tuple[int, Path]:
        """Write one part with these rows; return the index of its first row and the part (for `discard`)."""
        import pyarrow as pa

        arrays: dict[str, Any] = {"id": pa.array(ids, pa.string())}
        for key, vectors in columns.items():
            values = [None if v is None else np.asarray(v, dtype=np.float32) for v in vectors]
            arrays[key] = pa.array(values, type=pa.list_(pa.float32()))
        self.folder.mkdir(parents=True, exist_ok=True)
        part = self.folder / f"part-{self._next:08d}.parquet"
        self._write(pa.table(arrays), part)
        _fsync_dir(self.folder)
        first = self.rows
        self.rows += len(ids)
        self._next += 1
        return first, part

    def discard(self, part: Path, count: int) -> None:
        """Undo the last `append` (its result lines could not be written); the retry appends again."""
        part.unlink(missing_ok=True)
        self.rows -= count
        self._next -= 1
