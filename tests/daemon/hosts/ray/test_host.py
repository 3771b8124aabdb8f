"""RayHost in this process (the test process is a driver on the session cluster): config
changes reach the actor, also after a restart between calls, and the restart is counted."""

from __future__ import annotations

import contextlib
import time

import pytest

from daemon.config import parse_config
from daemon.metrics import Metrics
from daemon.runtime.pipeline import Pipeline
from tests.daemon.hosts.ray.conftest import NAMESPACE
from tests.harness import metric_value

pytestmark = pytest.mark.ray


def crashy_pipeline(cluster, monkeypatch) -> Pipeline:
    from tests.stages_for_tests import RAY_STAGES

    monkeypatch.setenv("REELFLOW_EXTRA_STAGES", RAY_STAGES)
    workers = cluster.workers_section(count=1, num_gpus=0.5)
    text = f"""
workers: {workers}
steps:
  - type: Test
    name: Crashy
    config: {{tag: a, batch_size: 2}}
"""
    return Pipeline(parse_config(text), Metrics())


async def test_config_changes_reach_the_actor_even_after_a_restart_between_calls(ray_cluster, monkeypatch):
    import ray

    pipeline = crashy_pipeline(ray_cluster, monkeypatch)
    await pipeline.connect()
    pipeline.build_workers()
    [worker] = pipeline.workers[0]
    assert worker.limits.concurrency == 2  # two calls in flight per actor
    host = worker.host
    await pipeline.load()
    try:
        batch = [{"id": "x", "_job": "j"}, {"id": "y", "_job": "j"}]
        first = await host.process(batch)
        assert [o["tag"] for o in first] == ["a", "a"] and first[0]["device"] == "cuda:0"
        step = pipeline.steps[0]
        host.reconfigure(step.config.model_copy(update={"tag": "b"}))
        assert [o["tag"] for o in await host.process(batch)] == ["b", "b"]

        actor = ray.get_actor(host.name, namespace=NAMESPACE)
        ray.kill(actor, no_restart=False)  # idle: Ray restarts it, the host is not told
        deadline = time.monotonic() + 30
        while True:  # (the Worker would retry a call that meets the restart; here we wait it out)
            with contextlib.suppress(ray.exceptions.ActorUnavailableError):
                if ray.get(actor.info.remote(), timeout=10)["pid"] != first[0]["pid"]:
                    break
            assert time.monotonic() < deadline, "the actor did not come back"
            time.sleep(0.2)
        again = await host.process(batch)
        assert [o["tag"] for o in again] == ["b", "b"]  # the restarted actor got the current config
        assert again[0]["pid"] != first[0]["pid"]
        metrics = pipeline.metrics.render().decode()
        assert metric_value(metrics, "reelflow_worker_restarts_total", step=step.label) == 1
        assert host.take_usage()["requests"] == 6
    finally:
        await pipeline.close()
    assert metric_value(pipeline.metrics.render().decode(), "reelflow_worker_state", state="dead") == 1
