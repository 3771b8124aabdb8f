"""Pieces of the stage graph and the metrics server, in process."""

from __future__ import annotations

import asyncio

import pytest

from daemon.config import parse_config
from daemon.hosts.local import LocalHost, worker_devices
from daemon.metrics import Metrics, MetricsServer
from daemon.runtime.batching import batch_limits
from daemon.runtime.outcomes import JobRun
from daemon.runtime.pipeline import Pipeline

pytestmark = pytest.mark.timeout(60)


def step(name: str, **settings):
    text = f"steps:\n  - type: Test\n    name: {name}\n    config: {settings!r}\n".replace("'", '"')
    return parse_config(text).steps[0]


@pytest.mark.parametrize(
    ("name", "settings", "gpus", "expected"),
    [
        ("Echo", {}, ["cuda:0", "cuda:1"], ["cpu"]),  # a CPU tool stays on the CPU
        ("Echo", {"workers_per_device": 3}, [], ["cpu", "cpu", "cpu"]),
        ("Echo", {"devices": ["cuda:1"]}, [], ["cuda:1"]),
        ("Accel", {}, ["cuda:0", "cuda:1"], ["cuda:0", "cuda:1"]),  # one worker per visible GPU
        ("Accel", {}, [], ["cpu"]),
        (
            "Accel",
            {"devices": ["cuda:2", "cuda:3"], "workers_per_device": 2},
            [],
            ["cuda:2", "cuda:2", "cuda:3", "cuda:3"],
        ),
        (
            "Accel",
            {"tensor_parallel_size": 2},
            ["cuda:0", "cuda:1", "cuda:2", "cuda:3"],
            ["cuda:0,cuda:1", "cuda:2,cuda:3"],
        ),
        ("Accel", {"tensor_parallel_size": 2}, ["cuda:0", "cuda:1", "cuda:2"], ["cuda:0,cuda:1"]),
    ],
)
def test_worker_devices(name, settings, gpus, expected):
    assert worker_devices(step(name, **settings), gpus=lambda: gpus) == expected


async def test_job_run_finishes_when_read_and_settled():
    run = JobRun("j", writer=None)
    run.admit()
    run.admit()
    run.settle(ok=1)
    assert not run.idle.is_set() and not run.finished.is_set()
    run.settle(errors=1)
    assert run.idle.is_set() and not run.finished.is_set()  # the reader is not done yet
    run.mark_read()
    assert run.finished.is_set() and (run.ok, run.errors, run.outstanding) == (1, 1, 0)


async def _get(port: int, path: str) -> tuple[str, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return head.decode().splitlines()[0], body


async def test_metrics_server():
    metrics = Metrics()
    ready = {"now": False}
    server = MetricsServer(metrics, "127.0.0.1", 0, lambda: ready["now"])
    url = await server.start()
    try:
        assert url == f"http://127.0.0.1:{server.port}/metrics" and server.port > 0
        assert await _get(server.port, "/healthz") == ("HTTP/1.1 200 OK", b"ok\n")
        assert (await _get(server.port, "/readyz"))[0] == "HTTP/1.1 503 Service Unavailable"
        ready["now"] = True
        assert await _get(server.port, "/readyz") == ("HTTP/1.1 200 OK", b"ready\n")
        metrics.records.labels("step_0_A_B", "ok").inc(3)
        status, body = await _get(server.port, "/metrics?x=1")
        assert status == "HTTP/1.1 200 OK"
        assert b'reelflow_records_total{status="ok",step="step_0_A_B"} 3.0' in body
        for name in (b"reelflow_jobs", b"reelflow_config_reloads_total", b"reelflow_generated_frames_total"):
            assert name in body
        assert (await _get(server.port, "/other"))[0] == "HTTP/1.1 404 Not Found"
        busy = MetricsServer(metrics, "127.0.0.1", server.port, lambda: True)
        with pytest.raises(OSError, match="pick another daemon.metrics.port"):
            await busy.start()
    finally:
        await server.stop()


def any_step(kind: str, name: str, **settings):
    text = f"steps:\n  - type: {kind}\n    name: {name}\n    config: {settings!r}\n".replace("'", '"')
    return parse_config(text).steps[0]


def test_batch_limits_and_placement_come_from_what_the_stage_declares():
    # An API step: no device, max_num_seqs requests in flight = max_num_seqs / batch_size batches.
    api = any_step("TextGenerator", "GPTTextGenerator", model="m", max_num_seqs=8, batch_size=2, api_key="k")
    assert worker_devices(api, gpus=lambda: ["cuda:0"]) == ["cpu"]
    assert batch_limits(api, api.stage_cls.resources(api.config)).concurrency == 4
    # The same stage on a local transformers model: one GPU per worker, one generate at a time.
    local = any_step("TextGenerator", "GPTTextGenerator", model="m", backend="transformers", max_num_seqs=8)
    assert worker_devices(local, gpus=lambda: ["cuda:0", "cuda:1"]) == ["cuda:0", "cuda:1"]
    assert batch_limits(local, local.stage_cls.resources(local.config)).concurrency == 1
    host = LocalHost(local.stage_cls, local.config, "cpu", 1, "w")
    assert Pipeline.limits_for(local, host).concurrency == 1 and not host.resources().asynchronous


def test_out_of_memory_advice_is_the_stages_own():
    caption = any_step("VideoCaptioner", "Qwen2VLCaptioner", model_path="Qwen/Qwen2-VL-2B-Instruct")
    echo = step("Echo")
    assert "max_pixels/num_frames" in caption.stage_cls.out_of_memory_advice(caption.config)
    assert "max_pixels" not in echo.stage_cls.out_of_memory_advice(echo.config)
