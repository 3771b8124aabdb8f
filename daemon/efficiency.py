"""Efficiency metrics computed at scrape time: tokens/s over a sliding window, its ratio to the
step's speed of light, and per-GPU utilization and memory from NVML.

Cosmos-Curate's yardstick: a captioning pipeline's output tokens/s divided by what `vllm bench
throughput` reaches for the same model and GPU (`speed_of_light_tokens_per_s` in the step's
config). Both collectors always declare their families, so dashboards and alerts find the
names; the GPU one has no samples without nvidia-ml-py or a GPU.
"""

from __future__ import annotations

import threading
import time
from collections import deque

from prometheus_client.core import GaugeMetricFamily

WINDOW_S = 30.0  # long enough to span several batches of a 7B captioner, short enough to show a stall


class TokenRate:
    """`reelflow_tokens_per_second{step}` and `reelflow_efficiency_ratio{step}`."""

    def __init__(self, window_s: float = WINDOW_S, clock=time.monotonic) -> None:
        self.window_s, self.clock = window_s, clock
        self._events: dict[str, deque[tuple[float, int]]] = {}
        self._speed_of_light: dict[str, float] = {}
        self._lock = threading.Lock()  # count() runs on the loop, collect() on a scrape thread

    def set_speed_of_light(self, step: str, tokens_per_s: float | None) -> None:
        with self._lock:
            self._events.setdefault(step, deque())
            if tokens_per_s:
                self._speed_of_light[step] = tokens_per_s
            else:
                self._speed_of_light.pop(step, None)

    def count(self, step: str, tokens: int) -> None:
        with self._lock:
            self._events.setdefault(step, deque()).append((self.clock(), tokens))

    def rate(self, step: str) -> float:
        with self._lock:
            events = self._events.get(step, deque())
            horizon = self.clock() - self.window_s
            while events and events[0][0] < horizon:
                events.popleft()
            return sum(tokens for _, tokens in events) / self.window_s

    def describe(self):
        return self.collect()

    def collect(self):
        rates = GaugeMetricFamily(
            "reelflow_tokens_per_second", f"Output tokens per second over the last {WINDOW_S:.0f} s.", labels=["step"]
        )
        ratios = GaugeMetricFamily(
            "reelflow_efficiency_ratio",
            "reelflow_tokens_per_second over the step's speed_of_light_tokens_per_s (vllm bench throughput).",
            labels=["step"],
        )
        for step in sorted(self._events):
            rate = self.rate(step)
            rates.add_metric([step], rate)
            if step in self._speed_of_light:
                ratios.add_metric([step], rate / self._speed_of_light[step])
        yield rates
        yield ratios


class GpuCollector:
    """`reelflow_gpu_utilization{device}` (0-1) and `reelflow_gpu_memory_bytes{device,kind}` from NVML."""

    def __init__(self) -> None:
        try:
            import pynvml  # nvidia-ml-py

            pynvml.nvmlInit()
            self._nvml, self._count = pynvml, pynvml.nvmlDeviceGetCount()
        except Exception:  # no nvidia-ml-py, no driver, no GPU: declare the families, export nothing
            self._nvml, self._count = None, 0

    def describe(self):
        return self._families()

    def collect(self):
        return self._families(sample=True)

    def _families(self, sample: bool = False):
        busy = GaugeMetricFamily("reelflow_gpu_utilization", "GPU busy fraction (NVML).", labels=["device"])
        memory = GaugeMetricFamily(
            "reelflow_gpu_memory_bytes", "GPU memory (NVML), by kind: used, total.", labels=["device", "kind"]
        )
        for index in range(self._count if sample else 0):
            handle = self._nvml.nvmlDeviceGetHandleByIndex(index)
            device = f"cuda:{index}"
            busy.add_metric([device], self._nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0)
            info = self._nvml.nvmlDeviceGetMemoryInfo(handle)
            memory.add_metric([device, "used"], info.used)
            memory.add_metric([device, "total"], info.total)
        yield busy
        yield memory
