"""Where a job's output goes, and the append-only writers that make it crash-safe.

Results and errors are appended, flushed and fsynced once per batch, so after a crash
the files hold every line written before it plus at most one torn line, which `open`
truncates (in the intermediate step files too). The ids found in them on open are the
resume ledger: those records are not run again.

An append that fails half way (disk full, EIO) is cut back to the size the file had before
it, so retrying the batch (daemon/runtime/failures.py: transient) never duplicates a line.
Every `OSError` raised here names the file it was about.

Vectors (`stages.base.Embedding` outputs) are not written into the lines: a results batch's
vectors go to the job's embeddings dataset (daemon/io/embeddings.py) first, then its lines,
each holding `<key>_index`; filtered and intermediate lines leave them out, and `InFlight`
values are never written.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from daemon import secrets
from daemon.io.embeddings import EmbeddingStore
from daemon.io.records import IdSet, Record, duplicate_key, unreadable_row_key
from stages.base import EMBEDDINGS_SUFFIX, InFlight
from stages.embedding import Embedding

STATE_DIR = ".reelflow"


@dataclass(frozen=True)
class OutboxLayout:
    """The folders a run writes to. `for_job` gives one job's files."""

    results_dir: Path
    errors_dir: Path
    media_root: Path
    intermediate_root: Path
    relative_to: Path  # paths in result lines are written relative to this folder
    job_subfolders: bool = True  # media/<job>/ and intermediate/<job>/ (daemon) or flat (one-shot)

    @classmethod
    def daemon(cls, outbox: Path) -> OutboxLayout:
        return cls(outbox, outbox, outbox / "media", outbox / "intermediate", outbox)

    @classmethod
    def one_shot(cls, base_folder: Path, save_folder: Path) -> OutboxLayout:
        return cls(base_folder, save_folder, save_folder / "media", base_folder, save_folder, job_subfolders=False)

    def for_job(self, job: str) -> JobPaths:
        media = self.media_root / job if self.job_subfolders else self.media_root
        intermediate = self.intermediate_root / job if self.job_subfolders else self.intermediate_root
        return JobPaths(
            results=self.results_dir / f"{job}.jsonl",
            errors=self.errors_dir / f"{job}.errors.jsonl",
            filtered=self.errors_dir / f"{job}.filtered.jsonl",
            embeddings=self.errors_dir / f"{job}{EMBEDDINGS_SUFFIX}",
            media=media,
            intermediate=intermediate,
        )


@dataclass(frozen=True)
class JobPaths:
    results: Path
    errors: Path
    filtered: Path
    media: Path
    intermediate: Path
    # a folder of parquet parts beside the final results (one-shot: save_folder); default: beside results
    embeddings: Path | None = None


