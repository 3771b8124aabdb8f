"""Stage workers as Ray actors (`workers: {backend: ray}`): the daemon stays the one driver.

Queues, batching, retries and the outbox stay in the daemon; only the stages move. Each
worker is one named actor, `reelflow:<step label>:<n>`, hosting one resident Stage, and a
`RayHost` stands for it behind the same calls as `LocalHost`, so the Worker, the metrics
and the outbox cannot tell the difference. Records travel as their fields (paths and
metadata); `prepare` runs inside the actor, so frames decode on the GPU's node.

What happens when things break (the Worker does the retrying, see `workers.WorkerLost`):

- the actor dies under a call (killed, its node or raylet gone, a record that crashes the
  process): the call raises `WorkerLost`; Ray restarts the actor (`max_restarts`; Ray's own
  task retries are off, `max_task_retries=0`, so nothing runs twice behind our back);
- a call runs past `call_timeout_s`: the actor is killed (Ray restarts it) and the call
  raises `WorkerLost(kind="WorkerTimeout")`;
- before the next call after a loss, the actor must answer `load` within `start_timeout_s`;
  one that is dead for good or never comes back is replaced by a new actor of the same name
  after a backoff (doubling up to `replace_backoff_max_s`); after `max_replacements` failed
  replacements in a row the host raises `WorkerGone` and the daemon stops (its jobs resume
  at the next start);
- an exception raised by the stage arrives as `RayTaskError` and is re-raised as the
  stage's own exception: the Worker isolates it record by record, as on the local path.

Every Ray call is awaited (never `ray.get` on the loop); blocking Ray calls (init, actor
creation, kill) run in threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from daemon.config import Step, WorkerSettings, WorkersSection
from daemon.hosts.base import WorkerGone, WorkerLost
from stages.base import Stage, StageConfig, StageError, has_prepare, is_async

log = logging.getLogger(__name__)

STATES = ("starting", "alive", "restarting", "replacing", "dead")
RETRY_UNAVAILABLE_S = 0.5  # while a restarting actor is unreachable, ask again this often
CLOSE_TIMEOUT_S = 10.0


def actor_name(step: Step, index: int) -> str:
    return f"reelflow:{step.label}:{index}"


# --- inside the actor ---------------------------------------------------------------------

_CONFIG_MODELS: dict[type, type] = {}


def _step_config(stage_cls: type[Stage], data: dict[str, Any]) -> StageConfig:
    """Rebuild the step's config (stage keys + runtime keys) from its plain dump."""
    from daemon.config import step_config_model

    model = _CONFIG_MODELS.get(stage_cls)
    if model is None:
        model = _CONFIG_MODELS[stage_cls] = step_config_model(stage_cls)
    return model.model_validate(data)


