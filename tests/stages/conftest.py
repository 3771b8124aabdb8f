"""Fixtures for the stages that call a model server (the text steps, the captioners' candidate
judge): a tiny LM built offline, a real `transformers serve` on 127.0.0.1 serving it (started
once per session), and a fault-injecting proxy in front of it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.stages.text.fault_proxy import FaultProxy
from tests.tiny.text_lm import build_text_lm

SECRET = "sk-reelflow-test-9f8e7d6c5b4a39281706"  # never a real key; tests grep for it

_SERVE = "import sys; from transformers.cli.transformers import main; sys.argv[0] = 'transformers'; sys.exit(main())"


@dataclass
class LMServer:
    base_url: str  # http://127.0.0.1:PORT/v1
    model: str  # the name the server is pinned to (the model folder)
    log: Path


@pytest.fixture(scope="session")
def text_lm_dir(tmp_path_factory) -> Path:
    return build_text_lm(tmp_path_factory.mktemp("text_lm") / "model")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def lm_server(text_lm_dir, tmp_path_factory) -> LMServer:
    """`transformers serve` on 127.0.0.1, pinned to the tiny model, on the CPU."""
    pytest.importorskip("fastapi", reason="transformers serve needs fastapi + uvicorn (transformers[serving])")
    pytest.importorskip("uvicorn")
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", _SERVE, "serve", str(text_lm_dir), "--device", "cpu"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    with open(log, "wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 90
        while True:
            if process.poll() is not None:
                pytest.fail(f"transformers serve exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"transformers serve not healthy after 90 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.25)
        yield LMServer(f"http://127.0.0.1:{port}/v1", str(text_lm_dir), log)
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def proxy(lm_server):
    faults = FaultProxy(lm_server.base_url).start()
    yield faults
    faults.stop()


@pytest.fixture
def dead_port() -> int:
    """A port nothing listens on."""
    return _free_port()
