"""NearDuplicateFilter: drop a clip whose embedding is within `threshold` cosine of one kept.

The embedding comes from the in-flight record (`embedding_key`): the `Embedding` a preceding
CLIPEmbedder left there, a list of floats, or the path of a `.npy` file (relative paths are
read against the outbox, where results keep them). Vectors
are L2-normalised, so inner product is cosine. The kept vectors live in a faiss index
(kept_index.py): exact up to `exact_up_to` vectors, then an IVF that grows with them.

`scope: job` compares a clip with what was kept in its own job; `scope: outbox` with
everything kept across jobs. Ids are per job, so decisions are keyed by (job, id), and a
filtered line names the kept clip's id (`duplicate_of`) and, across jobs, its job.

At first use a scope also takes in the vectors already in the outbox's embeddings datasets
(`<job>.embeddings.parquet`, column `embedding_key`; every job's for `scope: outbox`, the
record's own job's for `scope: job`) that its state file does not know: results written by
an earlier run without this step, or with its state file removed. Its own kept clips are
in the state file already (written before their results), so a restart reads them once.

Exactly-once across a crash: every decision (kept with its vector, or filtered with its
reason) is appended to a state file and fsynced BEFORE `process` returns. At first use the
file is read back and the index rebuilt; a record whose id already has a decision gets the
same decision again (it was decided before the crash and is being re-run), so a restart
after kill -9 keeps and drops exactly what an uninterrupted run would. A torn last frame (a
crash mid-write) is detected by its CRC and cut off. One state file belongs to one worker:
run this step with one worker.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from stages.base import (
    EMBEDDINGS_SUFFIX,
    JOB,
    MEDIA_DIR,
    OUTBOX_DIR,
    RECORD_ID,
    Filtered,
    Requirements,
    Stage,
    StageConfig,
    StageError,
    safe_file_stem,
)
from stages.embedding import read_vectors
from stages.filters.kept_index import KeptIndex

KEPT, DROPPED = 1, 2
# kind, id length, payload length; then id, payload, CRC32 of all before it
_HEAD = struct.Struct("<BII")
_CRC = struct.Struct("<I")


class NearDuplicateFilterConfig(StageConfig):
    embedding_key: str = Field(
        "embedding", description="Record field holding the embedding: a list of floats or a path to a .npy file."
    )
    threshold: float = Field(
        0.95, gt=0, le=1, description="Drop a clip whose cosine similarity to a kept clip is at least this."
    )
    scope: Literal["job", "outbox"] = Field(
        "job", description="`job`: compare within the record's job; `outbox`: across everything this step kept."
    )
    exact_up_to: int = Field(
        16_384, ge=1, description="Exact search (one product with every kept vector) up to this many; IVF beyond."
    )
    nlist: int | Literal["auto"] = Field(
        "auto",
        description="IVF lists past exact_up_to: `auto` rebuilds the IVF at each doubling of exact_up_to with "
        "~4 sqrt(n) lists; a number: that many, trained once on the first vectors.",
    )
    # 12: of 16,384 near copies (cosine ~0.995) of random 768-d vectors in a 200k IVF, 1 had its
    # source's list outside its 8 nearest lists, none outside 12 (bench/RESULTS.md, dedup)
    nprobe: int = Field(12, ge=1, description="IVF lists searched per query (more: slower, fewer missed duplicates).")
    state_dir: Path | None = Field(
        None,
        description="Folder of the kept-state files; default: the record's media folder's parent / .near_duplicate.",
    )

    @model_validator(mode="after")
    def _ivf(self):
        if self.nlist == "auto":
            return self
        if self.nprobe > self.nlist:
            raise ValueError(f"nprobe {self.nprobe} is above nlist {self.nlist}; set nprobe <= nlist")
        if self.nlist > self.exact_up_to:
            raise ValueError(
                f"nlist {self.nlist} is above exact_up_to {self.exact_up_to}: IVF trains on the first "
                f"exact_up_to vectors and needs at least one per list; raise exact_up_to or lower nlist"
            )
        return self


class _Scope:
    """One index and its state file: the decisions so far, in order."""

    def __init__(self, path: Path, config: NearDuplicateFilterConfig, seeds: list[Path] = ()):
        self.path = path
        self.config = config
        self.ids: list[str] = []  # kept keys (`job\0id`), by index row
        self.decisions: dict[str, Filtered | None] = {}  # None: kept
        self.index = KeptIndex(config.exact_up_to, config.nlist, config.nprobe)
        self._load()
        for dataset in seeds:
            self._seed(dataset)

    def _seed(self, dataset: Path) -> None:
        """Index the vectors of one job's embeddings dataset whose keys the state file lacks."""
        job = dataset.name[: -len(EMBEDDINGS_SUFFIX)]
        ids, vectors = read_vectors(dataset, self.config.embedding_key)
        fresh = [n for n, rid in enumerate(ids) if f"{job}\0{rid}" not in self.decisions]
        if not fresh or (self.index.dim is not None and vectors.shape[1] != self.index.dim):
            return  # another embedder's vectors (other dimensions) are not comparable
        vectors = vectors[fresh]
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        usable = np.isfinite(norms[:, 0]) & (norms[:, 0] > 0)
        self.ids.extend(f"{job}\0{ids[n]}" for n, ok in zip(fresh, usable, strict=True) if ok)
        self.index.add(vectors[usable] / norms[usable])

    def _load(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        good, vectors, offset = 0, [], 0
        while offset + _HEAD.size <= len(data):
            kind, id_len, payload_len = _HEAD.unpack_from(data, offset)
            end = offset + _HEAD.size + id_len + payload_len
            if kind not in (KEPT, DROPPED) or end + _CRC.size > len(data):
                break
            if _CRC.unpack_from(data, end)[0] != zlib.crc32(data[offset:end]):
                break
            start = offset + _HEAD.size
            rid = data[start : start + id_len].decode()
            payload = data[start + id_len : end]
            if kind == KEPT:
                vectors.append(np.frombuffer(payload, dtype=np.float32))
                self.ids.append(rid)
                self.decisions[rid] = None
            else:
                entry = json.loads(payload)
                self.decisions[rid] = Filtered(entry["reason"], entry["scores"])
            offset = good = end + _CRC.size
        if good < len(data):  # a torn tail from a crash mid-append: cut it so appends stay framed
            with open(self.path, "r+b") as f:
                f.truncate(good)
                os.fsync(f.fileno())
        if vectors:
            vectors = np.stack(vectors)
            del data  # the file's bytes: not held beside the index while it is built
            self.index.add(vectors)

    def decide(self, ids: list[str], vectors: np.ndarray) -> list[dict[str, Any] | Filtered]:
        """Decide a group in order (a later one may duplicate an earlier one), persist, then index."""
        threshold = self.config.threshold
        sims, rows = self.index.search(vectors, threshold)
        # earlier members of the group at or above the threshold: the only ones that can decide
        products = vectors @ vectors.T
        close = np.tril(products, -1) >= threshold
        within = {i: np.flatnonzero(close[i]) for i in np.flatnonzero(close.any(axis=1))}
        kept_here: list[int] = []
        out: list[dict[str, Any] | Filtered] = []
        for i in range(len(ids)):
            best, of = float(sims[i]), (self.ids[rows[i]] if rows[i] >= 0 else None)
            earlier = [j for j in within.get(i, ()) if not isinstance(out[j], Filtered)]
            if earlier:
                j = earlier[int(np.argmax(products[i, earlier]))]
                if products[i, j] > best:
                    best, of = float(products[i, j]), ids[j]
            if of is not None and best >= threshold:
                s = round(best, 6)
                job, _, of_id = of.partition("\0")
                here = ids[i].partition("\0")[0]
                scores: dict[str, Any] = {"similarity": s, "duplicate_of": of_id}
                where = ""
                if job != here:
                    scores["duplicate_of_job"] = job
                    where = f" in job {job!r}"
                out.append(Filtered(f"near duplicate of {of_id!r}{where}: cosine {s} >= threshold {threshold}", scores))
            else:
                kept_here.append(i)
                out.append({})
        self._persist(ids, vectors, out)
        for rid, decision in zip(ids, out, strict=True):
            self.decisions[rid] = decision if isinstance(decision, Filtered) else None  # None: kept
        if kept_here:
            self.ids.extend(ids[i] for i in kept_here)
            self.index.add(vectors[kept_here])
        return out

    def _persist(self, ids: list[str], vectors: np.ndarray, out: list[dict[str, Any] | Filtered]) -> None:
        frames = []
        for rid, vector, decision in zip(ids, vectors, out, strict=True):
            key = rid.encode()
            if isinstance(decision, Filtered):
                kind, payload = DROPPED, json.dumps({"reason": decision.reason, "scores": decision.scores}).encode()
            else:
                kind, payload = KEPT, vector.astype(np.float32).tobytes()
            body = _HEAD.pack(kind, len(key), len(payload)) + key + payload
            frames.append(body + _CRC.pack(zlib.crc32(body)))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "ab") as f:
            before = f.tell()
            try:
                f.write(b"".join(frames))
                f.flush()
                os.fsync(f.fileno())
            except OSError:
                # leave no half frame behind: the batch fails whole and is retried from `before`
                f.truncate(before)
                raise


