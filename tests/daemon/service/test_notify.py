"""sd_notify against a real AF_UNIX datagram socket opened by the test, as systemd would open it:
first the Notifier alone (path and abstract addresses), then the real daemon subprocess started
with NOTIFY_SOCKET and WATCHDOG_USEC set."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
import uuid
from pathlib import Path

import pytest

from daemon.service.notify import Notifier
from tests.harness import DaemonProcess, jsonl, reloads, wait_for, write_config
from tests.stages_for_tests import RELOAD_ENV

WATCHDOG_USEC = 1_000_000  # WatchdogSec=1: pings every 0.5 s


class Listener:
    """The manager's end: a bound datagram socket collecting (arrival time, fields) per message."""

    def __init__(self, address: str):
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._running = True
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while self._running:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append((time.monotonic(), fields))

    def wait(self, predicate, timeout: float = 30, what: str = "a message") -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for _, fields in list(self.messages):
                if predicate(fields):
                    return fields
            time.sleep(0.02)
        raise AssertionError(f"no {what} among {[m for _, m in self.messages]}")

    def close(self) -> None:
        self._running = False
        self._thread.join()
        self.sock.close()


@pytest.fixture
def abstract_address() -> str:
    return f"@reelflow-test-{uuid.uuid4().hex}"


def test_notifier_sends_to_a_path_socket(tmp_path: Path):
    folder = Path(os.environ.get("TMPDIR", "/tmp")) / f"rf-{uuid.uuid4().hex[:8]}"
    folder.mkdir()
    try:
        listener = Listener(str(folder / "notify"))
        env = {"NOTIFY_SOCKET": str(folder / "notify"), "WATCHDOG_USEC": "3000000"}
        notifier = Notifier.from_environment(env)
        assert env == {}, "the variables must not leak to child processes"
        assert notifier.watchdog_interval_s == 1.5
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert notifier.reloading()
        assert notifier.ready("3 records ok")
        listener.wait(lambda f: f.get("READY") == "1", 5)
        first, second = (fields for _, fields in listener.messages[:2])
        assert first["RELOADING"] == "1" and before <= int(first["MONOTONIC_USEC"]) <= before + 5_000_000
        assert second == {"READY": "1", "STATUS": "3 records ok"}
        listener.close()
    finally:
        for child in folder.iterdir():
            child.unlink()
        folder.rmdir()


def test_notifier_abstract_address_and_watchdog_pid(abstract_address: str):
    listener = Listener(abstract_address)
    try:
        notifier = Notifier.from_environment(
            {"NOTIFY_SOCKET": abstract_address, "WATCHDOG_USEC": "500000", "WATCHDOG_PID": "1"}
        )
        assert notifier.watchdog_interval_s is None, "WATCHDOG_PID names another process: no watchdog for us"
        assert notifier.stopping() and notifier.watchdog() and notifier.status("draining")
        listener.wait(lambda f: f.get("STATUS") == "draining", 5)
        assert [f for _, f in listener.messages] == [{"STOPPING": "1"}, {"WATCHDOG": "1"}, {"STATUS": "draining"}]
    finally:
        listener.close()
    assert not Notifier.from_environment({}).enabled
    assert not Notifier.from_environment({}).ready()


def _config(tmp_path: Path, model: Path) -> Path:
    return write_config(
        tmp_path,
        {
            "steps": [{"type": "Test", "name": "Tagger", "config": {"model_path": str(model), "max_wait_ms": 5}}],
            "daemon": {"inbox": "inbox", "outbox": "outbox", "settle_ms": 50, "metrics": {"port": 0}},
        },
    )


