"""The inbox watcher: ignored names, settling, file events as hints, the rescan as the safety net."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from daemon.io.inbox import Inbox, is_ignored

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize(
    ("name", "ignored"),
    [
        (".hidden.jsonl", True),
        ("a.tmp", True),
        ("a.jsonl.part", True),
        ("a.partial", True),
        ("a.jsonl~", True),
        ("a.jsonl", False),
        ("a.tmp.jsonl", False),
        ("part.csv", False),
        ("clip.mp4", False),
    ],
)
def test_ignored_names(name, ignored):
    assert is_ignored(name) is ignored


async def collect(inbox: Inbox, into: list, stop: asyncio.Event) -> None:
    async for path in inbox.settled():
        into.append((path.name, time.monotonic()))
        if stop.is_set():
            return


async def wait_for(items: list, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while len(items) < count:
        assert time.monotonic() < deadline, f"only {items} after {timeout} s"
        await asyncio.sleep(0.02)


async def test_settles_then_yields_once_and_skips_ignored(tmp_path):
    inbox = Inbox(tmp_path, settle_ms=300, rescan_s=0.1)
    seen: list = []
    task = asyncio.create_task(collect(inbox, seen, asyncio.Event()))
    try:
        for name in (".x.jsonl", "x.tmp", "x.part", "x.partial", "x~"):
            (tmp_path / name).write_text("{}\n")
        (tmp_path / "sub").mkdir()  # folders are not files to take
        growing = tmp_path / "growing.jsonl"
        started = time.monotonic()
        with growing.open("w") as handle:
            for n in range(12):
                handle.write(f'{{"id": {n}}}\n')
                handle.flush()
                os.utime(growing)  # the writer keeps touching it
                await asyncio.sleep(0.05)
        written = time.monotonic()
        await wait_for(seen, 1, 10)
        name, at = seen[0]
        assert name == "growing.jsonl"
        assert at - written >= 0.25, "taken before it was stable for settle_ms"
        assert at - started >= 0.6
        await asyncio.sleep(0.5)
        assert len(seen) == 1  # yielded once, although it is still there (the claimer moves it)
        growing.rename(tmp_path / ".done-elsewhere")
        (tmp_path / "growing.jsonl").write_text("new content\n")  # a new file of the same name later
        await wait_for(seen, 2, 10)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_file_events_wake_the_scanner_early(tmp_path):
    inbox = Inbox(tmp_path, settle_ms=50, rescan_s=30)  # the periodic rescan alone would take 30 s
    seen: list = []
    task = asyncio.create_task(collect(inbox, seen, asyncio.Event()))
    try:
        await asyncio.sleep(0.5)  # the first scan is done and the watch is up
        (tmp_path / "a.jsonl").write_text("{}\n")
        await wait_for(seen, 1, 10)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_the_rescan_finds_files_when_events_are_lost(tmp_path, monkeypatch):
    async def no_events(self):
        await asyncio.sleep(3600)

    monkeypatch.setattr(Inbox, "_watch", no_events)
    inbox = Inbox(tmp_path, settle_ms=50, rescan_s=0.3)
    seen: list = []
    task = asyncio.create_task(collect(inbox, seen, asyncio.Event()))
    try:
        await asyncio.sleep(0.2)
        (tmp_path / "a.jsonl").write_text("{}\n")
        await wait_for(seen, 1, 10)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_missing_inbox_is_created(tmp_path):
    folder = tmp_path / "not" / "yet"
    inbox = Inbox(folder, settle_ms=0, rescan_s=0.1)
    seen: list = []
    task = asyncio.create_task(collect(inbox, seen, asyncio.Event()))
    try:
        await asyncio.sleep(0.3)
        assert folder.is_dir()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


@pytest.mark.parametrize("turns", range(5))
async def test_a_cancel_landing_with_a_file_event_is_not_swallowed(tmp_path, turns):
    """Python 3.11's wait_for returns normally when the awaited event fires as the cancel lands,
    which left the daemon's shutdown waiting for an inbox that never stopped."""
    inbox = Inbox(tmp_path, settle_ms=0, rescan_s=30)
    task = asyncio.create_task(collect(inbox, [], asyncio.Event()))
    await asyncio.sleep(0.3)  # scanned, now waiting for an event or the rescan
    inbox._wake.set()
    for _ in range(turns):
        await asyncio.sleep(0)
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=5)
    assert done, f"the inbox ignored its cancellation (event set {turns} loop turns before)"
