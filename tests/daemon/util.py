"""Small helpers shared by the daemon's end-to-end tests."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.harness import write_config

ECHO = {"type": "Test", "name": "Echo"}


def wait_until(
    predicate: Callable[[], Any], timeout: float = 60, what: str = "condition", log: Callable[[], str] | None = None
):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise TimeoutError(f"{what} not reached after {timeout} s" + (f"\n{log()[-4000:]}" if log else ""))


def daemon_config(folder: Path, steps: list[dict], *, meta_folder: Path | None = None, **daemon: Any) -> Path:
    """A serve config writing to folder/inbox and folder/outbox, metrics on a free port."""
    section = {"inbox": "inbox", "outbox": "outbox", "settle_ms": 200, "rescan_s": 2, "metrics": {"port": 0}}
    section.update(daemon)
    config: dict[str, Any] = {"steps": steps, "daemon": section}
    if meta_folder is not None:
        config["meta_folder"] = str(meta_folder)
    return write_config(folder, config)