class StageActor:
    """The Ray actor: one resident stage; `prepare` in a thread pool, one model call at a time.

    Two `run` calls may be in the actor at once (`max_concurrency`): the second prepares
    its records while the first holds the model.
    """

    def __init__(self, stage_cls: type[Stage], config: dict[str, Any], version: int, prep_workers: int, label: str):
        import ray

        gpus = ray.get_gpu_ids()
        # Ray sets CUDA_VISIBLE_DEVICES to the actor's GPUs, so they count from 0 in here.
        self.device = ",".join(f"cuda:{i}" for i in range(len(gpus))) if gpus else "cpu"
        self.label = label
        self.stage_cls = stage_cls
        self.stage = stage_cls(_step_config(stage_cls, config), self.device)
        self.version = version  # of the config the stage has
        self.loaded = False
        self._load_lock = threading.Lock()
        self._model_lock = threading.Lock()
        self._prep_pool = ThreadPoolExecutor(prep_workers, "prep") if has_prepare(self.stage) else None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._info = {
            "node": ray.get_runtime_context().get_node_id(),
            "ip": ray.util.get_node_ip_address(),
            "gpus": ",".join(str(g) for g in gpus),
            "pid": os.getpid(),
            "device": self.device,
        }

    def load(self) -> dict[str, Any]:
        """Load the model once (a restarted actor loads again); say where this actor runs."""
        with self._load_lock:
            if not self.loaded:
                self.stage.load()
                self.loaded = True
        return self.info()

    def info(self) -> dict[str, Any]:
        return self._info

    def run(
        self, batch: list[dict[str, Any]], version: int, config: dict[str, Any]
    ) -> tuple[list[dict[str, Any] | StageError], dict[str, int], dict[str, Any]]:
        """prepare + process one batch; a record whose prepare fails gets a StageError in its slot.

        The step's current config comes with every call (a restarted actor must not run an
        old one); it is applied when its version differs from the stage's. The answer says
        which process ran the call, so a restart between calls is seen too."""
        if version != self.version:
            self.stage.config = _step_config(self.stage_cls, config)
            self.version = version
        slots: list[dict[str, Any] | StageError | None] = [None] * len(batch)
        ready: list[int] = []
        prepared: list[dict[str, Any]] = []
        if self._prep_pool is None:
            ready, prepared = list(range(len(batch))), batch
        else:
            futures = [self._prep_pool.submit(self.stage.prepare, fields) for fields in batch]
            for index, future in enumerate(futures):
                try:
                    prepared.append(future.result())
                    ready.append(index)
                except Exception as exc:  # a bad record in prepare: that record fails, the rest go on
                    slots[index] = StageError.from_exception(exc)
        usage: dict[str, int] = {}
        if prepared:
            outputs, usage = self._process(prepared)
            if not isinstance(outputs, list) or len(outputs) != len(prepared):
                raise RuntimeError(
                    f"stage returned {len(outputs) if isinstance(outputs, list) else type(outputs).__name__} results for {len(prepared)} records; expected one per record, in order"
                )
            for index, output in zip(ready, outputs, strict=True):
                slots[index] = output
        return slots, usage, self._info

    def _process(self, batch: list[dict[str, Any]]) -> tuple[list, dict[str, int]]:
        if is_async(self.stage):  # an async stage keeps its own loop; calls may overlap
            if self._loop is None:
                with self._load_lock:
                    if self._loop is None:
                        loop = asyncio.new_event_loop()
                        threading.Thread(target=loop.run_forever, name="aprocess", daemon=True).start()
                        self._loop = loop
            outputs = asyncio.run_coroutine_threadsafe(self.stage.aprocess(batch), self._loop).result()
            return outputs, dict(self.stage.take_usage())
        with self._model_lock:
            outputs = self.stage.process(batch)
            return outputs, dict(self.stage.take_usage())

    def close(self) -> None:
        try:
            self.stage.close()
        finally:
            if self._prep_pool:
                self._prep_pool.shutdown(wait=False, cancel_futures=True)


# --- in the daemon ------------------------------------------------------------------------


class _NotBack(Exception):
    """The actor is dead for good, failed to load, or did not answer in time: replace it."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def _stage_exception(exc: Exception) -> Exception:
    """The stage's own exception inside a RayTaskError (so OOM halving and error names work)."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, Exception) else exc


class RayCluster:
    """The daemon's side of the cluster: joins it, places each step's actors, makes hosts."""

    def __init__(self, section: WorkersSection, steps: Callable[[], tuple[Step, ...]], metrics):
        self.section = section
        self.steps = steps  # the pipeline's steps now (a reload may change them)
        self.metrics = metrics
        self.resources: dict[str, float] = {}
        self._owned = False
        self._actor_class = None

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

    def _default_gpus(self, step: Step) -> float:
        """GPUs an actor asks for when `num_gpus` is not set: none for a stage that wants no
        accelerator (CPU tools, API stages) or on a cluster without GPUs,
        `tensor_parallel_size` whole GPUs for a group, else a share of one GPU."""
        config = step.config
        if not self.resources.get("GPU") or not step.stage_cls.uses_accelerator(config):
            return 0.0
        return float(max(1, int(getattr(config, "tensor_parallel_size", 1) or 1)))

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

    def host(self, step: Step, device: str, name: str) -> RayHost:
        return RayHost(self, step, int(device.removeprefix("ray:")), name)

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


