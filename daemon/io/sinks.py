"""Shard sinks: training-ready copies of a job's results (WebDataset tars, Parquet files).

The results jsonl stays the ledger; a sink only follows it. `ShardSink` reads the complete
lines appended to the results file since it last looked, packs them into shards, and owns
its own folder `<path>/<job>/`:

    shard-000000.tar            complete shards (or part-000000.parquet)
    <bucket>/shard-000000.tar   with `bucket_by`, one series per bucket
    shards.jsonl                one line per complete shard: its file, bucket, ids, bytes

Exactly once across kill -9: a shard is written as `.tmp`, fsynced, renamed into place, and
only then listed in `shards.jsonl` (fsynced). On open, `.tmp` files and shard files that the
index does not list are deleted (they were not finished), and the ids the index lists are
skipped when the results are read again from the start. So no sample is in two shards and
none is missing: the samples of an unfinished shard are simply packed again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from daemon.config import OutputSpec, WebDatasetOutput
from daemon.io.embeddings import fsync_dir
from daemon.io.remote import RemoteFetchError, RemoteUnavailable, is_remote
from daemon.io.shard_files import BUCKETS, OpenShard, sample_key

log = logging.getLogger(__name__)

INDEX = "shards.jsonl"
__all__ = ["INDEX", "JobSinks", "ShardSink", "sample_key"]


def _fsync_append(path: Path, data: bytes) -> None:
    with path.open("ab") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


class ShardSink:
    """Follows one job's results file and writes its shards for one `daemon.outputs` entry."""

    def __init__(
        self,
        spec: OutputSpec,
        job: str,
        results: Path,
        relative_to: Path,
        video_key: str,
        text_key: str,
        fetch_remote: Callable[[str], Path] | None = None,
    ):
        self.spec = spec
        self.fetch_remote = fetch_remote  # a result that names a URL: its file from the media cache
        self.job = job
        self.results = results
        self.relative_to = relative_to
        self.video_key = video_key
        self.text_key = text_key
        self.folder = spec.path / job
        self._done: set[str] = set()
        self._next: dict[str, int] = {}
        self._open: dict[str, OpenShard] = {}
        self._offset = 0
        self.written_shards = 0

    # -- start-up -----------------------------------------------------------------------------
    def open(self) -> None:
        """Forget unfinished shards and learn which ids complete shards already hold."""
        self.folder.mkdir(parents=True, exist_ok=True)
        index = self.folder / INDEX
        listed: set[Path] = set()
        if index.exists():
            data = index.read_bytes()
            if data and not data.endswith(b"\n"):  # a torn last line: that shard was not listed
                data = data[: data.rfind(b"\n") + 1]
                index.write_bytes(data)
            for raw in data.splitlines():
                entry = orjson.loads(raw)
                listed.add(self.folder / entry["file"])
                self._done.update(entry["ids"])
                bucket = entry.get("bucket") or ""
                self._next[bucket] = max(self._next.get(bucket, 0), int(entry["index"]) + 1)
        suffix = self._suffix()
        for path in self.folder.rglob("*"):
            unfinished = path.name.endswith(".tmp") or (path.name.endswith(suffix) and path not in listed)
            if path.is_file() and unfinished:
                log.info("%s: discarding unfinished shard %s (its samples are packed again)", self.job, path)
                path.unlink()

    def _suffix(self) -> str:
        return ".tar" if isinstance(self.spec, WebDatasetOutput) else ".parquet"

    # -- following the results ----------------------------------------------------------------
    def poll(self) -> int:
        """Pack the complete result lines appended since the last call; returns how many were new."""
        if not self.results.exists():
            return 0
        with self.results.open("rb") as handle:
            handle.seek(self._offset)
            data = handle.read()
        end = data.rfind(b"\n")
        if end < 0:
            return 0
        self._offset += end + 1
        taken = 0
        for raw in data[: end + 1].splitlines():
            line = orjson.loads(raw)
            record_id = str(line.get("id"))
            if record_id in self._done:
                continue
            self._done.add(record_id)
            self._add(record_id, line)
            taken += 1
        return taken

    def finish(self) -> None:
        """The job ended: every partial shard is complete for it."""
        self.poll()
        for bucket in list(self._open):
            self._close(bucket)

    def abandon(self) -> None:
        for shard in self._open.values():
            shard.abandon()
        self._open.clear()

    def _bucket(self, line: dict) -> str:
        keys = getattr(self.spec, "bucket_by", None) or []
        return "_".join(BUCKETS[key](line) for key in keys)

    def _add(self, record_id: str, line: dict) -> None:
        bucket = self._bucket(line)
        shard = self._open.get(bucket)
        if shard is None:
            index = self._next.get(bucket, 0)
            stem = "shard" if isinstance(self.spec, WebDatasetOutput) else "part"
            final = (self.folder / bucket if bucket else self.folder) / f"{stem}-{index:06d}{self._suffix()}"
            shard = self._open[bucket] = OpenShard(bucket, index, final, isinstance(self.spec, WebDatasetOutput))
        shard.ids.append(record_id)
        if isinstance(self.spec, WebDatasetOutput):
            shard.add_members(sample_key(record_id), self._members(line))
        else:
            shard.lines.append(line)
            shard.bytes += len(orjson.dumps(line))
        if len(shard.ids) >= self._max_samples() or shard.bytes >= self._max_bytes():
            self._close(bucket)

    def _max_samples(self) -> int:
        spec = self.spec
        return spec.shard_max_samples if isinstance(spec, WebDatasetOutput) else spec.rows_per_file

    def _max_bytes(self) -> float:
        return self.spec.shard_max_bytes if isinstance(self.spec, WebDatasetOutput) else float("inf")

    def _media(self, value: Any, record_id: str = "") -> Path | None:
        if not isinstance(value, str) or not value:
            return None
        if is_remote(value):  # a row that named a URL and no step wrote a local file for it
            if self.fetch_remote is None:
                return None
            try:
                return self.fetch_remote(value)  # the cached copy, fetched again if it was evicted
            except (RemoteFetchError, RemoteUnavailable) as exc:
                log.warning(
                    "%s: sample %s: %s is not packed (%s); its .json still names the URL",
                    self.job,
                    record_id,
                    value,
                    exc,
                )
                return None
        path = Path(value)
        path = path if path.is_absolute() else self.relative_to / path
        return path if path.is_file() else None

    def _members(self, line: dict) -> list[tuple[str, bytes]]:
        """The files of one sample: extension -> bytes."""
        members: list[tuple[str, bytes]] = []
        for field in self.spec.fields:
            if field == "json":
                members.append(("json", orjson.dumps(line)))
            elif field == "txt":
                text = line.get(self.text_key)
                if isinstance(text, str):
                    members.append(("txt", text.encode()))
            elif field == "video":
                named = line.get(self.video_key)
                video = self._media(named, str(line.get("id")))
                if video is not None:
                    members.append((video.suffix.lstrip(".").lower() or "mp4", video.read_bytes()))
                elif isinstance(named, str) and named and not is_remote(named):
                    log.warning(
                        "%s: sample %s: its video %s is not there; packed without it", self.job, line.get("id"), named
                    )
            else:  # a result field: its file(s), or its value as json
                value = line.get(field)
                paths = value if isinstance(value, list) else [value]
                files = [self._media(v) for v in paths]
                if value is not None and files and all(files):
                    for n, path in enumerate(files):
                        name = f"{field}.{n:04d}" if isinstance(value, list) else field
                        members.append((f"{name}{path.suffix.lower()}", path.read_bytes()))
                elif value is not None:
                    members.append((f"{field}.json", orjson.dumps(value)))
        return members

    def _close(self, bucket: str) -> None:
        shard = self._open.pop(bucket)
        folder = shard.final.parent
        folder.mkdir(parents=True, exist_ok=True)
        if isinstance(self.spec, WebDatasetOutput):
            shard.seal_tar()
        else:
            self._write_parquet(shard.temporary, shard)
        size = shard.temporary.stat().st_size
        os.replace(shard.temporary, shard.final)
        fsync_dir(folder)
        entry = {
            "file": str(shard.final.relative_to(self.folder)),
            "bucket": bucket or None,
            "index": shard.index,
            "ids": shard.ids,
            "samples": len(shard.ids),
            "bytes": size,
        }
        _fsync_append(self.folder / INDEX, orjson.dumps(entry) + b"\n")
        self._next[bucket] = shard.index + 1
        self.written_shards += 1

    def _write_parquet(self, path: Path, shard: OpenShard) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        # One schema for every file: the fields trainers filter on as typed columns, the whole
        # result line as json (result lines differ from step to step and row to row).
        def text(value: Any) -> str | None:
            return value if isinstance(value, str) else None

        table = pa.table(
            {
                "id": pa.array([str(line.get("id")) for line in shard.lines], pa.string()),
                "job": pa.array([self.job] * len(shard.lines), pa.string()),
                "video": pa.array([text(line.get(self.video_key)) for line in shard.lines], pa.string()),
                "text": pa.array([text(line.get(self.text_key)) for line in shard.lines], pa.string()),
                "json": pa.array([orjson.dumps(line).decode() for line in shard.lines], pa.string()),
            }
        )
        with path.open("wb") as raw:
            pq.write_table(table, raw)
            raw.flush()
            os.fsync(raw.fileno())


