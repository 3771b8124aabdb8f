"""What a stage's child processes see of the GPUs when the stage runs in the daemon's process
(`LocalHost`): only the worker's own device, counted through the daemon's own mask, and the
daemon's environment is as it was once the child has started. Real child processes, started
the way a vLLM engine core is (inside `stages.base.spawning(device)`)."""

from __future__ import annotations

import asyncio
import os
import pickle
import subprocess
import sys
from typing import Any

import pytest

from daemon.hosts.devices import visible_devices
from daemon.hosts.local import LocalHost
from stages.base import Stage, StageConfig, spawning

SHOW = "import os; print(os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>'))"


def child_mask(device: str) -> str:
    with spawning(device):
        return subprocess.run([sys.executable, "-c", SHOW], capture_output=True, text=True, check=True).stdout.strip()


class Spawner(Stage):
    """Starts a child at load (as an engine starts) and again per batch (as an engine is rebuilt)."""

    def load(self) -> None:
        self.at_load = child_mask(self.device)

    def process(self, batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{"at_load": self.at_load, "later": child_mask(self.device)} for _ in batch]


def host(device: str) -> LocalHost:
    return LocalHost(Spawner, StageConfig(), device, prep_workers=1, label=f"spawner-{device}")


async def answers(*devices: str) -> list[dict[str, Any]]:
    hosts = [host(device) for device in devices]
    try:
        await asyncio.gather(*(h.load() for h in hosts))
        return [(await h.process([{"id": "1"}]))[0] for h in hosts]
    finally:
        await asyncio.gather(*(h.close() for h in hosts))


async def test_each_workers_children_see_only_its_gpus(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    got = await answers("cuda:0", "cuda:1", "cuda:2,cuda:3", "cpu")
    assert [a["at_load"] for a in got] == ["0", "1", "2,3", "<unset>"]
    assert [a["later"] for a in got] == ["0", "1", "2,3", "<unset>"]
    assert "CUDA_VISIBLE_DEVICES" not in os.environ  # put back after each start


async def test_the_daemons_own_mask_is_respected(monkeypatch):
    """A daemon started with CUDA_VISIBLE_DEVICES=4,6 calls those GPUs cuda:0 and cuda:1."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    got = await answers("cuda:1", "cuda:0,cuda:1")
    assert [a["at_load"] for a in got] == ["6", "4,6"]
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "4,6"


def test_a_device_outside_the_daemons_mask_is_refused_with_the_fix():
    with pytest.raises(RuntimeError, match=r"'cuda:2' is not among the GPUs this process sees .*cuda:0\.\.cuda:1"):
        visible_devices("cuda:2", "4,6")
    assert visible_devices("cuda:0,1", None) == "0,1" and visible_devices("cuda", "3") == "3"


def test_a_device_sent_to_another_process_is_a_plain_name():
    """The rule belongs to the host of this process: a Ray actor gets a plain device name."""
    device = host("cuda:1").stage.device
    assert device == "cuda:1" and device.confine is not None
    copy = pickle.loads(pickle.dumps(device))
    assert copy == "cuda:1" and type(copy) is str
