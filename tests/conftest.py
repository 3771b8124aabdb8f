"""Shared fixtures: test videos encoded once per session, a tiny tmpfs for disk-full faults; the
`vllm` marker's skip and env."""

from __future__ import annotations

import importlib.util
import os
import subprocess
from pathlib import Path

import pytest

from tests.media import make_test_videos

NO_VLLM = (
    "vLLM is not installed in this environment: the `vllm` tests run in the vLLM CPU environment "
    "that .ci/run builds (`bash .ci/vllm-env .venv-vllm`, then `.venv-vllm/bin/python -m pytest -m vllm`)"
)

# Set for every vLLM engine the tests start (and inherited by vLLM's EngineCore and worker
# processes and by `reelflow run` subprocesses); a value already in the environment wins.
VLLM_TEST_ENV = {
    # vLLM reports usage to its stats server from every new engine; tests reach no network.
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    # CPU backend: a fixed 1 GiB KV cache per engine (the smallest it takes, whole GiB). Without
    # it the cache is gpu_memory_utilization x RAM minus the worker's RSS, which fails outright
    # ("less than requested memory") on a smaller machine or a worker that grew. Several
    # engines live at once in the text tests, so each must stay small. Threads are left to
    # VLLM_CPU_OMP_THREADS_BIND=auto: it binds the worker to all cores but one (on the 2-core
    # CI machine: core 0, leaving core 1 to pytest, which decodes the clips meanwhile).
    "VLLM_CPU_KVCACHE_SPACE": "1",
}


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def pytest_collection_modifyitems(config, items):
    if vllm_installed():
        return
    skip = pytest.mark.skip(reason=NO_VLLM)
    for item in items:
        if item.get_closest_marker("vllm"):
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def vllm_test_env(request):
    """VLLM_TEST_ENV while the session runs `vllm` tests (set before any engine starts)."""
    if not vllm_installed() or not any(item.get_closest_marker("vllm") for item in request.session.items):
        yield
        return
    with pytest.MonkeyPatch.context() as patch:
        for key, value in VLLM_TEST_ENV.items():
            if key not in os.environ:
                patch.setenv(key, value)
        yield


@pytest.fixture(scope="session")
def videos(tmp_path_factory) -> dict[str, Path]:
    """Good, odd and broken videos (see tests/media.py), made once per session."""
    return make_test_videos(tmp_path_factory.mktemp("videos"))


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> Path:
    """A tiny random-weight CLIP folder (tests/tiny/clip.py), built once per session."""
    from tests.tiny.clip import tiny_clip_path

    return tiny_clip_path(tmp_path_factory)


@pytest.fixture
def tmpfs(tmp_path):
    """Mount a tiny tmpfs (tests run as root in CI); skip with the reason when that is not allowed."""
    mounted: list[Path] = []

    def mount(folder: Path, size_kb: int) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(folder)], capture_output=True, text=True
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs (needs root): {done.stderr.strip()}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in reversed(mounted):
        subprocess.run(["umount", "-l", str(folder)], check=False)
