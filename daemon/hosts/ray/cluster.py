"""`RayCluster`: the daemon's side of a Ray cluster. It joins the cluster, decides where
each step's actors go and what they ask for, creates them, and makes their hosts.

Placement reads only what a stage declares (`Stage.resources(config)`): a stage that needs
no accelerator asks for no GPU; one that needs `accelerators` GPUs per worker (a
tensor-parallel group) asks for that many whole GPUs; one that needs a single GPU shares
each GPU with the other such steps, as the local backend puts a worker of every accelerated
step on every GPU. Ray gives each actor its GPUs through `CUDA_VISIBLE_DEVICES`; two actors
that share a GPU and load a model onto it are loaded one at a time (`loading`), since two
engines profiling memory at once on one GPU each see the other's allocations.

Blocking Ray calls (init, actor creation, kill) run in threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from daemon.config import Step, WorkerSettings, WorkersSection
from daemon.hosts.ray.actor import StageActor
from daemon.hosts.ray.host import RayHost
from stages.base import StageConfig

log = logging.getLogger(__name__)


def actor_name(step: Step, index: int) -> str:
    return f"reelflow:{step.label}:{index}"


class RayCluster:
    """The daemon's side of the cluster: joins it, places each step's actors, makes hosts."""

    def __init__(self, section: WorkersSection, steps: Callable[[], tuple[Step, ...]], metrics):
        self.section = section
        self.steps = steps  # the pipeline's steps now (a reload may change them)
        self.metrics = metrics
        self.resources: dict[str, float] = {}
        self._owned = False
        self._actor_class = None
        self._shared_gpu_loads = asyncio.Lock()  # see `loading`

    async def connect(self) -> None:
        await asyncio.to_thread(self._connect)

    def _connect(self) -> None:
        import ray

        if not ray.is_initialized():  # in a thread, so Ray leaves the daemon's signal handlers alone
            started = time.perf_counter()
            ray.init(
                address=self.section.address,
                namespace=self.section.namespace,
                runtime_env=self.section.runtime_env,
                logging_level=logging.WARNING,
                configure_logging=False,
            )
            self._owned = True
            log.info("joined the Ray cluster at %s in %.1f s", self.section.address, time.perf_counter() - started)
        self.resources = dict(ray.cluster_resources())
        self._actor_class = ray.remote(StageActor)
        log.info(
            "Ray cluster: %d node(s), %s CPU, %s GPU",
            len([n for n in ray.nodes() if n.get("Alive")]),
            self.resources.get("CPU", 0),
            self.resources.get("GPU", 0),
        )

    # --- placement ---
    @staticmethod
    def accelerators(step: Step) -> int:
        return step.stage_cls.resources(step.config).accelerators

    def _default_gpus(self, step: Step) -> float:
        """GPUs an actor asks for when `num_gpus` is not set: none for a stage that needs no
        accelerator (CPU tools, API stages) or on a cluster without GPUs, else the
        accelerators the stage declares (a share of one GPU is decided in `gpus_per_actor`)."""
        if not self.resources.get("GPU"):
            return 0.0
        return float(self.accelerators(step))

    def gpus_per_actor(self, step: Step) -> float:
        """As the local backend puts a worker of every accelerated step on every GPU, such
        steps without `num_gpus` share each GPU: with k of them, an actor asks for 1/k."""
        if step.workers.num_gpus is not None:
            return step.workers.num_gpus
        default = self._default_gpus(step)
        if default != 1.0:
            return default
        sharing = [
            s
            for s in self.steps()
            if s.workers.backend == "ray" and s.workers.num_gpus is None and self._default_gpus(s) == 1.0
        ]
        return round(1.0 / max(1, len(sharing)), 4)

    def actor_count(self, step: Step) -> int:
        if step.workers.count is not None:
            return step.workers.count
        per_actor = self.gpus_per_actor(step)
        gpus = self.resources.get("GPU", 0)
        slots = max(1, int(gpus // math.ceil(per_actor))) if per_actor > 0 else 1
        return slots * step.config.workers_per_device

    def slots(self, step: Step) -> list[str]:
        """One entry per actor of the step, `ray:<n>`, in the place a local worker has its device."""
        return [f"ray:{n}" for n in range(self.actor_count(step))]

    def host(self, step: Step, device: str, label: str) -> RayHost:
        return RayHost(self, step, actor_name(step, int(device.removeprefix("ray:"))), label)

    def actor_options(self, step: Step, name: str) -> dict[str, Any]:
        settings: WorkerSettings = step.workers
        options: dict[str, Any] = {
            "name": name,
            "namespace": self.section.namespace,
            "num_cpus": settings.num_cpus,
            "num_gpus": self.gpus_per_actor(step),
            "max_restarts": settings.max_restarts,
            "max_task_retries": 0,
            "max_concurrency": settings.calls_in_flight,
        }
        if settings.resources:
            options["resources"] = dict(settings.resources)
        if settings.spread:
            options["scheduling_strategy"] = "SPREAD"
        return options

    @contextlib.asynccontextmanager
    async def loading(self, step: Step) -> AsyncIterator[None]:
        """Held while an actor of `step` loads its stage: actors that put a model on a share
        of a GPU load one at a time; the others at once."""
        shares_a_gpu = 0 < self.gpus_per_actor(step) < 1 and self.accelerators(step) > 0
        if not shares_a_gpu:
            yield
            return
        async with self._shared_gpu_loads:
            yield

    def create_actor(self, step: Step, config: StageConfig, version: int, name: str, replacing: bool = False):
        """A new actor (blocking: call it in a thread). A replacement waits for its dead
        namesake to free the name; at start-up a taken name is an error."""
        import ray
        from ray.exceptions import ActorAlreadyExistsError

        options = self.actor_options(step, name)
        deadline = time.monotonic() + 30
        while True:
            try:
                return self._actor_class.options(**options).remote(
                    step.stage_cls, config.model_dump(), version, step.config.prep_workers, name
                )
            except ActorAlreadyExistsError:
                if not replacing:
                    raise RuntimeError(
                        f"an actor named {name} already runs in Ray namespace {self.section.namespace!r}: "
                        "is another reelflow daemon using this cluster? Give each daemon its own workers.namespace"
                    ) from None
                if time.monotonic() > deadline:
                    raise
                with contextlib.suppress(ValueError):  # the one we killed is not reaped yet
                    ray.kill(ray.get_actor(name, namespace=self.section.namespace), no_restart=True)
                time.sleep(0.2)

    def asks_for(self, step: Step) -> str:
        wants = {"CPU": step.workers.num_cpus, "GPU": self.gpus_per_actor(step), **step.workers.resources}
        has = {key: self.resources.get(key, 0) for key in wants}
        return f"each actor asks for {wants}; the cluster has {has} in all"

    async def close(self) -> None:
        if self._owned:
            import ray

            await asyncio.to_thread(ray.shutdown)
            self._owned = False
