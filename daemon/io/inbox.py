"""Watch the inbox and hand over files once they have stopped changing.

watchfiles events are only hints that wake the scanner early: a full scan runs at start
and every `rescan_s`, because events get lost (NFS, overflowing inotify queues). A file is
settled once its size and mtime have not changed for `settle_ms`.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import logging
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

log = logging.getLogger(__name__)

WATCH_START_S = 3.0  # how long the file watch may take to start after the first scan
DEFAULT_IGNORE = (".*", "*.tmp", "*.part", "*.partial", "*~")


def is_ignored(name: str, patterns: tuple[str, ...] | list[str] = DEFAULT_IGNORE) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in patterns)


class Inbox:
    def __init__(self, folder: Path, settle_ms: int, rescan_s: float, ignore: tuple[str, ...] = DEFAULT_IGNORE):
        self.folder = folder
        self.settle_s = settle_ms / 1000
        self.rescan_s = rescan_s
        self.ignore = tuple(ignore)
        self._wake = asyncio.Event()
        self._pending: dict[Path, tuple[int, int, float]] = {}  # path -> (size, mtime_ns, unchanged since)
        # yielded, not yet moved away by the claimer -> its (size, mtime_ns, inode) then; another file
        # renamed in under the same name before the next scan differs, and is a new file to take.
        self._taken: dict[Path, tuple[int, int, int]] = {}

    def configure(self, settle_ms: int, rescan_s: float, ignore: tuple[str, ...]) -> None:
        """New settings from a config reload; they apply from the next scan, which starts now."""
        self.settle_s = settle_ms / 1000
        self.rescan_s = rescan_s
        self.ignore = tuple(ignore)
        self._wake.set()

    def _scan(self) -> list[tuple[Path, int, int, int]]:
        found = []
        try:
            entries = list(os.scandir(self.folder))
        except FileNotFoundError:
            return []
        for entry in entries:
            if is_ignored(entry.name, self.ignore):
                continue
            try:
                if not entry.is_file():
                    continue
                stat = entry.stat()
            except FileNotFoundError:
                continue
            found.append((Path(entry.path), stat.st_size, stat.st_mtime_ns, stat.st_ino))
        return found

    async def _watch(self) -> None:
        try:
            import watchfiles

            async for _changes in watchfiles.awatch(self.folder, recursive=False, debounce=50, step=25):
                self._wake.set()
        except Exception as exc:  # a lost watch is not fatal: the rescan still finds everything
            log.warning("watching %s failed (%s); relying on the rescan every %.0f s", self.folder, exc, self.rescan_s)

    async def settled(self) -> AsyncIterator[Path]:
        """Yield each new file once it is settled. Runs until cancelled."""
        self.folder.mkdir(parents=True, exist_ok=True)
        watcher = asyncio.create_task(self._watch(), name="inbox-watch")
        # The watch starts after the first scan; until it surely runs, rescan often, or a file
        # dropped in between would wait for the next full rescan.
        watch_settled_at = time.monotonic() + WATCH_START_S
        try:
            while True:
                self._wake.clear()
                now = time.monotonic()
                seen = await asyncio.to_thread(self._scan)
                present = set()
                for path, size, mtime, inode in seen:
                    present.add(path)
                    if path in self._taken:
                        if self._taken[path] == (size, mtime, inode):
                            continue
                        del self._taken[path]
                    previous = self._pending.get(path)
                    if previous is None or previous[:2] != (size, mtime):
                        self._pending[path] = (size, mtime, now)
                    elif now - previous[2] >= self.settle_s:
                        del self._pending[path]
                        self._taken[path] = (size, mtime, inode)
                        yield path
                for gone in set(self._pending) - present:
                    del self._pending[gone]
                for gone in set(self._taken) - present:
                    del self._taken[gone]
                wait = min(self.rescan_s, max(0.05, self.settle_s / 2)) if self._pending else self.rescan_s
                if now < watch_settled_at:
                    wait = min(wait, 0.25)
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a cancellation that
                # lands as the event is set (a file event), and the daemon's shutdown then hangs.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._wake.wait()
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
