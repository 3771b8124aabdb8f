"""`StageActor`: the code that runs inside a Ray actor (`workers: {backend: ray}`).

One actor hosts one resident Stage. Ray starts the actor's process with `CUDA_VISIBLE_DEVICES`
set to the GPUs it placed the actor on, so the stage's device counts from `cuda:0` in here
and whatever the stage starts (a vLLM engine core) inherits that mask: nothing in the actor
edits the environment. `prepare` runs in the actor's own thread pool, so frames decode on
the GPU's node; the batch rules (a failed prepare fails its record alone, one answer per
record) are the worker's, from `daemon.hosts.base`.
"""

from __future__ import annotations

import asyncio
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from daemon.hosts.base import PreparedBatch, Slot
from stages.base import MODEL_LOADING, Stage, StageConfig


class StageActor:
    """The Ray actor: one resident stage; `prepare` in a thread pool, one model call at a time.

    Two `run` calls may be in the actor at once (`max_concurrency`): the second prepares
    its records while the first holds the model.
    """

    def __init__(self, stage_cls: type[Stage], config: dict[str, Any], version: int, prep_workers: int, label: str):
        import ray

        from daemon.config import step_config_model

        gpus = ray.get_gpu_ids()
        self.device = ",".join(f"cuda:{i}" for i in range(len(gpus))) if gpus else "cpu"
        self.label = label
        self._config_model = step_config_model(stage_cls)  # stage keys + runtime keys, from a plain dump
        self.stage = stage_cls(self._config(config), self.device)
        self.version = version  # of the config the stage has
        self.loaded = False
        self._asynchronous: bool | None = None  # what the loaded stage says (its backend is chosen at load)
        self._model_lock = threading.Lock()  # one `process` at a time
        self._loop_lock = threading.Lock()  # the async stage's loop is started once
        prepares = stage_cls.resources(self.stage.config).prepares  # as declared, as on the local host
        self._prep_pool = ThreadPoolExecutor(prep_workers, "prep") if prepares else None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._info = {
            "node": ray.get_runtime_context().get_node_id(),
            "ip": ray.util.get_node_ip_address(),
            "gpus": ",".join(str(g) for g in gpus),
            "pid": os.getpid(),
            "device": self.device,
        }

    def _config(self, data: dict[str, Any]) -> StageConfig:
        return self._config_model.model_validate(data)

    def load(self) -> dict[str, Any]:
        """Load the model once (a restarted actor loads again); say where this actor runs."""
        with MODEL_LOADING:  # the process's one model-loading lock, as on the local host
            if not self.loaded:
                self.stage.load()
                self.loaded = True
        return self.info()

    def info(self) -> dict[str, Any]:
        return self._info

    def run(
        self, batch: list[dict[str, Any]], version: int, config: dict[str, Any]
    ) -> tuple[list[Slot], dict[str, int], dict[str, Any]]:
        """prepare + process one batch; a record whose prepare fails gets a StageError in its slot.

        The step's current config comes with every call (a restarted actor must not run an
        old one); it is applied when its version differs from the stage's. The answer says
        which process ran the call, so a restart between calls is seen too."""
        if version != self.version:
            self.stage.config = self._config(config)
            self._asynchronous = None
            self.version = version
        if self._prep_pool is None:
            prepared = PreparedBatch.of(batch)
        else:
            futures = [self._prep_pool.submit(self.stage.prepare, fields) for fields in batch]
            prepared = PreparedBatch.of(_outcome(future) for future in futures)
        usage: dict[str, int] = {}
        if prepared.prepared:
            outputs, usage = self._process(prepared.prepared)
            prepared.fill(outputs)
        return prepared.slots, usage, self._info

    def _process(self, batch: list[dict[str, Any]]) -> tuple[list, dict[str, int]]:
        if self._asynchronous is None:
            self._asynchronous = self.stage.loaded_resources().asynchronous
        if self._asynchronous:  # an async stage keeps its own loop; calls may overlap
            if self._loop is None:
                with self._loop_lock:
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


def _outcome(future) -> dict[str, Any] | Exception:
    try:
        return future.result()
    except Exception as exc:  # a bad record in prepare: that record fails, the rest go on
        return exc
