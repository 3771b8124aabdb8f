"""Where actors go and what runs in them, on the session's cluster (2 logical GPUs):
placement reads what each stage declares (`Stage.resources`), never a config key by name;
each actor's child processes see the GPU Ray gave the actor; inside the actor a record whose
prepare fails fails alone, and a stage answering the wrong number of slots is an error."""

from __future__ import annotations

import asyncio
import errno

import pytest

from daemon.config import parse_config
from daemon.hosts.ray.cluster import RayCluster
from daemon.metrics import Metrics
from daemon.runtime.failures import TRANSIENT, classify
from daemon.runtime.pipeline import Pipeline
from stages.base import StageError

pytestmark = pytest.mark.ray

STEPS = """
steps:
  - {type: TextGenerator, name: GPTTextGenerator, config: {backend: vllm, tensor_parallel_size: 2, model: m}}
  - {type: TextGenerator, name: GPTTextGenerator, config: {backend: openai, model: m}}
  - {type: VideoProcessor, name: FrameSampler}
  - {type: VideoCaptioner, name: Qwen2VLCaptioner, config: {model_path: a}}
  - {type: VideoCaptioner, name: Qwen2VLCaptioner, config: {model_path: b}}
"""


async def test_placement_follows_the_resources_each_stage_declares(ray_cluster):
    config = parse_config(f"workers: {ray_cluster.workers_section()}\n{STEPS}")
    cluster = RayCluster(config.file.workers, lambda: config.steps, Metrics())
    await cluster.connect()
    try:
        assert cluster.resources["GPU"] == 2
        tensor_parallel, api, cpu_tool, captioner, other_captioner = config.steps
        placed = {step.label: (cluster.gpus_per_actor(step), cluster.actor_count(step)) for step in config.steps}
        assert placed == {
            tensor_parallel.label: (2.0, 1),  # a group of 2 GPUs per actor: one group fits
            api.label: (0.0, 1),  # API stages: concurrency slots, no devices
            cpu_tool.label: (0.0, 1),
            captioner.label: (0.5, 2),  # the two one-GPU steps share each GPU, as local workers do
            other_captioner.label: (0.5, 2),
        }
        assert cluster.actor_options(tensor_parallel, "n")["num_gpus"] == 2.0
        assert cluster.host(captioner, "ray:1", "w").name == f"reelflow:{captioner.label}:1"
    finally:
        await cluster.close()


async def test_actors_that_put_models_on_a_shared_gpu_load_one_at_a_time(ray_cluster):
    config = parse_config(f"workers: {ray_cluster.workers_section()}\n{STEPS}")
    cluster = RayCluster(config.file.workers, lambda: config.steps, Metrics())
    await cluster.connect()
    _, api, cpu_tool, captioner, other_captioner = config.steps
    entered: list[str] = []
    release = asyncio.Event()

    async def load(step, name):
        async with cluster.loading(step):
            entered.append(name)
            await release.wait()

    first = asyncio.create_task(load(captioner, "captioner"))
    while not entered:
        await asyncio.sleep(0)
    waiting = asyncio.create_task(load(other_captioner, "other captioner"))
    free = [asyncio.create_task(load(step, step.label)) for step in (api, cpu_tool)]
    for _ in range(20):
        await asyncio.sleep(0)
    assert entered == ["captioner", api.label, cpu_tool.label]  # the second captioner waits its turn
    release.set()
    await asyncio.gather(first, waiting, *free)
    assert entered[-1] == "other captioner"


async def test_a_child_process_of_an_actor_sees_the_gpu_ray_gave_the_actor(ray_cluster, monkeypatch):
    """Ray starts each actor with CUDA_VISIBLE_DEVICES set to its GPU and names it cuda:0 in
    there; what the stage starts on cuda:0 (a vLLM engine core) must land on that GPU, not on
    the node's GPU 0."""
    from tests.stages_for_tests import RAY_STAGES

    monkeypatch.setenv("REELFLOW_EXTRA_STAGES", RAY_STAGES)
    workers = ray_cluster.workers_section(count=2, num_gpus=1)
    text = f"workers: {workers}\nsteps:\n  - type: Test\n    name: Crashy\n    config: {{spawn_child: true}}\n"
    pipeline = Pipeline(parse_config(text), Metrics())
    await pipeline.connect()
    pipeline.build_workers()
    await pipeline.load()
    try:
        answers = [(await worker.host.process([{"id": "x", "_job": "j"}]))[0] for worker in pipeline.workers[0]]
    finally:
        await pipeline.close()
    assert sorted(answer["own_mask"] for answer in answers) == ["0", "1"]  # one GPU each, from Ray
    assert [answer["child_mask"] for answer in answers] == [answer["own_mask"] for answer in answers]
    assert {answer["device"] for answer in answers} == {"cuda:0"}


async def test_in_the_actor_a_failed_prepare_fails_its_record_alone(ray_cluster, monkeypatch):
    from tests.stages_for_tests import RAY_STAGES

    monkeypatch.setenv("REELFLOW_EXTRA_STAGES", RAY_STAGES)
    workers = ray_cluster.workers_section(count=1, num_gpus=0)
    text = f"workers: {workers}\nsteps:\n  - type: Test\n    name: Preparing\n    config: {{batch_size: 3}}\n"
    pipeline = Pipeline(parse_config(text), Metrics())
    await pipeline.connect()
    pipeline.build_workers()
    await pipeline.load()
    [worker] = pipeline.workers[0]
    try:
        batch = [{"id": "a", "_job": "j"}, {"id": "b", "_job": "j", "action": "bad_prepare"}, {"id": "c", "_job": "j"}]
        first, failed, last = await worker.host.process(batch)
        assert (first["echo"], last["echo"]) == ("a", "c")
        assert isinstance(failed, StageError) and failed.error_type == "ValueError"
        assert failed.message == "record b cannot be prepared"
        # A full disk in the actor's prepare comes back transient (the worker waits it out, as on
        # the local host), and the record runs once it passes.
        full = {"id": "f", "_job": "j", "action": "disk_full_once"}
        [slot] = await worker.host.process([full])
        assert isinstance(slot, StageError) and (slot.errno, classify(slot)) == (errno.ENOSPC, TRANSIENT)
        [again] = await worker.host.process([full])
        assert again["echo"] == "f"
        with pytest.raises(RuntimeError, match="stage returned 1 results for 2 records; expected one per record"):
            await worker.host.process([{"id": "d", "_job": "j", "action": "drop_one"}, {"id": "e", "_job": "j"}])
    finally:
        await pipeline.close()
