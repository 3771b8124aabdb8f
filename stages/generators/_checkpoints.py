"""Checks on sizes and checkpoints that the generators' configs run at validation time.

Nothing here imports torch or diffusers: `reelflow check` runs it before any weights load. A
checkpoint is a local folder or a hub id; files of a hub id are read from the local hub cache
when they are there (never downloaded, except by `fetch_json`/`ensure_pipeline_class` at load).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path


def multiple_of(value: int | None, factor: int, name: str, model: str) -> int | None:
    if value is not None and value % factor:
        lower, upper = value - value % factor, value - value % factor + factor
        choice = f"{lower} or {upper}" if lower else f"{upper}"  # below the factor: the factor itself
        raise ValueError(f"{name} must be a multiple of {factor} for {model}; use {choice}")
    return value


def _looks_like_path(model_path: str) -> bool:
    return model_path.startswith(("/", "./", "../", "~")) or model_path.count("/") > 1 or "\\" in model_path


def checkpoint_file(model_path: str, filename: str) -> Path | None:
    """`filename` of a local checkpoint folder or of a hub id already in the local hub cache; never downloads."""
    local = Path(model_path).expanduser()
    if local.is_dir():
        found = local / filename
        return found if found.is_file() else None
    if _looks_like_path(model_path):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model_path, filename)
    except (ValueError, OSError, ImportError):  # not a valid repo id; no huggingface_hub: nothing cached
        return None
    return Path(cached) if isinstance(cached, str) else None


def checkpoint_json(model_path: str, filename: str) -> dict | None:
    found = checkpoint_file(model_path, filename)
    if found is None:
        return None
    try:
        data = json.loads(found.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def check_model_path(model_path: str, key: str = "model_path") -> str:
    """A local folder that exists, or something shaped like a hub id (`org/name`)."""
    local = Path(model_path).expanduser()
    if not local.is_dir() and (local.exists() or _looks_like_path(model_path)):
        what = "a file" if local.exists() else "not an existing directory"
        raise ValueError(
            f"{key} {model_path!r} is {what}; give a diffusers checkpoint folder (with model_index.json) "
            f"or a hub id such as org/name"
        )
    return model_path


def check_pipeline_class(model_path: str, expected: Iterable[str], stage: str, key: str = "model_path") -> None:
    """Refuse a checkpoint whose model_index.json names another pipeline (diffusers would load it silently).

    Checks local folders and hub ids already cached; a hub id not yet downloaded is checked at load.
    """
    expected = tuple(expected)
    index = checkpoint_json(model_path, "model_index.json")
    if index is None:
        if Path(model_path).expanduser().is_dir():
            raise ValueError(
                f"{key} {model_path!r} has no model_index.json, so it is not a diffusers pipeline folder; "
                f"{stage} needs a {' or '.join(expected)} checkpoint"
            )
        return
    found = index.get("_class_name")
    if found not in expected:
        raise ValueError(
            f"{key} {model_path!r} holds a {found} (model_index.json _class_name), but {stage} runs "
            f"{' or '.join(expected)}; point {key} at a checkpoint of that pipeline or pick the step for {found}"
        )


def fetch_json(model_path: str, filename: str) -> dict | None:
    """Like `checkpoint_json`, but fetches the file from the hub when it is not local (at load only)."""
    found = checkpoint_json(model_path, filename)
    if found is not None or Path(model_path).expanduser().is_dir():
        return found
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        hf_hub_download(model_path, filename)
    except EntryNotFoundError:
        return None
    return checkpoint_json(model_path, filename)


def ensure_pipeline_class(model_path: str, expected: Iterable[str], stage: str, key: str = "model_path") -> None:
    """At load: the same check, fetching model_index.json from the hub when it is not local (may download)."""
    fetch_json(model_path, "model_index.json")
    check_pipeline_class(model_path, expected, stage, key)
