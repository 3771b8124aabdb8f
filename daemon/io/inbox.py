"""Watch the inbox and hand over files once they have stopped changing.

watchfiles events are only hints that wake the scanner early: a full scan runs at start
and every `rescan_s`, because events get lost (NFS, overflowing inotify queues). A file is
settled once its size and mtime have not changed for `settle_ms`.

Only regular files are taken, never through a link: an entry that is a symlink is refused at
once (moved, as the link itself, to `inbox/.failed/` with a `.error.json` giving the reason),
so `ln -s /etc/passwd inbox/x.csv` never reads /etc/passwd. A FIFO, a folder or any other
non-regular entry named like a meta file is left alone, with one warning per path.
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

from daemon.io.jobs import record_failure
from daemon.io.readers import input_format

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
        self._warned: set[Path] = set()  # entries left alone and already logged; forgotten once gone

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
        notes: dict[Path, str] = {}  # entries left alone this scan -> why (logged once per path)
        for entry in entries:
            if is_ignored(entry.name, self.ignore):
                continue
            path = Path(entry.path)
            try:
                if entry.is_symlink():
                    if (note := self._refuse_link(path)) is not None:
                        notes[path] = note
                    continue
                if not entry.is_file(follow_symlinks=False):
                    if input_format(path) is not None:
                        notes[path] = (
                            f"{path} is not a regular file (a folder, FIFO, socket or device); left alone: "
                            "drop meta files and videos as regular files"
                        )
                    continue
                stat = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            found.append((path, stat.st_size, stat.st_mtime_ns, stat.st_ino))
        for path in notes.keys() - self._warned:
            log.warning("%s", notes[path])
        self._warned = set(notes)  # a path that went away and comes back is reported again
        return found

    def _refuse_link(self, path: Path) -> str | None:
        """Move a link (never what it points to) to .failed/; a note when it cannot be moved."""
        try:
            target = os.readlink(path)
        except OSError:
            target = "?"
        message = (
            f"{path.name}: is a symbolic link (to {target}); inbox entries must be regular files, "
            "never links: copy or move the file itself into the inbox"
        )
        try:
            moved = record_failure(self.folder, path, message)
        except FileNotFoundError:
            return None
        except OSError as exc:  # cannot move it: left where it is (logged once), never followed
            return f"{message}; it could not be moved to {self.folder / '.failed'} ({exc}), so it stays ignored"
        log.warning("%s; moved to %s", message, moved)
        return None

    async def _watch(self) -> None:
        try:
            import watchfiles

            async for _changes in watchfiles.awatch(self.folder, recursive=False, debounce=50, step=25):
                self._wake.set()
        except Exception as exc:  # a lost watch is not fatal: the rescan still finds everything
            log.warning("watching %s failed (%s); relying on the rescan every %.0f s", self.folder, exc, self.rescan_s)

    async def settled(self) -> AsyncIterator[Path]:
        """Yield each new file once it is settled. Runs until cancelled."""
        await asyncio.to_thread(self.folder.mkdir, parents=True, exist_ok=True)
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
