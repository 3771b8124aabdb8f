"""Hot reload of the daemon's config file: SIGHUP (`systemctl reload`) or a change of the file.

A reload reads the file once and validates all of it (`parse_config`, the same checks as
`reelflow check`). Any problem, or a change to something that cannot change while the
daemon runs, leaves the old config in force: every problem is logged with its key path
and `reelflow_config_reloads_total{result="error"}` counts it. A valid file is compared
with the config in force:

- what each change means (refused, applied at once, in place, a model reload, workers
  re-placed, a new step graph) is decided by the rules in plan.py;
- the pipeline makes the edits (rollout.py orders them and undoes them if a new model fails
  to load: everything is put back and the reload counts as an error);
- the pipeline then holds the new config (the one owner of the config in force) and
  `on_applied` applies the daemon's own settings (`settle_ms`, `log_level`, ...).

Each worker stamps the records it takes with the digest of the config it runs with, so a
result line's `_config_hash` is the config that produced it (daemon/io/outbox.py).
A file change reloads only when the text differs from the last one tried; SIGHUP always
reloads (systemd expects its RELOADING=1 ... READY=1 either way).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from pathlib import Path

from daemon.config import Config, ConfigError, parse_config
from daemon.runtime.pipeline import Pipeline
from daemon.service.notify import Notifier
from daemon.service.reload.plan import plan_reload
from daemon.service.reload.rollout import ReloadFailed, Rollout, swap

log = logging.getLogger("reelflow.reload")


class Reloader:
    """Serves reloads of `path` for `pipeline`, which owns the config in force; `on_applied(new)`
    applies the daemon's own settings once a new config is in force; `status` is the line
    sent with READY=1."""

    def __init__(
        self,
        path: Path | None,
        pipeline: Pipeline,
        notifier: Notifier,
        on_applied: Callable[[Config], None],
        status: Callable[[], str],
    ):
        self.path = path
        self.pipeline = pipeline
        self.notifier = notifier
        self.on_applied = on_applied
        self.status = status
        self._wake = asyncio.Event()
        self._forced = False
        self._last_tried = pipeline.config.digest
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task | None = None
        self._watcher: asyncio.Task | None = None
        self._watch_stop = asyncio.Event()

    # --- triggers ---------------------------------------------------------------------------

    def request(self, forced: bool = True) -> None:
        """Ask for a reload (SIGHUP: forced). Requests made while one runs are merged into the next."""
        self._forced = self._forced or forced
        self._wake.set()

    @property
    def task(self) -> asyncio.Task | None:
        return self._task

    def watch(self) -> None:
        """Start watching the file; call it before the models load so that an edit made
        meanwhile is not missed (its reload waits for `start`)."""
        if self.pipeline.config.daemon.watch_config:
            self._start_watch()

    def start(self) -> None:
        """Serve reload requests, beginning with a check that the file is still the one loaded."""
        if self.path is None:
            return
        if self.pipeline.config.daemon.watch_config:
            self._start_watch()
        self.request(forced=False)
        self._task = asyncio.create_task(self._serve(), name="config-reload")

    async def stop(self) -> None:
        """Let a reload in progress finish (a half-done rollout must not be cut), then stop."""
        await self._set_watch(False)
        await self._idle.wait()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def _start_watch(self) -> None:
        if self._watcher is None and self.path is not None:
            self._watch_stop = asyncio.Event()
            self._watcher = asyncio.create_task(self._watch(self._watch_stop), name="config-watch")

    async def _set_watch(self, on: bool) -> None:
        if on:
            self._start_watch()
        elif self._watcher is not None:
            watcher, self._watcher = self._watcher, None
            # Not cancel(): the watch thread would finish its wait (up to 5 s) first; it checks
            # the stop event every `step` and the task then ends.
            self._watch_stop.set()
            await asyncio.gather(watcher, return_exceptions=True)

    async def _watch(self, stop: asyncio.Event) -> None:
        import watchfiles

        target = self.path
        # The file itself, or `..data`-style names: Kubernetes swaps a ConfigMap through a symlink.
        wanted = {target.name}

        def relevant(_change, path: str) -> bool:
            name = Path(path).name
            return name in wanted or name.startswith("..")

        try:
            async for _ in watchfiles.awatch(
                target.parent, watch_filter=relevant, recursive=False, debounce=400, step=100, stop_event=stop
            ):
                self.request(forced=False)
        except Exception as exc:
            log.warning("watching %s failed (%s); SIGHUP still reloads it", target, exc)

    async def _serve(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            forced, self._forced = self._forced, False
            self._idle.clear()
            try:
                await self.reload(forced)
            finally:
                self._idle.set()

    # --- one reload -------------------------------------------------------------------------

    async def reload(self, forced: bool = True) -> bool | None:
        """Reload the file. True: applied; False: refused (old config kept); None: file unchanged."""
        try:
            text = await asyncio.to_thread(self.path.read_text, encoding="utf-8-sig")
        except OSError as exc:
            if not forced:
                return None  # mid-replace by an editor; the next event brings the new file
            text = None
            error = f"cannot read the config file: {exc.strerror}"
        if text is not None:
            digest = hashlib.sha256(text.encode()).hexdigest()[:12]
            if not forced and digest == self._last_tried:
                return None
            self._last_tried = digest
        notify = self.notifier
        notify.reloading()
        try:
            if text is None:
                return self._refuse([error])
            try:
                new = await asyncio.to_thread(parse_config, text, str(self.path))
            except ConfigError as exc:
                return self._refuse(exc.problems)
            except Exception as exc:  # e.g. a stage module that no longer imports cleanly
                return self._refuse([f"validating it raised {type(exc).__name__}: {exc}"])
            return await self._apply(new)
        finally:
            notify.ready(self.status())

    def _refuse(self, problems: list[str]) -> bool:
        old = self.pipeline.config
        log.error(
            "config reload refused: %s has %d problem(s); the config in force (%s) stays",
            self.path,
            len(problems),
            old.digest,
        )
        for problem in problems:
            log.error("  - %s", problem)
        self.pipeline.metrics.config_reloads.labels("error").inc()
        return False

    async def _apply(self, new: Config) -> bool:
        pipeline = self.pipeline
        old = pipeline.config
        plan = plan_reload(old, new)
        if plan.refused:
            return self._refuse(plan.refused)
        try:
            if plan.rebuild:
                await swap(pipeline, new)
            else:
                await Rollout(pipeline, new.digest, old.digest).apply(plan.steps)
        except ReloadFailed as exc:
            return self._refuse([f"a new stage failed to load ({exc}); every worker runs its old stage again"])
        pipeline.adopt(new)
        self.on_applied(new)
        await self._set_watch(new.daemon.watch_config)
        pipeline.metrics.set_config(new.digest)
        pipeline.metrics.config_reloads.labels("ok").inc()
        log.info("config reloaded: %s -> %s: %s", old.digest, new.digest, plan.describe())
        return True
