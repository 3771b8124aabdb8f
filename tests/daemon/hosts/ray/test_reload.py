"""Hot reload of a daemon whose workers are Ray actors: light changes reach the actors in
place, a `workers` change replaces them, the cluster address cannot change live."""

from __future__ import annotations

import signal

import pytest
import yaml

from tests.daemon.hosts.ray.test_failures import STEP, crashy_config, daemon_env, drop_job, finish
from tests.harness import DaemonProcess, metric_value, reloads, wait_for, write_atomic

pytestmark = pytest.mark.ray


def reload_with(daemon: DaemonProcess, settings: dict, result: str = "ok") -> None:
    before = reloads(daemon)
    write_atomic(daemon.config_path, yaml.safe_dump(settings, sort_keys=False))
    daemon.process.send_signal(signal.SIGHUP)
    index = 0 if result == "ok" else 1
    wait_for(lambda: reloads(daemon)[index] > before[index], 60, f"a reload ({result})", daemon)


def test_reload_reaches_ray_actors(tmp_path, ray_cluster):
    config = crashy_config(tmp_path, ray_cluster, count=1)
    settings = yaml.safe_load(config.read_text())
    step = settings["steps"][0]["config"]
    step["tag"] = "a"
    config.write_text(yaml.safe_dump(settings, sort_keys=False))
    with DaemonProcess(config, env=daemon_env()) as daemon:
        ids = drop_job(daemon, "first", 8)
        results, _ = finish(daemon, "first", ids)
        assert {r["tag"] for r in results} == {"a"}
        loads = metric_value(daemon.metrics(), "reelflow_model_loads_total", step=STEP)

        step["tag"] = "b"  # light: the actor gets it with its next call, no new actor
        reload_with(daemon, settings)
        ids = drop_job(daemon, "second", 8)
        results, _ = finish(daemon, "second", ids)
        assert {r["tag"] for r in results} == {"b"}
        assert metric_value(daemon.metrics(), "reelflow_model_loads_total", step=STEP) == loads

        settings["workers"]["call_timeout_s"] = 20  # top level: what the step's actors get changed
        step["workers"]["count"] = 2
        reload_with(daemon, settings)
        ids = drop_job(daemon, "third", 16)
        results, errors = finish(daemon, "third", ids)
        assert errors == [] and {r["tag"] for r in results} == {"b"}
        metrics = daemon.metrics()
        for n in range(2):
            name = f"reelflow:{STEP}:{n}"
            assert metric_value(metrics, "reelflow_worker_state", step=STEP, worker=name, state="alive") == 1

        settings["workers"]["address"] = "127.0.0.1:1"
        reload_with(daemon, settings, result="error")
        assert "workers.address: cannot change while the daemon runs" in daemon.log()
