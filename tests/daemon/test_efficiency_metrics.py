"""Efficiency metrics: tokens/s over a sliding window and its ratio to the step's speed of light,
the model's wait for prepared records, and the GPU families (declared, empty without NVML).
Arithmetic with an injected clock; the names and relations on a real daemon's scrape."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from daemon.efficiency import GpuCollector, TokenRate
from tests.harness import DaemonProcess, jsonl, metric_value, write_config

ENV = {"REELFLOW_EXTRA_STAGES": "Test.Echo=tests.stages_for_tests:Echo"}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def families(registry: CollectorRegistry) -> dict:
    return {f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())}


def test_tokens_per_second_counts_only_the_window_and_the_ratio_follows():
    clock = Clock()
    rate = TokenRate(window_s=30, clock=clock)
    registry = CollectorRegistry()
    registry.register(rate)
    rate.set_speed_of_light("cap", 100.0)
    rate.set_speed_of_light("text", None)
    rate.count("cap", 600)
    clock.now += 20
    rate.count("cap", 300)
    rate.count("text", 60)
    assert rate.rate("cap") == pytest.approx(900 / 30)
    clock.now += 15  # the first 600 tokens are now 35 s old: out of the window
    found = families(registry)
    assert {s.labels["step"]: s.value for s in found["reelflow_tokens_per_second"].samples} == {
        "cap": 10.0,
        "text": 2.0,
    }
    (ratio,) = found["reelflow_efficiency_ratio"].samples  # only the step that set a speed of light
    assert ratio.labels == {"step": "cap"} and ratio.value == pytest.approx(0.1)
    clock.now += 31
    assert rate.rate("cap") == 0.0


def test_gpu_families_are_declared_but_empty_without_nvml():
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the families have samples")
    registry = CollectorRegistry()
    registry.register(GpuCollector())
    found = families(registry)
    assert found["reelflow_gpu_utilization"].samples == []
    assert found["reelflow_gpu_memory_bytes"].samples == []


def test_a_daemon_exports_tokens_rate_efficiency_and_prepare_wait(tmp_path):
    step = {"usage_per_record": {"tokens_out": 10}, "prepare_sleep_s": 0.05, "batch_size": 4}
    step.update(max_wait_ms=5, prep_workers=1, speed_of_light_tokens_per_s=100)
    config = {
        "steps": [{"type": "Test", "name": "Echo", "config": step}],
        "daemon": {"inbox": "inbox", "outbox": "outbox", "settle_ms": 50, "metrics": {"port": 0}},
    }
    with DaemonProcess(write_config(tmp_path, config), env=ENV) as process:
        process.drop_text("job.jsonl", jsonl([{"id": i} for i in range(8)]))
        assert process.wait_for_job("job")["state"] == "done"
        text = process.metrics()
    labels = {s.labels["step"] for f in text_string_to_metric_families(text) for s in f.samples if "step" in s.labels}
    (label,) = {name for name in labels if "Echo" in name}
    assert metric_value(text, "reelflow_tokens_out_total", step=label) == 80
    rate = metric_value(text, "reelflow_tokens_per_second", step=label)
    assert 0 < rate <= 80 / 30
    assert metric_value(text, "reelflow_efficiency_ratio", step=label) == pytest.approx(rate / 100)
    # prepare sleeps 50 ms a record on one thread, and the first batch starts within 5 ms
    assert metric_value(text, "reelflow_prepare_wait_seconds_total", step=label) > 0
    assert "# TYPE reelflow_gpu_utilization gauge" in text


def test_a_stages_own_usage_counters_are_exported_not_dropped():
    """Counters without a metric of their own (ClipTranscoder's copy_fallbacks, a captioner's
    json_retries, ...) land in reelflow_stage_usage_total by key; the named ones keep theirs."""
    from daemon.metrics import Metrics

    metrics = Metrics()
    metrics.count_usage("step_3_ClipTranscoder", {"copy_fallbacks": 2, "clips_written": 5, "tokens_out": 0})
    metrics.count_usage("step_3_ClipTranscoder", {"copy_fallbacks": 1})
    metrics.count_usage("step_5_Qwen2VLCaptioner", {"tokens_out": 7})
    text = metrics.render().decode()
    assert 'reelflow_stage_usage_total{counter="copy_fallbacks",step="step_3_ClipTranscoder"} 3.0' in text
    assert 'reelflow_stage_usage_total{counter="clips_written",step="step_3_ClipTranscoder"} 5.0' in text
    assert 'reelflow_tokens_out_total{step="step_5_Qwen2VLCaptioner"} 7.0' in text
    assert 'counter="tokens_out"' not in text  # a named counter is not exported twice
