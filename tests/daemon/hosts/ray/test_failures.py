"""Workers on Ray that die, hang or crash: every record still ends once, in results or errors.

One daemon (two CPU actors of the test-only `Crashy` stage) serves the scenarios as
successive jobs; the test process is a driver on the same cluster, so it can find the
actors by name (`reelflow:<step>:<n>`) and kill them.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.daemon.hosts.ray.conftest import NAMESPACE, ray_env
from tests.harness import DaemonProcess, metric_value, write_config
from tests.stages_for_tests import RAY_STAGES

pytestmark = pytest.mark.ray

STEP = "step_0_Test_Crashy"
ACTORS = [f"reelflow:{STEP}:{n}" for n in range(2)]


def crashy_config(folder: Path, cluster, drain_timeout_s: float = 60, **workers) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    settings = {
        "count": 2,
        "num_gpus": 0,
        "call_timeout_s": 2,
        "start_timeout_s": 30,
        "replace_backoff_s": 0.5,
        **workers,
    }
    return write_config(
        folder,
        {
            "workers": cluster.workers_section(),
            "steps": [
                {
                    "type": "Test",
                    "name": "Crashy",
                    "config": {
                        "batch_size": 4,
                        "sleep_s": 0.05,
                        "fail_load_if": str(folder / "refuse-load"),
                        "workers": settings,
                    },
                }
            ],
            "daemon": {
                "inbox": "inbox",
                "outbox": "outbox",
                "settle_ms": 50,
                "rescan_s": 1,  # a file dropped just after start-up can miss the inbox watch (a core race)
                "drain_timeout_s": drain_timeout_s,
                "metrics": {"port": 0},
            },
        },
    )


def daemon_env() -> dict[str, str]:
    return {"RAY_AUTH_MODE": "disabled", "REELFLOW_EXTRA_STAGES": RAY_STAGES, "PYTHONPATH": ray_env()["PYTHONPATH"]}


@pytest.fixture(scope="module")
def daemon(ray_cluster, tmp_path_factory):
    with DaemonProcess(crashy_config(tmp_path_factory.mktemp("crashy"), ray_cluster), env=daemon_env()) as process:
        yield process


def drop_job(daemon: DaemonProcess, job: str, count: int, actions: dict[int, str] | None = None) -> list[str]:
    actions = actions or {}
    rows = [{"id": f"{job}-{i}", **({"action": actions[i]} if i in actions else {})} for i in range(count)]
    daemon.drop_text(f"{job}.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
    return [row["id"] for row in rows]


def wait_for_results(daemon: DaemonProcess, job: str, at_least: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while len(daemon.results(job)) < at_least:
        assert time.monotonic() < deadline, (
            f"fewer than {at_least} results for {job} after {timeout} s:\n{daemon.log()[-4000:]}"
        )
        time.sleep(0.02)


def finish(daemon: DaemonProcess, job: str, ids: list[str], timeout: float = 90) -> tuple[list[dict], list[dict]]:
    """Wait for the job; every id ends exactly once, in results or in errors."""
    assert daemon.wait_for_job(job, timeout=timeout)["state"] == "done"
    results, errors = daemon.results(job), daemon.errors(job)
    ended = Counter([r["id"] for r in results] + [e["id"] for e in errors])
    assert sorted(ended) == sorted(ids), "a record was lost"
    assert max(ended.values()) == 1, f"a record ended twice: {[i for i, n in ended.items() if n > 1]}"
    return results, errors


def restarts(daemon: DaemonProcess) -> float:
    return metric_value(daemon.metrics(), "reelflow_worker_restarts_total", step=STEP)


def actor_pid(daemon: DaemonProcess, name: str) -> int:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(daemon.metrics()):
        for sample in family.samples:
            if sample.name == "reelflow_worker_info" and sample.labels.get("worker") == name:
                return int(sample.labels["pid"])
    raise AssertionError(f"no reelflow_worker_info for {name}")


def wait_alive(daemon: DaemonProcess, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not all(
        metric_value(daemon.metrics(), "reelflow_worker_state", step=STEP, worker=n, state="alive") == 1 for n in ACTORS
    ):
        assert time.monotonic() < deadline, "actors not alive again"
        time.sleep(0.1)


def test_killing_an_actor_mid_run_loses_and_duplicates_nothing(daemon, ray_cluster):
    import ray

    before = restarts(daemon)
    ids = drop_job(daemon, "kill", 60)
    wait_for_results(daemon, "kill", 8)
    ray.kill(ray.get_actor(ACTORS[0], namespace=NAMESPACE), no_restart=False)
    results, errors = finish(daemon, "kill", ids)
    assert errors == []
    assert len({r["pid"] for r in results}) >= 3  # two actors, and the first one again after its restart
    assert restarts(daemon) >= before + 1
    assert metric_value(daemon.metrics(), "reelflow_workers_lost_total", step=STEP, reason="unavailable") >= 1


def test_sigkill_of_a_worker_process_mid_run_loses_and_duplicates_nothing(daemon):
    wait_alive(daemon)
    before = restarts(daemon)
    pid = actor_pid(daemon, ACTORS[1])
    ids = drop_job(daemon, "sigkill", 60)
    wait_for_results(daemon, "sigkill", 8)
    os.kill(pid, signal.SIGKILL)
    results, errors = finish(daemon, "sigkill", ids)
    assert errors == []
    assert pid in {r["pid"] for r in results} and len({r["pid"] for r in results}) >= 3
    assert restarts(daemon) >= before + 1
    assert actor_pid(daemon, ACTORS[1]) != pid


def test_a_record_that_crashes_the_worker_ends_in_errors_after_two_crashes(daemon):
    wait_alive(daemon)
    ids = drop_job(daemon, "poison", 24, {7: "exit"})
    results, errors = finish(daemon, "poison", ids)
    assert [(e["id"], e["error"]) for e in errors] == [("poison-7", "WorkerCrashed")]
    assert "last time with it alone" in errors[0]["message"]
    assert len(results) == 23


def test_a_stage_exception_is_a_record_error_not_a_worker_loss(daemon):
    wait_alive(daemon)
    lost = metric_value(daemon.metrics(), "reelflow_workers_lost_total", step=STEP, reason="died")
    ids = drop_job(daemon, "raises", 12, {5: "fail"})
    results, errors = finish(daemon, "raises", ids)
    assert [(e["id"], e["error"]) for e in errors] == [("raises-5", "RuntimeError")]
    assert "failing record" in errors[0]["message"]
    assert len(results) == 11
    assert metric_value(daemon.metrics(), "reelflow_workers_lost_total", step=STEP, reason="died") == lost


def test_a_hung_call_is_timed_out_and_the_actor_restarted(daemon):
    wait_alive(daemon)
    before = restarts(daemon)
    ids = drop_job(daemon, "hang", 12, {3: "hang"})
    results, errors = finish(daemon, "hang", ids)
    assert [(e["id"], e["error"]) for e in errors] == [("hang-3", "WorkerTimeout")]
    assert "call_timeout_s=2" in errors[0]["message"]
    assert len(results) == 11
    assert restarts(daemon) >= before + 2
    assert metric_value(daemon.metrics(), "reelflow_workers_lost_total", step=STEP, reason="timeout") >= 2


def test_all_actors_dead_for_good_are_replaced_with_backoff(daemon):
    import ray

    wait_alive(daemon)
    old = {name: ray.get_actor(name, namespace=NAMESPACE)._actor_id.hex() for name in ACTORS}
    ids = drop_job(daemon, "alldead", 40)
    wait_for_results(daemon, "alldead", 4)
    for name in ACTORS:
        ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=True)
    results, errors = finish(daemon, "alldead", ids)
    assert errors == []
    new = {name: ray.get_actor(name, namespace=NAMESPACE)._actor_id.hex() for name in ACTORS}
    assert all(new[name] != old[name] for name in ACTORS)
    assert daemon.log().count("replaced (attempt 1)") == 2