class JobSinks:
    """A job's sinks, following its results file while the job runs (one task, owned here)."""

    POLL_S = 0.25

    def __init__(self, sinks: list[ShardSink]):
        self.sinks = sinks
        self._task: asyncio.Task | None = None
        self._stopping = asyncio.Event()

    async def __aenter__(self) -> JobSinks:
        if self.sinks:
            await asyncio.to_thread(self._open_all)
            self._task = asyncio.create_task(self._follow(), name=f"sinks-{self.sinks[0].job}")
        return self

    def _open_all(self) -> None:
        for sink in self.sinks:
            sink.open()

    async def _follow(self) -> None:
        # Stopped by an event, never cancelled: a cancel would leave the poll running in its
        # thread while `finish` starts in another, and two writers of one index lose shards.
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.POLL_S):
                    await self._stopping.wait()
            if not self._stopping.is_set():
                for sink in self.sinks:
                    await asyncio.shield(asyncio.to_thread(sink.poll))

    async def finish(self) -> None:
        """The job ended: pack what is left, close the partial shards."""
        await self._stop()
        for sink in self.sinks:
            await asyncio.to_thread(sink.finish)

    async def _stop(self) -> None:
        if self._task is not None:
            self._stopping.set()
            task, self._task = self._task, None
            await task  # re-raises a sink's failure (a full disk, an unwritable path)

    async def __aexit__(self, *exc_info) -> None:
        # An interrupted job keeps its open shards unwritten: the restart packs them again.
        try:
            await self._stop()
        finally:
            for sink in self.sinks:
                sink.abandon()
