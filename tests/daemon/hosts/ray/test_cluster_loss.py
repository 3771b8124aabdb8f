"""Losing more than one call: an actor no node can host, replacements that keep failing, a
whole node (its raylet) killed mid-run."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tests.daemon.hosts.ray.conftest import start_node
from tests.daemon.hosts.ray.test_failures import (
    ACTORS,
    NAMESPACE,
    crashy_config,
    daemon_env,
    drop_job,
    finish,
    restarts,
    wait_for_results,
)
from tests.harness import DaemonProcess

pytestmark = pytest.mark.ray


def test_an_actor_no_node_can_host_stops_start_up_with_what_it_asked_for(tmp_path, ray_cluster):
    config = crashy_config(tmp_path, ray_cluster, num_gpus=5, start_timeout_s=3)
    with pytest.raises(RuntimeError) as failed:
        DaemonProcess(config, env=daemon_env()).start()
    message = str(failed.value)
    assert "start_timeout_s=3" in message and "'GPU': 5.0" in message and "'GPU': 2.0" in message


def test_when_replacements_run_out_the_daemon_stops_and_the_job_resumes_intact(tmp_path, ray_cluster):
    import ray

    refuse = tmp_path / "refuse-load"
    config = crashy_config(tmp_path, ray_cluster, drain_timeout_s=1, count=1, max_replacements=2, replace_backoff_s=0.2)

    daemon = DaemonProcess(config, env=daemon_env()).start()
    try:
        ids = drop_job(daemon, "gone", 40)
        wait_for_results(daemon, "gone", 4)
        refuse.touch()  # every new actor now fails to load
        ray.kill(ray.get_actor(ACTORS[0], namespace=NAMESPACE), no_restart=True)
        assert daemon.process.wait(60) != 0
    finally:
        daemon.kill()
    log = daemon.log()
    assert "replacement 2/2 failed" in log
    assert "stopping: WorkerGone: reelflow:step_0_Test_Crashy:0 could not be brought back after 2 replacement(s)" in log
    assert daemon.job_state("gone")["state"] == "claimed"  # left for the next start
    written = len(daemon.results("gone"))
    assert 4 <= written < 40

    refuse.unlink()
    with DaemonProcess(config, env=daemon_env()) as again:
        results, errors = finish(again, "gone", ids)
    assert errors == [] and len(results) == 40


def raylet_of(node_id: str) -> int:
    """The pid of this node's raylet, found by the socket it was started with."""
    import ray

    socket_name = next(n["RayletSocketName"] for n in ray.nodes() if n["NodeID"] == node_id)
    for proc in Path("/proc").iterdir():
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if args[0].endswith(b"raylet/raylet") and f"--raylet_socket_name={socket_name}".encode() in args:
            return int(proc.name)
    raise AssertionError(f"no raylet process with socket {socket_name}")


def test_killing_the_raylet_of_an_actors_node_loses_and_duplicates_nothing(tmp_path, ray_cluster):
    import ray

    node = start_node(
        [f"--address={ray_cluster.address}", "--num-cpus=2", "--num-gpus=0", "--object-store-memory=80000000"],
        tmp_path / "node2.log",
    )
    try:
        deadline = time.monotonic() + 60
        while len([n for n in ray.nodes() if n["Alive"]]) < 2:
            assert time.monotonic() < deadline and node.process.poll() is None, (tmp_path / "node2.log").read_text()
            time.sleep(0.5)
        head = ray.get_runtime_context().get_node_id()
        config = crashy_config(tmp_path / "d", ray_cluster, spread=True, call_timeout_s=30, start_timeout_s=90)
        with DaemonProcess(config, env=daemon_env()) as daemon:
            placed = {}
            for name in ACTORS:
                actor = ray.get_actor(name, namespace=NAMESPACE)
                placed[name] = ray.get(actor.info.remote())["node"]
            assert len(set(placed.values())) == 2, f"SPREAD put both actors on one node: {placed}"
            ids = drop_job(daemon, "raylet", 120)
            wait_for_results(daemon, "raylet", 8)
            before = restarts(daemon)
            other = next(n for n in set(placed.values()) if n != head)
            os.kill(raylet_of(other), signal.SIGKILL)
            results, errors = finish(daemon, "raylet", ids, timeout=120)
            assert errors == []
            assert restarts(daemon) >= before + 1
            moved = [n for n in ACTORS if placed[n] != head]
            assert ray.get(ray.get_actor(moved[0], namespace=NAMESPACE).info.remote())["node"] == head
    finally:
        node.stop()