def _truncate_torn_line(path: Path) -> None:
    """Cut a last line that a crash left without its newline."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with path.open("rb+") as handle:
        handle.seek(-1, os.SEEK_END)
        if handle.read(1) == b"\n":
            return
        size = handle.seek(0, os.SEEK_END)
        block = 1 << 16
        position = size
        while position > 0:
            start = max(0, position - block)
            handle.seek(start)
            chunk = handle.read(position - start)
            newline = chunk.rfind(b"\n")
            if newline >= 0:
                handle.truncate(start + newline + 1)
                return
            position = start
        handle.truncate(0)


def _keys_in(path: Path, is_errors: bool, into: IdSet) -> int:
    count = 0
    if not path.exists():
        return 0
    with path.open("rb") as handle:
        for line in handle:
            try:
                entry = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            record_id = entry.get("id")
            if is_errors and entry.get("error") == "DuplicateId":
                into.add(duplicate_key(str(record_id), int(entry.get("row", 0))))
            elif record_id is None or type(record_id) is int:  # a row with no usable id: its number (int) stands in
                into.add(unreadable_row_key(int(entry.get("row", 0))))
            else:
                into.add(str(record_id))
            count += 1
    return count


def config_hash_fields(record: Record, fallback: str) -> dict[str, Any]:
    """`_config_hash`: the digest of the config the record's steps ran with.

    A record in flight across a hot reload can go through one step under the old config
    and a later one under the new: then `_config_hash` is the last step's and
    `_config_hash_by_step` gives each step's.
    """
    digests = [d for d in record.step_digests.values() if d]
    if not digests:
        return {"_config_hash": fallback}
    if len(set(digests)) == 1:
        return {"_config_hash": digests[0]}
    return {"_config_hash": digests[-1], "_config_hash_by_step": dict(record.step_digests)}


class JobWriter:
    """Appends one job's result, error and intermediate lines. Thread-safe; blocking IO."""

    def __init__(self, job: str, paths: JobPaths, relative_to: Path, config_digest: str | None = None):
        self.job = job
        self.paths = paths
        self.relative_to = relative_to.resolve()
        self.config_digest = config_digest
        self._lock = threading.Lock()
        self._vectors_lock = threading.Lock()  # a part and its result lines, one batch at a time
        self.embeddings = EmbeddingStore(paths.embeddings or paths.results.with_name(f"{job}{EMBEDDINGS_SUFFIX}"))
        self._files: dict[Path, Any] = {}
        self.results_written = 0
        self.errors_written = 0
        self.filtered_written = 0

    def open(self) -> IdSet:
        """Repair torn last lines and return the keys already written (the resume ledger)."""
        done = IdSet()
        for path in (self.paths.results, self.paths.errors, self.paths.filtered):
            path.parent.mkdir(parents=True, exist_ok=True)
            _truncate_torn_line(path)
        # Made here, so that a file (or a folder it may not write) in its place fails the job, as
        # its results file would, instead of failing every record that writes media (close
        # removes it again where no stage wrote any).
        self.paths.media.mkdir(parents=True, exist_ok=True)
        # A torn line left in a step file would end up mid-file once appends go on after it.
        if self.paths.intermediate.is_dir():
            for path in sorted(self.paths.intermediate.glob("step_*.jsonl")):
                if path.is_file():
                    _truncate_torn_line(path)
        self.results_written = _keys_in(self.paths.results, False, done)
        self.errors_written = _keys_in(self.paths.errors, True, done)
        self.filtered_written = _keys_in(self.paths.filtered, False, done)
        self._settled_parents(done)
        self.embeddings.open(done)
        return done

    def _settled_parents(self, done: IdSet) -> None:
        """A parent that fanned out is done once each of its children is: then it is not split again."""
        if not self.paths.intermediate.is_dir():
            return
        for path in sorted(self.paths.intermediate.glob("step_*.jsonl")):
            with path.open("rb") as handle:
                for line in handle:
                    if b'"_children"' not in line:
                        continue
                    try:
                        entry = orjson.loads(line)
                    except orjson.JSONDecodeError:
                        continue
                    children = entry.get("_children") or []
                    if children and all(str(c) in done for c in children):
                        done.add(str(entry.get("id")))

    def _handle(self, path: Path):
        handle = self._files.get(path)
        if handle is None:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Unbuffered: after a failed write no bytes linger in a buffer to be flushed later.
            handle = self._files[path] = path.open("ab", buffering=0)
        return handle

    def _default(self, value: Any) -> Any:
        if isinstance(value, Path):
            resolved = value.resolve()
            return (
                str(resolved.relative_to(self.relative_to)) if resolved.is_relative_to(self.relative_to) else str(value)
            )
        if hasattr(value, "tolist"):  # numpy scalars and arrays
            return value.tolist()
        if isinstance(value, set | frozenset | tuple):
            return list(value)
        return str(value)

    def _dump(self, entry: dict) -> bytes:
        try:
            return orjson.dumps(entry, default=self._default, option=orjson.OPT_NON_STR_KEYS) + b"\n"
        except orjson.JSONEncodeError:  # e.g. an integer beyond 64 bits: the stdlib encoder takes it
            return json.dumps(entry, default=self._default, ensure_ascii=False).encode() + b"\n"

    def result_line(self, record: Record, embedding_row: int | None = None) -> dict:
        """The line for a record; its vectors become `<key>_index` (= `embedding_row`) or are left out."""
        outputs = {}
        for key, value in record.outputs.items():
            if isinstance(value, Embedding):
                if embedding_row is not None:
                    outputs[f"{key}_index"] = embedding_row
            elif not isinstance(value, InFlight):
                outputs[key] = value
        line = {**record.row, "id": record.id, **outputs}
        if self.config_digest:
            line.update(config_hash_fields(record, self.config_digest))
        return line

    def write_results(self, records: list[Record]) -> None:
        keys = list(dict.fromkeys(k for r in records for k, v in r.outputs.items() if isinstance(v, Embedding)))
        if not keys:
            data = b"".join(self._dump(self.result_line(r)) for r in records)
            self._append(self.paths.results, data, sync=True)
            self.results_written += len(records)
            return
        with self._vectors_lock:
            with_vectors = [r for r in records if any(isinstance(r.outputs.get(k), Embedding) for k in keys)]
            columns = {
                k: [r.outputs.get(k) if isinstance(r.outputs.get(k), Embedding) else None for r in with_vectors]
                for k in keys
            }
            first, part = self.embeddings.append([str(r.id) for r in with_vectors], columns)
            rows = {id(r): first + n for n, r in enumerate(with_vectors)}
            data = b"".join(self._dump(self.result_line(r, rows.get(id(r)))) for r in records)
            try:
                self._append(self.paths.results, data, sync=True)
            except OSError:
                # no line points at the part: drop it, so the retried batch writes its rows once
                self.embeddings.discard(part, len(with_vectors))
                raise
            self.results_written += len(records)

    def write_errors(self, entries: list[tuple[Record, str, str, str]]) -> None:
        """`entries`: (record, step label, error type, message)."""
        data = b"".join(
            self._dump(
                {
                    "id": r.id if r.id is not None else r.row_number,  # an int: resume tells it from string ids
                    "job": self.job,
                    "row": r.row_number,
                    "step": step,
                    "error": kind,
                    "message": secrets.redact(message),  # a server's echo of the key, whole or shortened
                    "record": r.row,
                }
            )
            for r, step, kind, message in entries
        )
        self._append(self.paths.errors, data, sync=True)
        self.errors_written += len(entries)

    def write_filtered(self, entries: list[tuple[Record, str]]) -> None:
        """`entries`: (record, step label); the record's `filtered` says why."""
        data = b"".join(
            self._dump(
                {
                    "id": r.id,
                    "job": self.job,
                    "row": r.row_number,
                    "step": step,
                    "reason": r.filtered.reason,
                    "scores": r.filtered.scores,
                    "record": self.result_line(r),
                }
            )
            for r, step in entries
        )
        self._append(self.paths.filtered, data, sync=True)
        self.filtered_written += len(entries)

    def write_expansions(self, step_label: str, parents: list[Record]) -> None:
        """Each parent that fanned out, with its children's ids, fsynced before the children go on:
        resume then knows which children a parent has."""
        data = b"".join(
            self._dump({**self.result_line(r), "_children": [f"{r.id}:{k:04d}" for k in range(len(r.children))]})
            for r in parents
        )
        self._append(self.paths.intermediate / f"{step_label}.jsonl", data, sync=True)

    def write_intermediate(self, step_label: str, records: list[Record]) -> None:
        data = b"".join(self._dump(self.result_line(r)) for r in records)
        self._append(self.paths.intermediate / f"{step_label}.jsonl", data, sync=False)

    def _append(self, path: Path, data: bytes, sync: bool) -> None:
        with self._lock:
            handle = self._handle(path)
            fd = handle.fileno()
            start = os.lseek(fd, 0, os.SEEK_END)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                if sync:
                    os.fsync(fd)
            except OSError as exc:
                # Cut the half-written batch off, so a retry writes each line once (if even that
                # fails, the torn tail is repaired on the next open).
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, start)
                raise OSError(exc.errno, exc.strerror, str(path)) from exc

    def close(self) -> None:
        """Sync and close the files; then fold the batch-by-batch embedding parts into one file."""
        with self._lock:
            try:
                for handle in self._files.values():
                    os.fsync(handle.fileno())
            finally:
                for handle in self._files.values():
                    handle.close()
                self._files.clear()
        with self._vectors_lock:
            self.embeddings.compact()
        with contextlib.suppress(OSError):  # not empty (media written), or gone: either is fine
            self.paths.media.rmdir()
