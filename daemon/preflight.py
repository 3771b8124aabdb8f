"""Preflight: what `reelflow serve`/`run` would fail on at start-up, found before anything starts.

Runs after the config validated and before any port is bound, file claimed or weight loaded
(and in `reelflow check`). Two things per step, each failure one line naming the step and the fix:

- the packages the stage declares (`Stage.requirements(config).packages`) are importable
  (checked with `find_spec`, nothing is imported);
- every checkpoint it declares (`.checkpoints`: `model_path`, a judge's `model`, ...) resolves:
  a local folder holding the files a loader reads, or a hub id that is in the local hub cache
  or, unless offline, answers the hub within a short timeout; every single weights file it
  declares (`.weight_files`: AestheticFilter's `head_path`) exists.

Both come from the stage, so a new stage (or a third-party one) is checked by declaring them,
with no change here.

A hub that cannot be reached otherwise costs minutes of retries inside transformers and ends
in a traceback that names neither the step nor the path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from daemon.config import Config, Step

# A loader reads one of these at the top of a checkpoint folder: transformers' config.json,
# diffusers' model_index.json (pipelines) or config.json (a single model such as a motion adapter).
CHECKPOINT_FILES = ("config.json", "model_index.json")
HUB_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Problem:
    step: str
    message: str

    def __str__(self) -> str:
        return f"{self.step}: {self.message}"


def _where(step: Step) -> str:
    return f"steps[{step.index}] ({step.type}/{step.name})"


def missing_dependencies(step: Step) -> list[Problem]:
    return [
        Problem(_where(step), line) for line in step.stage_cls.requirements(step.config).missing_packages(step.name)
    ]


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _looks_like_path(value: str) -> bool:
    return value.startswith(("/", "./", "../", "~", ".")) or value.count("/") > 1 or "\\" in value


def _in_cache(repo_id: str) -> bool | None:
    """True/False: whether the local hub cache holds the checkpoint; None: huggingface_hub missing."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for name in CHECKPOINT_FILES:
        try:
            if isinstance(try_to_load_from_cache(repo_id, name), str):
                return True
        except (ValueError, OSError):  # not a valid repo id, unreadable cache
            return False
    return False


def _hub_answer(repo_id: str) -> str | None:
    """None when the hub knows the repo; else why not, in a few words."""
    try:
        from huggingface_hub import HfApi
    except ImportError:
        return "huggingface_hub is not installed"
    try:
        HfApi().model_info(repo_id, timeout=HUB_TIMEOUT_S)
    except Exception as exc:  # noqa: BLE001 - any failure means "not loadable from the hub now"; we report it
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status in (401, 403, 404):
            return f"the hub has no repo {repo_id!r} you can read (HTTP {status})"
        if status is not None:
            return f"the hub answered HTTP {status}"
        return f"the hub could not be reached within {HUB_TIMEOUT_S:.0f} s ({type(exc).__name__})"
    return None


def check_checkpoint(where: str, key: str, value: str, *, network: bool) -> Problem | None:
    local = Path(value).expanduser()
    if local.is_file() and local.suffix == ".gguf":
        return None
    if local.is_dir():
        if any((local / name).is_file() for name in CHECKPOINT_FILES):
            return None
        return Problem(
            where,
            f"{key} {value!r} is a folder without {' or '.join(CHECKPOINT_FILES)}, so no loader can read it; "
            "point it at the checkpoint's own folder (the one holding those files)",
        )
    fixes = (
        "fix: a local checkpoint folder, or HF_HUB_OFFLINE=1 with the model in the hub cache "
        "(huggingface-cli download ID), or network access to the hub"
    )
    if local.exists() or _looks_like_path(value):
        return Problem(where, f"{key} {value!r} is not an existing folder; {fixes}")
    cached = _in_cache(value)
    if cached:
        return None
    if cached is None:
        return Problem(where, f"{key} {value!r} cannot be looked up: huggingface_hub is not installed; {fixes}")
    if _hub_offline():
        return Problem(where, f"{key} {value!r} is not in the local hub cache and HF_HUB_OFFLINE is set; {fixes}")
    if not network:
        return None  # `check --offline`: it would be downloaded at start-up
    why = _hub_answer(value)
    if why is None:
        return None
    return Problem(where, f"{key} {value!r} is not in the local hub cache and {why}; {fixes}")


def checkpoint_problems(step: Step, *, network: bool) -> list[Problem]:
    found = []
    needs = step.stage_cls.requirements(step.config)
    for key, value in needs.checkpoints:
        problem = check_checkpoint(_where(step), key, value, network=network)
        if problem:
            found.append(problem)
    for key, value in needs.weight_files:
        if not Path(value).expanduser().is_file():
            found.append(
                Problem(_where(step), f"{key} {value!r} is not a file; expected the weights file (.pth/.safetensors)")
            )
    return found


def preflight(config: Config, *, network: bool = True) -> list[Problem]:
    """Every problem start-up would meet, in step order; empty when it would get to loading."""
    problems: list[Problem] = []
    for step in config.steps:
        missing = missing_dependencies(step)
        problems += missing
        if not missing:  # without the packages the checkpoint is moot, and the fix is the install
            problems += checkpoint_problems(step, network=network)
    return problems
