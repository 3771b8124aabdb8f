"""Hot reload of the daemon's config file: SIGHUP (`systemctl reload`) or a change of the file.

A reload reads the file once and validates all of it (`parse_config`, the same checks as
`reelflow check`). Any problem, or a change to something that cannot change while the
daemon runs, leaves the old config in force: every problem is logged with its key path
and `reelflow_config_reloads_total{result="error"}` counts it. A valid file is compared
with the config in force:

- settings of the daemon itself (`settle_ms`, `rescan_s`, `ignore`, `log_level`,
  `drain_timeout_s`, `watch_config`) apply at once;
- per step, light changes (batch sizes, waits, prompts, sampling parameters, concurrency,
  prep threads) go to each worker in place, its model stays loaded; changes of the stage's
  `heavy_keys` (model path, dtype, tensor parallelism, ...) or of its devices reload or move
  workers one at a time; adding, removing or reordering steps (or resizing a queue)
  drains the pipeline and rebuilds it (see daemon/service/reload/rollout.py);
- if a new model fails to load, everything is put back and the reload counts as an error.

Each worker stamps the records it takes with the digest of the config it runs with, so a
result line's `_config_hash` is the config that produced it (daemon/outbox.py).
A file change reloads only when the text differs from the last one tried; SIGHUP always
reloads (systemd expects its RELOADING=1 ... READY=1 either way).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from daemon.config import Config, ConfigError, parse_config
from daemon.io.inbox import DEFAULT_IGNORE
from daemon.service.reload.rollout import PLACEMENT_KEYS, Rebuild, ReloadFailed, Rollout, StepChange

if TYPE_CHECKING:
    from daemon.service.serve import Daemon

log = logging.getLogger("reelflow.reload")

# (key path, why it cannot change live)
FIXED_KEYS = (
    ("daemon.inbox", "the inbox is claimed and watched from start-up"),
    ("daemon.outbox", "jobs in progress write there"),
    ("daemon.metrics.host", "the metrics server is bound at start-up"),
    ("daemon.metrics.port", "the metrics server is bound at start-up"),
    ("meta_folder", "jobs being read resolve their paths with it"),
    ("video_key", "jobs being read use it"),
    ("image_key", "jobs being read use it"),
    ("text_key", "jobs being read use it"),
    ("workers.address", "the daemon joins its Ray cluster at start-up"),
    ("workers.namespace", "the daemon's Ray actors live in it"),
    ("workers.runtime_env", "the daemon's Ray job starts with it"),
)


def _get(config: Config, path: str):
    node = config.file
    for part in path.split("."):
        node = getattr(node, part)
    return node.resolve() if isinstance(node, Path) and path.startswith("daemon.") else node


def _changed(old: dict, new: dict) -> frozenset[str]:
    return frozenset(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))


@dataclass
class Plan:
    refused: list[str] = field(default_factory=list)
    rebuild: str | None = None  # why the step graph is rebuilt
    steps: list[StepChange] = field(default_factory=list)
    daemon_keys: frozenset[str] = frozenset()

    def describe(self) -> str:
        if self.rebuild:
            return f"step graph rebuilt ({self.rebuild})"
        parts = []
        for change in self.steps:
            if change.changed:
                if change.reloads_model:
                    kind = "model reloaded"
                elif change.changed & PLACEMENT_KEYS:
                    kind = "workers re-placed"
                else:
                    kind = "in place"
                parts.append(f"{change.new.label} {kind}: {', '.join(sorted(change.changed))}")
        if self.daemon_keys:
            parts.append(f"daemon: {', '.join(sorted(self.daemon_keys))}")
        return "; ".join(parts) or "no setting changed"


def plan_reload(old: Config, new: Config) -> Plan:
    plan = Plan()
    for path, why in FIXED_KEYS:
        before, after = _get(old, path), _get(new, path)
        if before != after:
            plan.refused.append(
                f"{path}: cannot change while the daemon runs ({why}): {before} -> {after}; "
                "put the old value back, or restart the daemon (systemctl restart reelflow) to use the new one"
            )
    daemon_old = old.daemon.model_dump(exclude={"inbox", "outbox", "metrics"})
    daemon_new = new.daemon.model_dump(exclude={"inbox", "outbox", "metrics"})
    plan.daemon_keys = _changed(daemon_old, daemon_new)
    if [(s.type, s.name) for s in old.steps] != [(s.type, s.name) for s in new.steps]:
        plan.rebuild = "steps added, removed or reordered"
        return plan
    for before, after in zip(old.steps, new.steps, strict=True):
        changed = _changed(before.config.model_dump(), after.config.model_dump())
        if before.workers != after.workers:  # the top-level `workers:` section changed what this step gets
            changed |= {"workers"}
        plan.steps.append(StepChange(before, after, changed))
    resized = [c.new.label for c in plan.steps if "queue_size" in c.changed]
    if resized:
        plan.rebuild = f"queue_size of {', '.join(resized)}"
    return plan


class Reloader:
    def __init__(self, daemon: Daemon):
        self.daemon = daemon
        self.path = daemon.config_path
        self._wake = asyncio.Event()
        self._forced = False
        self._last_tried = daemon.config.digest
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task | None = None
        self._watcher: asyncio.Task | None = None

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
        self._set_watch(self.daemon.config.daemon.watch_config)

    def start(self) -> None:
        """Serve reload requests, beginning with a check that the file is still the one loaded."""
        if self.path is None:
            return
        self._set_watch(self.daemon.config.daemon.watch_config)
        self.request(forced=False)
        self._task = asyncio.create_task(self._serve(), name="config-reload")

    async def stop(self) -> None:
        """Let a reload in progress finish (a half-done rollout must not be cut), then stop."""
        self._set_watch(False)
        await self._idle.wait()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def _set_watch(self, on: bool) -> None:
        if on and self._watcher is None and self.path is not None:
            self._watcher = asyncio.create_task(self._watch(), name="config-watch")
        elif not on and self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None

    async def _watch(self) -> None:
        import watchfiles

        target = self.path
        # The file itself, or `..data`-style names: Kubernetes swaps a ConfigMap through a symlink.
        wanted = {target.name}

        def relevant(_change, path: str) -> bool:
            name = Path(path).name
            return name in wanted or name.startswith("..")

        try:
            async for _ in watchfiles.awatch(
                target.parent, watch_filter=relevant, recursive=False, debounce=400, step=100
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
        notify = self.daemon.notifier
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
            notify.ready(self.daemon.status_line())

    def _refuse(self, problems: list[str]) -> bool:
        old = self.daemon.config
        log.error(
            "config reload refused: %s has %d problem(s); the config in force (%s) stays",
            self.path,
            len(problems),
            old.digest,
        )
        for problem in problems:
            log.error("  - %s", problem)
        self.daemon.metrics.config_reloads.labels("error").inc()
        return False

    async def _apply(self, new: Config) -> bool:
        daemon = self.daemon
        old = daemon.config
        plan = plan_reload(old, new)
        if plan.refused:
            return self._refuse(plan.refused)
        pipeline = daemon.engine.pipeline
        try:
            if plan.rebuild:
                await Rebuild(pipeline).apply(old, new)
            else:
                await Rollout(pipeline, new.digest, old.digest).apply(plan.steps)
        except ReloadFailed as exc:
            return self._refuse([f"a new stage failed to load ({exc}); every worker runs its old stage again"])
        for change in plan.steps:  # settings unchanged: the same stage now runs under the new digest
            if not change.changed:
                for worker in pipeline.workers[change.new.index]:
                    worker.config_digest = new.digest
        daemon.config = daemon.engine.config = pipeline.config = new
        daemon.apply_settings(new)
        self._set_watch(new.daemon.watch_config)
        daemon.metrics.set_config(new.digest)
        daemon.metrics.config_reloads.labels("ok").inc()
        log.info("config reloaded: %s -> %s: %s", old.digest, new.digest, plan.describe())
        return True


def inbox_ignore(config: Config) -> tuple[str, ...]:
    return (*DEFAULT_IGNORE, *config.daemon.ignore)
