"""On a GPU: a heavy reload of a step with two workers on one GPU unloads each worker's model
before loading its replacement, so memory never holds three copies, while records keep flowing."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from tests.harness import DaemonProcess, jsonl, model_loads, reloads, wait_for, write_atomic, write_config
from tests.stages_for_tests import RELOAD_ENV

pytestmark = pytest.mark.gpu

BLOB_MIB = 2048


@pytest.fixture(autouse=True)
def _needs_cuda():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")


def test_heavy_reload_on_a_gpu_swaps_models_one_worker_at_a_time(tmp_path: Path):
    step = {
        "type": "Test",
        "name": "GpuBlob",
        "config": {"model_path": "v1", "size_mib": BLOB_MIB, "workers_per_device": 2},
    }
    config = {
        "steps": [step],
        "daemon": {"inbox": "inbox", "outbox": "outbox", "settle_ms": 50, "metrics": {"port": 0}},
    }
    path = write_config(tmp_path, config)
    with DaemonProcess(path, env=RELOAD_ENV) as daemon:
        assert model_loads(daemon.metrics()) == 2
        for round_ in range(3):
            daemon.drop_text(f"r{round_}.jsonl", jsonl([{"id": f"{round_}-{i}"} for i in range(3000)]))
            time.sleep(0.3)
            step["config"]["model_path"] = f"v{round_ + 2}"
            write_atomic(path, yaml.safe_dump(config))
            wait_for(lambda r=round_: reloads(daemon) == (r + 1, 0), 60, f"reload {round_}", daemon)
        results = []
        for round_ in range(3):
            assert daemon.wait_for_job(f"r{round_}", timeout=120)["state"] == "done"
            results += daemon.results(f"r{round_}")
        loads = model_loads(daemon.metrics())
        assert daemon.stop() == 0
    assert loads == 2 + 3 * 2
    assert {r["device"] for r in results} == {"cuda:0"}
    assert len({r["id"] for r in results}) == len(results) == 9000
    peak = max(r["gpu_mib"] for r in results)
    assert peak <= 2 * BLOB_MIB + 64, f"{peak} MiB allocated: a new model was loaded before the old one was freed"
    assert {r["model"] for r in results} >= {"v2", "v3", "v4"}
