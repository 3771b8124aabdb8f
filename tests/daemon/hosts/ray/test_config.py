"""The `workers:` settings: the top-level section, per-step overrides, and what is refused."""

from __future__ import annotations

import pytest

from daemon.config import ConfigError, parse_config

STEP = "  - type: VideoProcessor\n    name: VideoProbe\n"


def parse(text: str):
    return parse_config(text)


def test_workers_default_to_the_local_backend():
    config = parse("steps:\n" + STEP)
    assert config.steps[0].workers.backend == "local"
    assert config.file.workers.address == "auto"


def test_a_step_overrides_single_keys_of_the_top_level_section():
    config = parse(
        "workers: {backend: ray, address: 'head:6379', call_timeout_s: 30, num_cpus: 2}\n"
        "steps:\n"
        + STEP
        + "  - type: VideoProcessor\n    name: FrameSampler\n    config: {workers: {num_gpus: 0, count: 3}}\n"
    )
    probe, frames = config.steps
    assert (probe.workers.backend, probe.workers.call_timeout_s, probe.workers.count) == ("ray", 30, None)
    assert (frames.workers.backend, frames.workers.num_cpus, frames.workers.num_gpus, frames.workers.count) == (
        "ray",
        2,
        0,
        3,
    )
    assert config.file.workers.address == "head:6379"


def test_one_step_on_ray_the_others_local():
    config = parse("steps:\n" + STEP + "    config: {workers: {backend: ray}}\n")
    assert config.steps[0].workers.backend == "ray"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "steps:\n" + STEP + "    config: {workers: {backend: ray, address: auto}}\n",
            "steps[0].config.workers: Value error, address cannot be set per step",
        ),
        (
            "workers: {backend: ray}\nsteps:\n" + STEP + "    config: {devices: ['cuda:0']}\n",
            "steps[0].config.devices: devices name this machine's GPUs, but the step's workers run on Ray",
        ),
        ("workers: {backend: slurm}\nsteps:\n" + STEP, "workers.backend: Input should be 'local' or 'ray'"),
        ("workers: {calls_in_flight: 0}\nsteps:\n" + STEP, "workers.calls_in_flight"),
        ("workers: {num_gpus: 1.5}\nsteps:\n" + STEP, "num_gpus above 1 must be a whole number (got 1.5)"),
        ("steps:\n" + STEP + "    config: {workers: {num_gpu: 1}}\n", "steps[0].config.workers.num_gpu: unknown key"),
    ],
)
def test_refused_settings_say_where_and_how_to_fix(text, expected):
    with pytest.raises(ConfigError) as failed:
        parse(text)
    assert expected in str(failed.value)


def test_a_workers_change_needs_the_workers_rebuilt():
    config = parse("steps:\n" + STEP)
    assert "workers" in type(config.steps[0].config).heavy_keys
