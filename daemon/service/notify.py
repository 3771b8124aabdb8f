"""sd_notify: tell systemd (or anything listening on `NOTIFY_SOCKET`) how the daemon is doing.

The protocol is one datagram per message on the AF_UNIX socket named by `NOTIFY_SOCKET`
(a path, or an abstract name written with a leading `@`), holding newline-separated
`KEY=value` lines. What the daemon sends, in order:

- `STATUS=loading models` at start, `READY=1` (+ `STATUS=`) once every stage is loaded;
- `RELOADING=1` + `MONOTONIC_USEC=<CLOCK_MONOTONIC in µs>` when a reload starts and
  `READY=1` when it is over (applied or refused);
- `WATCHDOG=1` every `WATCHDOG_USEC / 2` from the main loop, only while it is healthy;
- `STATUS=<throughput>` lines as it works; `STOPPING=1` when it starts to drain.

No socket (not run by systemd) means every call is a no-op. Sends never block the loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping, MutableMapping

log = logging.getLogger(__name__)

STATUS_EVERY_S = 5.0  # STATUS= lines to systemd (and WATCHDOG=1 at least this often when enabled)


class Notifier:
    def __init__(self, address: str | None, watchdog_usec: int | None = None):
        self.address = address
        self.watchdog_usec = watchdog_usec
        self._socket: socket.socket | None = None
        self._warned = False
        if address:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._socket.setblocking(False)

    @classmethod
    def from_environment(cls, env: MutableMapping[str, str] | None = None, unset: bool = True) -> Notifier:
        """Read `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID`; by default remove them from
        the environment so that child processes (decoders, Ray workers) do not inherit them."""
        env = os.environ if env is None else env
        address = env.get("NOTIFY_SOCKET") or None
        watchdog = _watchdog_usec(env)
        if unset:
            for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
                env.pop(key, None)
        return cls(address, watchdog)

    @property
    def enabled(self) -> bool:
        return self._socket is not None

    @property
    def watchdog_interval_s(self) -> float | None:
        """How often to send WATCHDOG=1: half the timeout systemd set, as sd_watchdog_enabled(3) advises."""
        return self.watchdog_usec / 2e6 if self.watchdog_usec else None

    def send(self, *lines: str) -> bool:
        if self._socket is None or not lines:
            return False
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            self._socket.sendto("\n".join(lines).encode(), target)
        except OSError as exc:  # the manager is gone or its queue is full: never stop the daemon for it
            if not self._warned:
                log.warning("sd_notify to %s failed: %s (further failures are not logged)", self.address, exc)
                self._warned = True
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def reloading(self) -> bool:
        return self.send("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def stopping(self, status: str | None = None) -> bool:
        return self.send("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={text}")

    async def heartbeat(self, healthy: Callable[[], bool], status: Callable[[], str]) -> None:
        """WATCHDOG=1 (when systemd asked for it, and only while `healthy()`) and STATUS= lines,
        from the main loop: a stuck loop sends no WATCHDOG=1, so systemd restarts the daemon."""
        if not self.enabled:
            return
        watchdog = self.watchdog_interval_s
        period = min(watchdog, STATUS_EVERY_S) if watchdog else STATUS_EVERY_S
        last_status = time.monotonic()
        while True:
            await asyncio.sleep(period)
            if watchdog:
                if healthy():
                    self.watchdog()
                else:
                    log.error("unhealthy (the pipeline or a step's workers are gone): no WATCHDOG=1 sent")
            if time.monotonic() - last_status >= STATUS_EVERY_S - 0.01:
                self.status(status())
                last_status = time.monotonic()

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def _watchdog_usec(env: Mapping[str, str]) -> int | None:
    pid = env.get("WATCHDOG_PID")
    if pid and pid.strip() != str(os.getpid()):
        return None  # meant for another process (sd_watchdog_enabled does the same check)
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec if usec > 0 else None
