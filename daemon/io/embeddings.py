"""A job's vectors beside its results: `<job>.embeddings.parquet`, appended per batch, crash-safe.

Layout: the name is a *folder* (a parquet dataset) of part files `part-00000000.parquet`, ...,
one per results batch, each with `id` (string) and one `list<float32>` column per vector field.
`pyarrow.parquet.read_table(folder)` reads it whole; a row's index is its position in part
order, which is what the result line's `<key>_index` holds.

Why parts: a parquet file cannot be appended to once its footer is written, and one left open
with a ParquetWriter is unreadable after kill -9 (no footer), so "append per batch, resumable"
means one closed file per batch. Rewriting one file on close would lose everything on a crash.
A part is written as `.part-*.tmp`, fsynced and renamed in before the batch's result lines are
appended, so every result line points at a durable row. One small file per batch would pile
up, so `compact` (called when the job's writer closes) streams the parts, in order, into one
file that replaces the first part and records the part numbers it covers in its metadata;
only then are the others removed. A crash in between leaves covered parts, which `open`
removes, so no row is ever in the dataset twice and every row keeps its index.

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
COVERS = b"reelflow_covers"  # metadata of a compacted part: "<first>-<last>" part numbers it holds


def fsync_dir(folder: Path) -> None:
    """Make a rename or unlink in `folder` durable (the entry, not only the file's data)."""
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

    @staticmethod
    def _number(part: Path) -> int:
        return int(_PART.match(part.name).group(1))

    @staticmethod
    def _covers(part: Path) -> tuple[int, int] | None:
        import pyarrow.parquet as pq

        metadata = pq.read_schema(part).metadata or {}
        if COVERS not in metadata:
            return None
        first, _, last = metadata[COVERS].decode().partition("-")
        return int(first), int(last)

    def _drop_covered(self) -> int:
        """Remove parts a compacted part already holds (a crash cut `compact` short); the highest number used."""
        covers = {self._number(p): self._covers(p) for p in self.parts()}
        highest = max([*covers, *(c[1] for c in covers.values() if c)], default=-1)
        held = {n for n in covers for c in covers.values() if c and c[0] < n <= c[1]}
        for number in sorted(held):
            (self.folder / f"part-{number:08d}.parquet").unlink()
        if held:
            fsync_dir(self.folder)
        return highest

    def open(self, done: IdSet) -> None:
        """Drop leftovers of a crash (temp files, rows the results never got) and count the rows."""
        import pyarrow.parquet as pq

        if not self.folder.is_dir():
            return
        for leftover in self.folder.glob(".part-*.tmp"):
            leftover.unlink()
        highest = self._drop_covered()
        parts = self.parts()
        if parts:
            self._repair_last(parts[-1], done)
        parts = self.parts()
        self.rows = sum(pq.ParquetFile(p).metadata.num_rows for p in parts)
        self._next = highest + 1  # never a number a compacted part covers

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
        fsync_dir(self.folder)

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
        fsync_dir(self.folder)
        first = self.rows
        self.rows += len(ids)
        self._next += 1
        return first, part

    def compact(self) -> None:
        """Stream every part, in order, into one file replacing the first; then remove the others."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        parts = self.parts()
        if len(parts) < 2:
            return
        first, last = self._number(parts[0]), max(self._number(parts[-1]), (self._covers(parts[-1]) or (0, 0))[1])
        schema = pa.unify_schemas([pq.read_schema(p).remove_metadata() for p in parts])
        schema = schema.with_metadata({COVERS: f"{first}-{last}".encode()})
        tmp = self.folder / f".part-{first:08d}.compact.tmp"
        try:
            with pq.ParquetWriter(tmp, schema) as writer:
                for part in parts:
                    table = pq.read_table(part)
                    for field in schema:
                        if field.name not in table.column_names:
                            table = table.append_column(field, pa.nulls(len(table), field.type))
                    writer.write_table(table.select(schema.names).cast(schema))
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
            tmp.replace(parts[0])
            fsync_dir(self.folder)
        except (OSError, pa.ArrowException) as exc:
            tmp.unlink(missing_ok=True)
            raise OSError(getattr(exc, "errno", None), f"compacting the parts: {exc}", str(self.folder)) from exc
        for part in parts[1:]:
            part.unlink()
        fsync_dir(self.folder)

    def discard(self, part: Path, count: int) -> None:
        """Undo the last `append` (its result lines could not be written); the retry appends again."""
        part.unlink(missing_ok=True)
        self.rows -= count
        self._next -= 1