class RayHost:
    """One worker's actor, behind the StageHost calls. `prepare` is the identity here:
    `process` runs prepare + process inside the actor."""

    def __init__(self, cluster: RayCluster, step: Step, index: int, label: str):
        self.cluster = cluster
        self.step = step
        self.settings = step.workers
        self.label = label
        self.name = actor_name(step, index)
        self.config = step.config
        self.metrics = cluster.metrics
        self._config_version = 0
        self._config_dump = self.config.model_dump()
        self._actor = None
        self._incarnation = 0  # bumped when a loss is noticed, so two lost calls count once
        self._healthy = False
        self._recovery: asyncio.Task | None = None  # bringing the actor back after a loss
        self._usage: Counter[str] = Counter()
        self._info_labels: tuple[str, ...] | None = None
        self._pid: int | None = None  # the actor process's pid, from its last `load` answer
        self._killed_pid: int | None = None  # killed for a hung call: its answers do not count

    # --- metrics ---
    def _set_state(self, state: str) -> None:
        for name in STATES:
            self.metrics.worker_state.labels(self.step.label, self.name, name).set(1 if name == state else 0)

    def _set_info(self, info: dict[str, Any]) -> None:
        labels = (self.step.label, self.name, "ray", str(info["node"]), str(info["gpus"]), str(info["pid"]))
        if self._info_labels and self._info_labels != labels:
            self.metrics.worker_info.remove(*self._info_labels)
        self._info_labels = labels
        self._pid = info["pid"]
        self.metrics.worker_info.labels(*labels).set(1)
        log.info(
            "%s: actor %s on node %s (%s), gpus [%s], pid %s",
            self.label,
            self.name,
            str(info["node"])[:12],
            info["ip"],
            info["gpus"],
            info["pid"],
        )

    # --- lifecycle ---
    async def load(self) -> None:
        self._set_state("starting")
        self._actor = await asyncio.to_thread(
            self.cluster.create_actor, self.step, self.config, self._config_version, self.name
        )
        try:
            info = await self._wait_loaded(self._actor, start_up=True)
        except BaseException:
            self._set_state("dead")
            await self._kill(self._actor, restart=False)
            raise
        self._set_info(info)
        self._healthy = True
        self._set_state("alive")

    async def _wait_loaded(self, actor, start_up: bool = False) -> dict[str, Any]:
        """The actor's first call: `load`, answered within start_timeout_s (pending actors included)."""
        from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError

        timeout = self.settings.start_timeout_s
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            remaining = deadline - loop.time()
            try:
                if remaining <= 0:
                    raise TimeoutError
                info = await asyncio.wait_for(_awaitable(actor.load.remote()), remaining)
                if self._killed_pid is None or info["pid"] != self._killed_pid:
                    self._killed_pid = None
                    return info
                await asyncio.sleep(min(RETRY_UNAVAILABLE_S, max(0.0, remaining)))  # ray.kill has not landed yet
            except TimeoutError:
                message = (
                    f"{self.name} was not running and loaded within workers.start_timeout_s={timeout:g} s "
                    f"(still pending? {self.cluster.asks_for(self.step)})"
                )
                raise (RuntimeError(message) if start_up else _NotBack(message)) from None
            except ActorUnavailableError:  # restarting, or its node is being declared dead
                await asyncio.sleep(min(RETRY_UNAVAILABLE_S, max(0.0, remaining)))
            except RayTaskError as exc:
                if start_up:
                    raise _stage_exception(exc) from None
                raise _NotBack(f"{self.name}: loading the stage failed: {_first_line(_stage_exception(exc))}") from None
            except RayActorError as exc:
                message = f"{self.name} died: {_first_line(exc)}"
                raise (RuntimeError(message) if start_up else _NotBack(message)) from None

    async def _kill(self, actor, restart: bool) -> None:
        if actor is None:
            return
        import ray

        try:
            await asyncio.to_thread(ray.kill, actor, no_restart=not restart)
        except Exception as exc:  # already gone
            log.debug("%s: kill: %s", self.name, exc)

    async def close(self) -> None:
        if self._recovery is not None:
            self._recovery.cancel()
            await asyncio.gather(self._recovery, return_exceptions=True)
        actor, self._actor = self._actor, None
        if actor is None:
            return
        try:
            await asyncio.wait_for(_awaitable(actor.close.remote()), CLOSE_TIMEOUT_S)
        except Exception as exc:
            log.debug("%s: close: %s", self.name, exc)
        await self._kill(actor, restart=False)
        self._set_state("dead")
        if self._info_labels:
            self.metrics.worker_info.remove(*self._info_labels)
            self._info_labels = None

    # --- the StageHost calls ---
    async def prepare(self, fields: dict[str, Any]) -> dict[str, Any]:
        return fields  # prepared inside the actor, on the GPU's node

    async def process(self, batch: list[dict[str, Any]]) -> list[dict[str, Any] | StageError]:
        from ray.exceptions import ActorUnavailableError, RayActorError, RayError, RayTaskError

        await self._ensure_healthy()
        actor, incarnation = self._actor, self._incarnation
        try:
            outputs, usage, info = await asyncio.wait_for(
                _awaitable(actor.run.remote(batch, self._config_version, self._config_dump)),
                self.settings.call_timeout_s,
            )
        except TimeoutError:
            if self._lost(incarnation, "timeout", hung=True):
                await self._kill(actor, restart=True)  # a running call cannot be cancelled; Ray restarts the actor
            raise WorkerLost(
                f"{self.name}: a call ran past workers.call_timeout_s={self.settings.call_timeout_s:g} s; the actor was killed and restarted",
                kind="WorkerTimeout",
            ) from None
        except RayTaskError as exc:
            raise _stage_exception(exc) from None
        except RayActorError as exc:
            reason = "unavailable" if isinstance(exc, ActorUnavailableError) else "died"
            self._lost(incarnation, reason)
            raise WorkerLost(f"{self.name} was lost during the call: {_first_line(exc)}") from None
        except RayError as exc:  # the worker process killed by Ray's memory monitor, its node died, ...
            self._lost(incarnation, type(exc).__name__)
            kind = "WorkerOutOfMemory" if type(exc).__name__ == "OutOfMemoryError" else "WorkerCrashed"
            raise WorkerLost(f"{self.name} was lost during the call: {_first_line(exc)}", kind=kind) from None
        if info["pid"] != self._pid and incarnation == self._incarnation and self._healthy:
            # killed between calls: Ray restarted it and queued this call, nothing was lost
            log.warning("%s: actor %s was restarted between calls", self.label, self.name)
            self.metrics.worker_restarts.labels(self.step.label).inc()
            self._set_info(info)
        self._usage.update(usage)
        return outputs

    def take_usage(self) -> Counter[str]:
        used, self._usage = self._usage, Counter()
        return used

    def reconfigure(self, config: StageConfig) -> None:
        self.config = config
        self._config_dump = config.model_dump()
        self._config_version += 1  # applied by the actor with the next call

    # --- recovery ---
    def _lost(self, incarnation: int, reason: str, hung: bool = False) -> bool:
        """Note a lost call; the first call to notice this incarnation's loss (True) starts
        bringing the actor back at once, so /metrics shows its state and the next call need not wait."""
        self.metrics.workers_lost.labels(self.step.label, reason).inc()
        if incarnation != self._incarnation:
            return False
        self._incarnation += 1
        self._healthy = False
        if hung:  # to be killed: ray.kill returns before the process is gone, so its answers do not count
            self._killed_pid = self._pid
        self._set_state("restarting")
        log.warning("%s: actor %s lost (%s)", self.label, self.name, reason)
        if self._recovery is None or self._recovery.done():
            self._recovery = asyncio.get_running_loop().create_task(self._recover(), name=f"recover-{self.name}")
            self._recovery.add_done_callback(_retrieved)  # the next call raises its WorkerGone
        return True

    async def _ensure_healthy(self) -> None:
        """Wait for a recovery in progress; raises WorkerGone if the actor cannot be had."""
        if not self._healthy and self._recovery is not None:
            await asyncio.shield(self._recovery)

    async def _recover(self) -> None:
        try:
            info = await self._wait_loaded(self._actor)
        except _NotBack as exc:
            log.warning("%s: %s; replacing it", self.label, exc)
            info = await self._replace(str(exc))
        self._set_info(info)
        self.metrics.worker_restarts.labels(self.step.label).inc()
        self._healthy = True
        self._set_state("alive")

    async def _replace(self, why: str) -> dict[str, Any]:
        settings = self.settings
        delay = settings.replace_backoff_s
        for attempt in range(1, settings.max_replacements + 1):
            self._set_state("replacing")
            await asyncio.sleep(delay)
            await self._kill(self._actor, restart=False)
            self._killed_pid = None
            try:
                self._actor = await asyncio.to_thread(
                    self.cluster.create_actor, self.step, self.config, self._config_version, self.name, True
                )
                info = await self._wait_loaded(self._actor)
            except (_NotBack, ValueError) as exc:
                why = str(exc)
                log.warning("%s: replacement %d/%d failed: %s", self.label, attempt, settings.max_replacements, why)
                delay = min(delay * 2, settings.replace_backoff_max_s)
                continue
            log.info("%s: actor %s replaced (attempt %d)", self.label, self.name, attempt)
            return info
        self._set_state("dead")
        await self._kill(self._actor, restart=False)
        raise WorkerGone(
            f"{self.name} could not be brought back after {settings.max_replacements} replacement(s) "
            f"(workers.max_replacements); last: {why}"
        )


def _retrieved(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("%s: %s", task.get_name(), task.exception())


async def _awaitable(ref) -> Any:
    return await ref
