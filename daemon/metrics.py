"""Prometheus metrics (one registry per daemon, no globals) and the /metrics, /healthz, /readyz server.

The server is a few lines of asyncio: it runs on the daemon's own loop, so a scrape sees
exactly the state the loop has, and no second web framework is needed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from daemon.efficiency import GpuCollector, TokenRate

log = logging.getLogger(__name__)

# Stage usage counters (Stage.usage) that become metrics, with their help text.
USAGE_METRICS = {
    "generated_frames": ("reelflow_generated_frames_total", "Frames (or images) generated."),
    "sampled_frames": ("reelflow_sampled_frames_total", "Video frames decoded and sampled (captioners, FrameSampler)."),
    "requests": ("reelflow_api_requests_total", "Requests sent to remote APIs."),
    "retries": ("reelflow_api_retries_total", "Requests retried after a transient failure."),
    "tokens_in": ("reelflow_tokens_in_total", "Prompt tokens sent to text/caption models."),
    "tokens_out": ("reelflow_tokens_out_total", "Tokens generated."),
}


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.records = Counter(
            "reelflow_records",
            "Records finished, by step and status (ok, error).",
            ["step", "status"],
            registry=r,
        )
        self.step_seconds = Histogram(
            "reelflow_step_seconds",
            "Seconds per batch in a step's model call.",
            ["step"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
            registry=r,
        )
        self.batch_size = Histogram(
            "reelflow_batch_size",
            "Records per model call.",
            ["step"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )
        self.queue_depth = Gauge(
            "reelflow_queue_depth", "Records waiting in a step's input queue.", ["step"], registry=r
        )
        self.inflight = Gauge(
            "reelflow_inflight", "Records inside a step's workers (preparing or in a model call).", ["step"], registry=r
        )
        self.jobs = Gauge("reelflow_jobs", "Jobs by state (claimed, done, failed).", ["state"], registry=r)
        self.paused = Gauge(
            "reelflow_paused",
            "1 while intake is paused by a transient cause (disk_full, io_error, out_of_memory, endpoint, worker_lost).",
            ["reason"],
            registry=r,
        )
        self.model_load_seconds = Gauge(
            "reelflow_model_load_seconds", "Seconds the last model load of a step took.", ["step"], registry=r
        )
        self.model_loads = Counter(
            "reelflow_model_loads", "Stage loads (one per worker start or heavy reload).", ["step"], registry=r
        )
        self.config_reloads = Counter(
            "reelflow_config_reloads", "Config reloads by result (ok, error).", ["result"], registry=r
        )
        self.config_info = Gauge(
            "reelflow_config_info",
            "The config in force (value 1), by its digest (the results' _config_hash).",
            ["digest"],
            registry=r,
        )
        self.worker_restarts = Counter(
            "reelflow_worker_restarts", "Workers restarted after dying.", ["step"], registry=r
        )
        self.workers_lost = Counter(
            "reelflow_workers_lost",
            "Calls lost with their worker, by reason (died, unavailable, timeout).",
            ["step", "reason"],
            registry=r,
        )
        self.worker_info = Gauge(
            "reelflow_worker_info",
            "1 per worker: where it runs (backend, node, GPUs, pid); relabelled when it moves.",
            ["step", "worker", "backend", "node", "gpus", "pid"],
            registry=r,
        )
        self.worker_state = Gauge(
            "reelflow_worker_state",
            "1 for each worker's current state: starting, alive, restarting, replacing, dead.",
            ["step", "worker", "state"],
            registry=r,
        )
        self.usage = {
            key: Counter(name.removesuffix("_total"), help_text, ["step"], registry=r)
            for key, (name, help_text) in USAGE_METRICS.items()
        }
        # Every other counter a stage keeps (copy_fallbacks, dedup_dropped, json_retries, ...): one
        # family, labelled by the stage's own key, so none is dropped unseen. Bounded: the keys
        # are names in the stages' code, never record data.
        self.stage_usage = Counter(
            "reelflow_stage_usage",
            "A stage's own usage counters (Stage.usage) that have no metric of their own, by key.",
            ["step", "counter"],
            registry=r,
        )
        self.prepare_wait = Counter(
            "reelflow_prepare_wait_seconds",
            "Seconds a step's model waited for prepared (decoded, sampled) records: the starvation signal.",
            ["step"],
            registry=r,
        )
        self.efficiency = TokenRate()
        r.register(self.efficiency)
        r.register(GpuCollector())
        for state in ("claimed", "done", "failed"):
            self.jobs.labels(state).set(0)
        for reason in ("disk_full", "io_error", "out_of_memory", "endpoint", "worker_lost"):
            self.paused.labels(reason).set(0)
        for result in ("ok", "error"):
            self.config_reloads.labels(result)

    def set_config(self, digest: str) -> None:
        self.config_info.clear()
        self.config_info.labels(digest).set(1)

    def count_usage(self, step: str, usage: dict[str, int]) -> None:
        for key, amount in usage.items():
            if not amount:
                continue
            counter = self.usage.get(key)
            if counter is not None:
                counter.labels(step).inc(amount)
            else:
                self.stage_usage.labels(step, key).inc(amount)
        if usage.get("tokens_out"):
            self.efficiency.count(step, usage["tokens_out"])

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsServer:
    """HTTP on the daemon's loop: /metrics, /healthz (alive), /readyz (models loaded, intake not paused).

    `not_ready` (optional) says why /readyz answers 503 (its body); by default "loading".
    """

    def __init__(
        self,
        metrics: Metrics,
        host: str,
        port: int,
        is_ready: Callable[[], bool],
        not_ready: Callable[[], str] | None = None,
    ):
        self.metrics = metrics
        self.host = host
        self.port = port
        self.is_ready = is_ready
        self.not_ready = not_ready or (lambda: "loading")
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> str:
        try:
            self._server = await asyncio.start_server(self._handle, self.host, self.port)
        except OSError as exc:
            raise OSError(
                f"cannot serve metrics on {self.host}:{self.port}: {exc.strerror}; pick another daemon.metrics.port (0 = any free port)"
            ) from None
        self.port = self._server.sockets[0].getsockname()[1]
        return self.url

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), timeout=10)
            while (await asyncio.wait_for(reader.readline(), timeout=10)) not in (b"\r\n", b"\n", b""):
                pass
            parts = request.decode("latin-1").split()
            path = parts[1].split("?")[0] if len(parts) > 1 else "/"
            status, body, content_type = self._respond(path)
            head = f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            writer.write(head.encode() + body)
            await writer.drain()
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    def _respond(self, path: str) -> tuple[str, bytes, str]:
        if path == "/metrics":
            return "200 OK", self.metrics.render(), CONTENT_TYPE_LATEST
        if path == "/healthz":
            return "200 OK", b"ok\n", "text/plain"
        if path == "/readyz":
            if self.is_ready():
                return "200 OK", b"ready\n", "text/plain"
            return "503 Service Unavailable", f"{self.not_ready()}\n".encode(), "text/plain"
        return "404 Not Found", b"not found: try /metrics, /healthz or /readyz\n", "text/plain"

    async def stop(self) -> None:
        if self._server:
            self._server.close()
            await self._server.wait_closed()
