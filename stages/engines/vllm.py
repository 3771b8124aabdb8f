"""One vLLM `AsyncLLM` engine on an event loop of its own, rebuilt when it dies.

Shared by the captioners' and the text steps' vLLM backends, which differ only in how they
turn records into requests and answers. The engine lives on a loop in a daemon thread owned
by this object, so it stays bound to one loop for its whole life whoever calls it: `_call`
runs a coroutine there from a plain thread, `_on_loop` awaits one from another loop (the
runtime's). A semaphore keeps at most `max_num_seqs` requests in flight per engine.

When the engine dies (`EngineDeadError`, or the engine reports itself errored), every
request that was in flight gets an `EngineDead` error, the engine is shut down and a new one
is built; later batches go to the new engine. The engine core is started inside
`stages.base.spawning(device)`: the host that started the worker decides which GPUs that
process sees and keeps engines that share a GPU from starting (and profiling its memory) at
the same time.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import Any

from stages.base import StageError, require, spawning

log = logging.getLogger(__name__)


def request_error(exc: BaseException) -> StageError:
    cause = exc.__cause__ if exc.__cause__ is not None else exc
    return StageError(
        f"vLLM refused or failed this request: {type(cause).__name__}: {cause}",
        error_type=type(cause).__name__,
    )


class EngineThread:
    """The engine's life cycle; subclasses add how a batch becomes requests (`_gather`)."""

    def __init__(self, engine_args: dict, device: str, max_num_seqs: int, stage: str):
        self.engine_args = dict(engine_args)
        self.device = device
        self.max_num_seqs = max_num_seqs
        self.stage = stage
        self.engine: Any = None
        self.restarts = 0
        self._ids = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._slots: asyncio.Semaphore | None = None
        self._rebuild_lock: asyncio.Lock | None = None

    # -- life cycle -------------------------------------------------------------------
    def load(self) -> None:
        require("vllm", stage=self.stage, extra="vllm")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"{self.stage}-vllm", daemon=True)
        self._thread.start()
        self.engine = self._call(self._start())

    async def _start(self):
        self._slots = asyncio.Semaphore(self.max_num_seqs)
        self._rebuild_lock = asyncio.Lock()
        # Built on the engine's own loop (blocking it while the engine starts, which nothing
        # else needs yet): AsyncLLM binds its output handler to the loop it is built in, and
        # load() may be called from a thread that runs another loop.
        return self._build_engine()

    def _build_engine(self):
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = AsyncEngineArgs(**self.engine_args)
        with spawning(self.device):
            log.info("%s: starting vLLM engine for %s on %s", self.stage, self.engine_args["model"], self.device)
            return AsyncLLM.from_engine_args(args)

    def close(self) -> None:
        engine, self.engine = self.engine, None
        if engine is not None:
            engine.shutdown()
        if self._loop is not None:
            self._call(self._cancel_tasks())  # the engine's output tasks end before their loop does
            self._loop.call_soon_threadsafe(self._loop.stop)
            if self._thread is not None:
                self._thread.join(timeout=10)
            self._loop.close()
            self._loop = None

    @staticmethod
    async def _cancel_tasks() -> None:
        tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _call(self, coroutine):
        """Run a coroutine on the engine's loop and wait for it (from a plain thread)."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    async def _on_loop(self, coroutine):
        """Run a coroutine on the engine's loop and await it from another loop."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coroutine, self._loop))

    def _request_id(self) -> str:
        return f"{self.stage}-{next(self._ids)}"

    # -- a batch ----------------------------------------------------------------------
    async def _gather(self, run_one: Callable[[Any], Awaitable[Any]], requests: list, answer_type: type) -> list:
        """Submit every request at once; an answer (`answer_type`) or a StageError per request."""
        from vllm.v1.engine.exceptions import EngineDeadError

        engine = self.engine

        async def limited(request):
            async with self._slots:
                return await run_one(engine, request)

        outcomes = await asyncio.gather(*(limited(r) for r in requests), return_exceptions=True)
        died = engine.errored or any(isinstance(o, EngineDeadError) for o in outcomes)
        results: list = []
        for outcome in outcomes:
            if isinstance(outcome, answer_type):
                results.append(outcome)
            elif died:
                results.append(
                    StageError(
                        f"the vLLM engine died while this record was in flight ({outcome!r}); the engine is "
                        "being restarted: submit the record again (if it keeps happening, see the daemon log "
                        "for the engine's own error, e.g. out of GPU memory: lower max_model_len or max_num_seqs)",
                        error_type="EngineDead",
                    )
                )
            else:
                results.append(request_error(outcome))
        if died:
            await self._rebuild(engine)
        return results

    async def _rebuild(self, dead_engine) -> None:
        async with self._rebuild_lock:
            if self.engine is not dead_engine:
                return  # another batch already rebuilt it
            log.error("%s: the vLLM engine died; shutting it down and starting a new one", self.stage)
            with contextlib.suppress(Exception):
                dead_engine.shutdown()
            # Built in a thread with no loop, AsyncLLM starts its output handler on the first
            # request, which is made here, on the engine's own loop.
            self.engine = await asyncio.to_thread(self._build_engine)
            self.restarts += 1
