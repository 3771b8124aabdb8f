"""The reload rules: what each config change means for a running daemon. Add a rule here.

Every change gets one `Action`, the strongest its keys call for:

| change                                          | action       | why                                        |
| ----------------------------------------------- | ------------ | ------------------------------------------ |
| a key in `FIXED_KEYS` (inbox, outbox, ...)      | `REFUSE`     | bound at start-up; the old config stays    |
| steps added, removed or reordered               | `SWAP_GRAPH` | the pipeline drains, a new graph is built  |
| a key in `STEP_RULES` (e.g. `queue_size`)        | its action   | see the table                              |
| a key in the stage's `Config.heavy_keys`         | `RELOAD`     | the model loads again, worker by worker    |
| any other step key (batch sizes, prompts, ...)   | `IN_PLACE`   | the stage reads `self.config` every call   |
| a `daemon:` key not fixed (settle_ms, ...)       | applied at once by the daemon (`on_applied`) |

The reloader (reloader.py) refuses or carries out the plan; rollout.py turns `RELOAD`,
`PLACE` and `IN_PLACE` into per-worker pipeline edits and `SWAP_GRAPH` into one graph swap.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path

from daemon.config import Config, Step


class Action(IntEnum):
    """What a change costs, cheapest first: a step's action is the largest of its keys'."""

    IN_PLACE = 0  # the workers get the new settings between two batches; models stay loaded
    PLACE = 1  # workers are added, retired or moved to match the devices; the rest stay
    RELOAD = 2  # the step's workers load their model again, one at a time (the others serve)
    SWAP_GRAPH = 3  # the whole pipeline drains and the new step graph is assembled
    REFUSE = 4  # cannot change while the daemon runs: the old config stays in force


# (key path, why it cannot change live): each one refuses the reload.
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

# A step key's action when it is not the stage's own business (its heavy_keys say RELOAD).
STEP_RULES: dict[str, Action] = {
    "queue_size": Action.SWAP_GRAPH,  # a queue with records in it cannot be resized
    "devices": Action.PLACE,
    "workers_per_device": Action.PLACE,
}

# `workers` (the step's share of the top-level `workers:` section) is compared as one key; the
# stage's heavy_keys include it, so a change reloads the step's workers.
WORKERS_KEY = "workers"


def step_rule(step: Step, key: str) -> Action:
    """What a change of `key` in `step`'s config means."""
    if key in STEP_RULES:
        return STEP_RULES[key]
    if key in step.stage_cls.Config.heavy_keys:
        return Action.RELOAD
    return Action.IN_PLACE


def model_keys(step: Step) -> frozenset[str]:
    """The step's keys whose change needs the model loaded again."""
    return frozenset(k for k in step.stage_cls.Config.heavy_keys if step_rule(step, k) == Action.RELOAD)


def same_stage(step: Step, device: str) -> tuple:
    """Two workers with the same key can share one loaded stage (only light settings differ)."""
    config = step.config
    return (step.type, step.name, device, repr(sorted((k, getattr(config, k, None)) for k in model_keys(step))))


@dataclass
class StepChange:
    old: Step
    new: Step
    changed: frozenset[str]

    @property
    def action(self) -> Action:
        return max((step_rule(self.new, key) for key in self.changed), default=Action.IN_PLACE)

    @property
    def reloads_model(self) -> bool:
        return any(step_rule(self.new, key) == Action.RELOAD for key in self.changed)


@dataclass
class Plan:
    refused: list[str] = field(default_factory=list)
    rebuild: str | None = None  # why the step graph is swapped (Action.SWAP_GRAPH)
    steps: list[StepChange] = field(default_factory=list)
    daemon_keys: frozenset[str] = frozenset()

    def describe(self) -> str:
        if self.rebuild:
            return f"step graph rebuilt ({self.rebuild})"
        kinds = {Action.RELOAD: "model reloaded", Action.PLACE: "workers re-placed", Action.IN_PLACE: "in place"}
        parts = [
            f"{change.new.label} {kinds[change.action]}: {', '.join(sorted(change.changed))}"
            for change in self.steps
            if change.changed
        ]
        if self.daemon_keys:
            parts.append(f"daemon: {', '.join(sorted(self.daemon_keys))}")
        return "; ".join(parts) or "no setting changed"


def _get(config: Config, path: str):
    node = config.file
    for part in path.split("."):
        node = getattr(node, part)
    return node.resolve() if isinstance(node, Path) and path.startswith("daemon.") else node


def _changed(old: dict, new: dict) -> frozenset[str]:
    return frozenset(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))


def plan_reload(old: Config, new: Config) -> Plan:
    plan = Plan()
    for path, why in FIXED_KEYS:
        before, after = _get(old, path), _get(new, path)
        if before != after:
            plan.refused.append(
                f"{path}: cannot change while the daemon runs ({why}): {before} -> {after}; "
                "put the old value back, or restart the daemon (systemctl restart reelflow) to use the new one"
            )
    fixed = {"inbox", "outbox", "metrics"}
    plan.daemon_keys = _changed(old.daemon.model_dump(exclude=fixed), new.daemon.model_dump(exclude=fixed))
    if [(s.type, s.name) for s in old.steps] != [(s.type, s.name) for s in new.steps]:
        plan.rebuild = "steps added, removed or reordered"
        return plan
    for before, after in zip(old.steps, new.steps, strict=True):
        changed = _changed(before.config.model_dump(), after.config.model_dump())
        if before.workers != after.workers:
            changed |= {WORKERS_KEY}
        plan.steps.append(StepChange(before, after, changed))
    for change in plan.steps:
        for key in sorted(k for k in change.changed if step_rule(change.new, k) == Action.REFUSE):
            plan.refused.append(
                f"{change.new.label}: {key}: cannot change while the daemon runs; put the old value back, "
                "or restart the daemon (systemctl restart reelflow) to use the new one"
            )
    swapping = [c for c in plan.steps if c.action == Action.SWAP_GRAPH]
    if swapping:
        keys = sorted({k for c in swapping for k in c.changed if step_rule(c.new, k) == Action.SWAP_GRAPH})
        plan.rebuild = f"{', '.join(keys)} of {', '.join(c.new.label for c in swapping)}"
    return plan
