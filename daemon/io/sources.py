"""Remote sources of meta files: `daemon.sources` prefixes polled like the inbox.

Each entry names a prefix (`s3://bucket/incoming/`, or an `http(s)://` folder whose index
page links its files; anything fsspec lists) that the daemon lists every `poll_s`. An object
with a meta-file extension that it has not taken before (or whose etag/size changed) is
copied into the inbox the safe way (a dot-name `.tmp`, then a rename), so from there on it is
an ordinary inbox file: claimed, read, resumed, moved to `.done/`. What was taken is kept in
`<outbox>/.reelflow/sources.json`, so a restart does not take it again.
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import logging
import os
from pathlib import Path, PurePosixPath

from daemon.config import SourceSpec

log = logging.getLogger(__name__)

META_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")


class SourcePoller:
    """Lists the configured prefixes and copies new meta files into the inbox (one task, owned)."""

    def __init__(self, sources: list[SourceSpec], inbox: Path, state_file: Path):
        self.sources = sources
        self.inbox = inbox
        self.state_file = state_file
        self.taken: dict[str, str] = json.loads(state_file.read_text()) if state_file.exists() else {}
        self._task: asyncio.Task | None = None

    def start(self) -> SourcePoller:
        if self.sources:
            self._task = asyncio.create_task(self._run(), name="sources")
        return self

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        due = dict.fromkeys(range(len(self.sources)), 0.0)
        while True:
            for n, source in enumerate(self.sources):
                if loop.time() >= due[n]:
                    due[n] = loop.time() + source.poll_s
                    try:
                        await asyncio.to_thread(self.poll, source)
                    except Exception as failure:  # a source that is down now: said, and asked again later
                        log.warning(
                            "source %s: %s: %s; next try in %.0f s",
                            source.url,
                            type(failure).__name__,
                            failure,
                            source.poll_s,
                        )
            await asyncio.sleep(min(1.0, min(s.poll_s for s in self.sources)))

    def poll(self, source: SourceSpec) -> list[Path]:
        """One listing: copy what is new into the inbox; returns the inbox paths written."""
        import fsspec

        fs, root = fsspec.core.url_to_fs(source.url)
        fs.invalidate_cache(root)  # fsspec caches listings: each poll must see the store as it is now
        entries = fs.ls(root, detail=True)
        dropped: list[Path] = []
        for entry in sorted(entries, key=lambda e: e["name"]):
            if entry.get("type") == "directory":
                continue
            name = PurePosixPath(entry["name"]).name
            if not name.endswith(META_SUFFIXES) or not fnmatch.fnmatchcase(name, source.pattern):
                continue
            url = fs.unstrip_protocol(entry["name"]) if hasattr(fs, "unstrip_protocol") else entry["name"]
            version = str(entry.get("ETag") or entry.get("etag") or entry.get("size"))
            if self.taken.get(url) == version:
                continue
            target = self.inbox / name
            if target.exists():  # the previous one under this name is not claimed yet: next poll
                continue
            temporary = self.inbox / f".{name}.{os.getpid()}.tmp"
            self.inbox.mkdir(parents=True, exist_ok=True)
            fs.get_file(entry["name"], str(temporary))
            os.replace(temporary, target)
            self.taken[url] = version
            self._save()
            log.info("source %s: took %s into the inbox", source.url, name)
            dropped.append(target)
        return dropped

    def _save(self) -> None:
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.state_file.with_name(self.state_file.name + ".tmp")
        with temporary.open("w") as handle:
            json.dump(self.taken, handle, indent=1, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, self.state_file)