def test_daemon_notifies_systemd_in_order(tmp_path: Path, abstract_address: str):
    model = tmp_path / "model.txt"
    model.write_text("m\n")
    path = _config(tmp_path, model)
    listener = Listener(abstract_address)
    env = {**RELOAD_ENV, "NOTIFY_SOCKET": abstract_address, "WATCHDOG_USEC": str(WATCHDOG_USEC)}
    try:
        with DaemonProcess(path, env=env) as daemon:
            listener.wait(lambda f: f.get("READY") == "1", 30, "READY=1")
            daemon.drop_text("job.jsonl", jsonl([{"id": i} for i in range(12)]))
            assert daemon.wait_for_job("job")["state"] == "done"
            time.sleep(1.6)  # a few watchdog periods while idle
            before_reload = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            daemon.process.send_signal(signal.SIGHUP)  # `systemctl reload` (the file is unchanged)
            wait_for(lambda: reloads(daemon)[0] == 1, 10, "the SIGHUP reload", daemon)
            after_reload = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            listener.wait(lambda f: "records ok" in f.get("STATUS", "") and f.get("READY") == "1", 10)
            assert daemon.stop() == 0
        listener.wait(lambda f: f.get("STOPPING") == "1", 5, "STOPPING=1")
        time.sleep(0.3)
    finally:
        listener.close()

    kinds = []
    for _, fields in listener.messages:
        kind = next((k for k in ("READY", "RELOADING", "STOPPING", "WATCHDOG") if k in fields), "STATUS")
        if not kinds or kinds[-1] != kind or kind != "WATCHDOG":
            kinds.append(kind)
    assert kinds[0] == "STATUS" and listener.messages[0][1]["STATUS"] == "loading models"
    order = [k for k in kinds if k != "STATUS"]
    # The watchdog pings while models load, too (a long load must not trip it).
    assert [k for k in order if k != "WATCHDOG"] == ["READY", "RELOADING", "READY", "STOPPING"], kinds
    assert order[order.index("READY") + 1] == "WATCHDOG", "no WATCHDOG=1 between READY=1 and the reload"
    assert order.index("STOPPING") == len(order) - 1 or set(order[order.index("STOPPING") + 1 :]) == {"WATCHDOG"}

    reloading = next(f for _, f in listener.messages if "RELOADING" in f)
    assert before_reload <= int(reloading["MONOTONIC_USEC"]) <= after_reload
    ready_after = [f for _, f in listener.messages if f.get("READY") == "1"][1]
    assert ready_after["STATUS"].startswith("12 records ok, 0 errors"), ready_after
    pings = [t for t, f in listener.messages if "WATCHDOG" in f]
    gaps = [b - a for a, b in zip(pings, pings[1:], strict=False)]
    assert len(pings) >= 3 and max(gaps) < WATCHDOG_USEC / 1e6, f"watchdog gaps {gaps}"


def test_watchdog_stops_when_a_step_has_no_worker_left(tmp_path: Path, abstract_address: str):
    """A reload whose new model fails, and whose old model cannot be loaded back either (its file
    is gone), leaves the step without a worker: the daemon stops vouching for itself, so systemd's
    watchdog restarts it."""
    model = tmp_path / "model.txt"
    model.write_text("m\n")
    path = _config(tmp_path, model)
    listener = Listener(abstract_address)
    env = {**RELOAD_ENV, "NOTIFY_SOCKET": abstract_address, "WATCHDOG_USEC": str(WATCHDOG_USEC)}
    try:
        with DaemonProcess(path, env=env) as daemon:
            listener.wait(lambda f: f.get("READY") == "1", 30, "READY=1")
            listener.wait(lambda f: "WATCHDOG" in f, 5, "WATCHDOG=1")
            model.unlink()
            path.write_text(path.read_text().replace(str(model), str(tmp_path / "missing.txt")))
            wait_for(lambda: reloads(daemon)[1] == 1, 10, "the failed reload", daemon)
            failed_at = time.monotonic()
            time.sleep(2.5)
            log = daemon.log()
            daemon.stop()
    finally:
        listener.close()
    assert "has no stage loaded and is retired" in log, log[-3000:]
    late_pings = [t for t, f in listener.messages if "WATCHDOG" in f and t > failed_at + 0.1]
    assert late_pings == [], "WATCHDOG=1 kept coming from a daemon with a step and no worker"