class NearDuplicateFilter(Stage):
    """Passes a record on unchanged (`{}`) or drops it as a near duplicate of a kept one."""

    registered_as = ("VideoFilter",)

    Config = NearDuplicateFilterConfig
    config: NearDuplicateFilterConfig

    @classmethod
    def requirements(cls, config: NearDuplicateFilterConfig) -> Requirements:
        return Requirements.of("curation", "faiss")

    def load(self) -> None:
        import faiss  # noqa: F401  (fail at load, not at the first batch, when faiss-cpu is missing)

        self._scopes: dict[Path, _Scope] = {}
        self._by_record: dict[tuple, _Scope] = {}  # (media folder, job) -> scope: no paths built per record

    def process(self, batch: list[dict[str, Any]]) -> list[dict[str, Any] | StageError | Filtered]:
        if not hasattr(self, "_scopes"):
            self.load()
        results: list[dict[str, Any] | StageError | Filtered | None] = [None] * len(batch)
        groups: dict[Path, list[tuple[int, str, np.ndarray]]] = {}
        for i, record in enumerate(batch):
            try:
                scope = self._scope(record)
                rid = f"{record.get(JOB, '')}\0{record[RECORD_ID]}"
                if rid in scope.decisions:  # decided before a restart: the same decision again
                    results[i] = scope.decisions[rid] or {}
                    continue
                vector = self._vector(record, scope)
            except StageError as error:
                results[i] = error
                continue
            group = groups.setdefault(scope.path, [])
            if group and group[0][2].shape != vector.shape:
                results[i] = StageError(
                    f"record {record[RECORD_ID]!r}: embedding has {vector.shape[0]} dimensions, "
                    f"{group[0][1].partition(chr(0))[2]!r} in the same "
                    f"batch has {group[0][2].shape[0]}; use one embedder per scope or a separate state_dir",
                    error_type="BadEmbedding",
                )
                continue
            group.append((i, rid, vector))
        for path, members in groups.items():
            scope = self._scopes[path]
            first: dict[str, int] = {}
            unique = []
            for i, rid, vector in members:
                if rid in first:  # the same id twice in a batch: one decision for both
                    continue
                first[rid] = i
                unique.append((i, rid, vector))
            decided = scope.decide([m[1] for m in unique], np.stack([m[2] for m in unique]))
            for (i, _, _), decision in zip(unique, decided, strict=True):
                results[i] = decision
            for i, rid, _ in members:
                if results[i] is None:
                    results[i] = results[first[rid]]
        self.usage["dedup_compared"] += sum(len(m) for m in groups.values())
        self.usage["dedup_dropped"] += sum(isinstance(r, Filtered) for r in results)
        return results  # type: ignore[return-value]

    def _scope(self, record: dict[str, Any]) -> _Scope:
        c = self.config
        key = (c.state_dir is None and record.get(MEDIA_DIR), c.scope == "job" and record.get(JOB, ""))
        scope = self._by_record.get(key)
        if scope is None:
            scope = self._by_record[key] = self._open(record)
        return scope

    def _open(self, record: dict[str, Any]) -> _Scope:
        c = self.config
        folder = c.state_dir
        if folder is None:
            media = record.get(MEDIA_DIR)
            if media is None:
                raise StageError(
                    f"record {record.get(RECORD_ID)!r} has no {MEDIA_DIR!r} and no state_dir is set; "
                    "set `state_dir:` in this step's config to the folder for the kept-state file",
                    error_type="ConfigError",
                )
            folder = Path(media).parent / ".near_duplicate"
        name = "outbox.kept" if c.scope == "outbox" else f"job-{safe_file_stem(str(record.get(JOB, '')))}.kept"
        path = Path(folder) / name
        scope = self._scopes.get(path)
        if scope is None:
            seeds: list[Path] = []
            outbox = record.get(OUTBOX_DIR)
            if outbox is not None and Path(outbox).is_dir():
                pattern = (
                    f"*{EMBEDDINGS_SUFFIX}" if c.scope == "outbox" else f"{record.get(JOB, '')}{EMBEDDINGS_SUFFIX}"
                )
                seeds = sorted(p for p in Path(outbox).glob(pattern) if p.is_dir())
            scope = self._scopes[path] = _Scope(path, c, seeds)
        return scope

    def _vector(self, record: dict[str, Any], scope: _Scope) -> np.ndarray:
        c, rid = self.config, record.get(RECORD_ID)
        value = record.get(c.embedding_key)
        if value is None:
            raise StageError(
                f"record {rid!r} has no {c.embedding_key!r}; expected an embedding (list of floats or a .npy "
                "path) there: put an embedder step before this filter or set embedding_key",
                error_type="MissingEmbedding",
            )
        try:
            if isinstance(value, (str, Path)):
                path = Path(value)
                if not path.is_absolute() and record.get(MEDIA_DIR) is not None:
                    path = Path(record[MEDIA_DIR]).parent / path
                vector = np.load(path, allow_pickle=False)
            else:
                vector = np.asarray(value, dtype=np.float32)
        except (OSError, ValueError, TypeError) as exc:
            raise StageError(
                f"record {rid!r}: cannot read {c.embedding_key!r} ({str(value)[:80]!r}) as a vector: {exc}; "
                "expected a list of floats or the path of a .npy file",
                error_type="BadEmbedding",
            ) from exc
        vector = np.asarray(vector, dtype=np.float32).reshape(-1)
        norm = float(np.sqrt(vector @ vector))
        if not np.isfinite(norm) or norm == 0:
            raise StageError(
                f"record {rid!r}: embedding in {c.embedding_key!r} has norm {norm}; expected a finite non-zero "
                "vector (check the embedder's output)",
                error_type="BadEmbedding",
            )
        if scope.index.dim is not None and vector.shape[0] != scope.index.dim:
            raise StageError(
                f"record {rid!r}: embedding has {vector.shape[0]} dimensions, the kept ones in {scope.path} have "
                f"{scope.index.dim}; use one embedder per scope or a separate state_dir",
                error_type="BadEmbedding",
            )
        return vector / norm
