"""Helpers shared by the operations tests (reload, sd_notify, monitoring)."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import yaml

from tests.harness import DaemonProcess, metric_value


def digest_of(text: str) -> str:
    """What the daemon records as `_config_hash` for a config file with this text."""
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def write_atomic(path: Path, text: str) -> None:
    """Write a config the way the docs ask (temporary name, then rename into place)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def dump(config: dict[str, Any]) -> str:
    return yaml.safe_dump(config, sort_keys=False)


def reloads(daemon: DaemonProcess) -> tuple[float, float]:
    text = daemon.metrics()
    return (
        metric_value(text, "reelflow_config_reloads_total", result="ok"),
        metric_value(text, "reelflow_config_reloads_total", result="error"),
    )


def model_loads(text: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "reelflow_model_loads_total"
    )


def config_in_force(text: str) -> str | None:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "reelflow_config_info" and sample.value == 1:
                return sample.labels["digest"]
    return None


def wait_for(predicate, timeout: float, what: str, daemon: DaemonProcess | None = None, poll: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if daemon is not None and daemon.process.poll() is not None:
            raise AssertionError(f"daemon died while waiting for {what}:\n{daemon.log()[-4000:]}")
        time.sleep(poll)
    log = daemon.log()[-4000:] if daemon is not None else ""
    raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{log}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)
