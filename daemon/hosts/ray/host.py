"""`RayHost`: one worker's Ray actor, behind the same calls as `LocalHost`, so the Worker,
the metrics and the outbox cannot tell the difference; and how it comes back when it breaks.

Queues, batching, retries and the outbox stay in the daemon; only the stages move. Each
worker is one named actor, `reelflow:<step label>:<n>` (daemon/hosts/ray/actor.py runs in
it; daemon/hosts/ray/cluster.py places and creates it). Records travel as their fields
(paths and metadata); `prepare` runs inside the actor, so frames decode on the GPU's node.

What happens when things break (the Worker does the retrying, see `hosts.base.WorkerLost`):

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

Every Ray call is awaited (never `ray.get` on the loop); blocking ones run in threads.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

from daemon.config import Step
from daemon.hosts.base import Slot, WorkerGone, WorkerLost
from stages.base import Resources, StageConfig

log = logging.getLogger(__name__)

STATES = ("starting", "alive", "restarting", "replacing", "dead")
RETRY_UNAVAILABLE_S = 0.5  # while a restarting actor is unreachable, ask again this often
CLOSE_TIMEOUT_S = 10.0


class Placement(Protocol):
    """What a host needs from the cluster that made it (`cluster.RayCluster`)."""

    metrics: Any

    def create_actor(self, step: Step, config: StageConfig, version: int, name: str, replacing: bool = False): ...
    def loading(self, step: Step) -> AbstractAsyncContextManager[None]: ...
    def asks_for(self, step: Step) -> str: ...


class _NotBack(Exception):
    """The actor is dead for good, failed to load, or did not answer in time: replace it."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def _stage_exception(exc: Exception) -> Exception:
    """The stage's own exception inside a RayTaskError (so OOM halving and error names work)."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, Exception) else exc


class RayHost:
    """One worker's actor, behind the StageHost calls. `prepare` is the identity here:
    `process` runs prepare + process inside the actor."""

    def __init__(self, cluster: Placement, step: Step, name: str, label: str):
        self.cluster = cluster
        self.step = step
        self.settings = step.workers
        self.label = label
        self.name = name  # the actor's, in the cluster's namespace
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
        """The actor's first call: `load`, answered within start_timeout_s (pending actors
        included), counted from when the cluster lets this actor load (see `RayCluster.loading`)."""
        async with self.cluster.loading(self.step):
            return await self._load_within_timeout(actor, start_up)

    async def _load_within_timeout(self, actor, start_up: bool) -> dict[str, Any]:
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

    async def process(self, batch: list[dict[str, Any]]) -> list[Slot]:
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

    def resources(self) -> Resources:
        """What the stage declares for the step's config (the stage itself is in the actor)."""
        return self.step.stage_cls.resources(self.config)

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
