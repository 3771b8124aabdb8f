"""One local Ray cluster per test session (`ray start --head --block` with a short temp dir),
the test process joined to it as a driver (to find and kill actors by name), and helpers."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.harness import REPO
from tests.stages_for_tests import RAY_STAGES

RAY = str(Path(sys.executable).parent / "ray")
NAMESPACE = "reelflow-tests"

pytestmark = pytest.mark.ray


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ray_env() -> dict[str, str]:
    env = dict(os.environ)
    env["RAY_AUTH_MODE"] = "disabled"  # token auth is on by default in Ray 2.60
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["REELFLOW_EXTRA_STAGES"] = RAY_STAGES
    return env


@dataclass
class Node:
    process: subprocess.Popen
    log: Path

    def stop(self) -> None:
        """`ray start --block` stops the node's processes on SIGTERM; the group kill is the backstop."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(20)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


def start_node(args: list[str], log: Path) -> Node:
    handle = log.open("w")
    process = subprocess.Popen(
        [RAY, "start", "--block", "--disable-usage-stats", *args],
        env=ray_env(),
        stdout=handle,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group, so teardown reaches every child
    )
    return Node(process, log)


@dataclass
class Cluster:
    address: str
    temp_dir: Path
    head: Node

    def workers_section(self, **extra) -> dict:
        return {"backend": "ray", "address": self.address, "namespace": NAMESPACE, "start_timeout_s": 60, **extra}


@pytest.fixture(scope="session")
def ray_cluster():
    ray = pytest.importorskip("ray", reason="the Ray tests need the ray extra: pip install 'reelflow[ray]'")

    temp_dir = Path(tempfile.mkdtemp(prefix="rf", dir="/tmp"))  # Unix socket paths must stay < 108 chars
    port = free_port()
    address = f"127.0.0.1:{port}"
    head = start_node(
        [
            "--head",
            f"--port={port}",
            f"--temp-dir={temp_dir}",
            "--node-ip-address=127.0.0.1",
            "--num-cpus=4",
            "--num-gpus=2",  # logical GPUs: actors get ids and CUDA_VISIBLE_DEVICES, no device needed
            "--object-store-memory=100000000",
            "--include-dashboard=false",
            # notice a dead node in ~2 s instead of ~15 s (the raylet test)
            '--system-config={"health_check_period_ms": 500, "health_check_timeout_ms": 500, "health_check_failure_threshold": 3}',
        ],
        temp_dir / "head.log",
    )
    os.environ["RAY_AUTH_MODE"] = "disabled"
    deadline = time.monotonic() + 60
    while True:
        try:
            ray.init(address=address, namespace=NAMESPACE, log_to_driver=False, logging_level="WARNING")
            break
        except Exception:
            if head.process.poll() is not None or time.monotonic() > deadline:
                head.stop()
                raise RuntimeError(f"ray head did not start:\n{(temp_dir / 'head.log').read_text()}") from None
            time.sleep(0.5)
    cluster = Cluster(address, temp_dir, head)
    try:
        yield cluster
    finally:
        ray.shutdown()
        head.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(autouse=True, scope="module")
def kill_leftover_actors():
    """After each module, kill any reelflow actor still alive (a leaked GPU actor would leave
    the next module's actors pending). Daemons own their actors, so this is a backstop."""
    yield
    import ray

    if not ray.is_initialized():
        return

    for name in ray.util.list_named_actors():
        if name.startswith("reelflow:"):
            with contextlib.suppress(ValueError):
                ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=True)
