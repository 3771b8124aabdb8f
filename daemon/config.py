"""The YAML config: parse, expand `${ENV}`, validate the whole file, report every error at once.

The seed's keys keep their meaning (`meta_path`, `meta_folder`, `base_folder`, `save_folder`,
`image_key`, `text_key`, `video_key`, `steps: [{type, name, config}]`); the `daemon:` section
configures the long-running mode. Each step's `config:` block is validated by the stage's own
`Config` model combined with the runtime keys (`StepRuntime`), so one block holds both, as in
the seed. The sections' models live in daemon/sections.py and are importable from here too.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from daemon import secrets
from daemon.sections import (
    CLUSTER_KEYS,
    RUNTIME_KEYS,
    DaemonSection,
    MetricsSection,
    OutputSpec,
    ParquetOutput,
    RemoteSection,
    SourceSpec,
    StepRuntime,
    WebDatasetOutput,
    WorkerSettings,
    WorkersSection,
)
from stages.base import StageConfig, has_prepare
from stages.registry import UnknownStage, stage_class

__all__ = [  # the sections' models stay importable from here (`from daemon.config import RemoteSection`)
    "CLUSTER_KEYS",
    "RUNTIME_KEYS",
    "Config",
    "ConfigError",
    "DaemonSection",
    "MetricsSection",
    "OutputSpec",
    "ParquetOutput",
    "PipelineFile",
    "RemoteSection",
    "SourceSpec",
    "Step",
    "StepRuntime",
    "StepSpec",
    "WebDatasetOutput",
    "WorkerSettings",
    "WorkersSection",
    "load_config",
    "parse_config",
    "step_config_model",
]

AVAILABLE = " Available: "  # how stages.registry.UnknownStage lists the known stages

# Top-level names a newcomer reaches for that no spelling guess finds, and reelflow's key for each.
KEY_SYNONYMS = {
    **dict.fromkeys(("input", "inputs", "input_file", "meta", "meta_file"), "meta_path (one-shot input file)"),
    **dict.fromkeys(("output", "outputs", "output_dir", "out_dir", "outdir"), "save_folder (one-shot results)"),
    "inbox": "daemon.inbox (the folder `reelflow serve` watches)",
    "outbox": "daemon.outbox (where `reelflow serve` writes)",
}


class StepSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: str = Field(description="Stage family as registered, e.g. VideoCaptioner.")
    name: str = Field(description="Stage name as registered, e.g. Qwen2VLCaptioner.")
    config: dict[str, Any] = Field(default_factory=dict, description="The stage's settings plus runtime keys.")


class PipelineFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    meta_path: Path | None = Field(None, description="One-shot input: a jsonl/json/csv/tsv/parquet file.")
    meta_folder: Path | None = Field(None, description="Folder that relative media paths in rows resolve under.")
    base_folder: Path | None = Field(None, description="One-shot: where intermediate per-step results go.")
    save_folder: Path | None = Field(
        None, description="One-shot: where the final results go (a folder or a file path)."
    )
    image_key: str = Field("image", description="Row field holding an image path.")
    text_key: str = Field("text", description="Row field holding text.")
    video_key: str = Field("video", description="Row field holding a video path.")
    steps: list[StepSpec] = Field(min_length=1, description="The stages, in order.")
    workers: WorkersSection = Field(
        default_factory=WorkersSection, description="Where workers run (local or ray) and the Ray cluster to join."
    )
    daemon: DaemonSection = Field(default_factory=DaemonSection)


@dataclass(frozen=True)
class Step:
    index: int
    type: str
    name: str
    stage_cls: type
    config: StageConfig  # the stage's Config combined with StepRuntime (isinstance of both)
    workers: WorkerSettings = field(default_factory=WorkerSettings)  # top-level defaults + the step's overrides

    @property
    def label(self) -> str:
        return f"step_{self.index}_{self.type}_{self.name}"

    @property
    def runtime(self) -> StepRuntime:
        return StepRuntime(**{k: getattr(self.config, k) for k in RUNTIME_KEYS})


@dataclass(frozen=True)
class Config:
    file: PipelineFile
    steps: tuple[Step, ...]
    source: Path | None
    digest: str  # short hash of the file's text: recorded with each result

    @property
    def daemon(self) -> DaemonSection:
        return self.file.daemon


class ConfigError(Exception):
    """Every problem found in a config file, each with its key path."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: {len(problems)} problem(s)\n" + "\n".join(f"  - {p}" for p in problems))


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand_env(node: Any, path: str, problems: list[str], written: dict[str, str] | None = None) -> Any:
    """Substitute `${NAME}`; `written` maps each expanded string back to the text as written,
    so that messages show `${OPENAI_API_KEY}`, never its value."""
    written = {} if written is None else written
    if isinstance(node, dict):
        return {k: _expand_env(v, f"{path}.{k}" if path else str(k), problems, written) for k, v in node.items()}
    if isinstance(node, list):
        return [_expand_env(v, f"{path}[{i}]", problems, written) for i, v in enumerate(node)]
    if isinstance(node, str):

        def substitute(match: re.Match) -> str:
            name, default = match.group(1), match.group(2)
            value = os.environ.get(name, default)
            if value is None:
                problems.append(
                    f"{path}: environment variable ${{{name}}} is not set (set it, or write ${{{name}:-default}})"
                )
                return ""
            if secrets.looks_secret(name):
                secrets.remember(value, f"${{{name}}}")
            return value

        expanded = _ENV.sub(substitute, node)
        if expanded != node:
            written[expanded] = node
        return expanded
    return node


def _known_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """The keys accepted where `loc` (the path of an unknown key) points, walking nested models."""
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        nested = (
            [a for a in _flat_args(field.annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
            if field
            else []
        )
        if not nested:
            return []
        model = nested[0]
    return list(model.model_fields)


def _flat_args(annotation: Any) -> list[Any]:
    args = get_args(annotation)
    return [annotation] if not args else [a for arg in args for a in _flat_args(arg)]


def _describe(
    error: dict, prefix: str, model: type[BaseModel] | None = None, written: dict[str, str] | None = None
) -> str:
    loc = prefix + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error["loc"])
    loc = loc.lstrip(".") or "(top level)"
    message = error["msg"]
    if error["type"] == "extra_forbidden":
        key = str(error["loc"][-1])
        parts = error["loc"]
        beside_config = not prefix and len(parts) == 3 and parts[0] == "steps"
        if beside_config and not difflib.get_close_matches(key, list(StepSpec.model_fields), n=1, cutoff=0.6):
            return (
                f"{loc}: unknown key beside type/name/config; a step's settings, runtime keys such as batch_size "
                f"included, go inside its `config:` block (steps[{parts[1]}].config.{key})"
            )
        known = _known_keys(model, parts) if model is not None else []
        guess = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        if guess:
            return f"{loc}: unknown key; did you mean {guess[0]!r}?"
        if len(parts) == 1 and not prefix and key.lower() in KEY_SYNONYMS:
            return f"{loc}: unknown key; reelflow calls it {KEY_SYNONYMS[key.lower()]}"
        return f"{loc}: unknown key (check its spelling; see `reelflow steps` and the README's config reference)"
    if error["type"] == "missing":
        return f"{loc}: required key is missing"
    given = error.get("input")
    if isinstance(given, str) and written and given in written:
        as_written = written[given]  # `${VAR}`: the value is shown only when it is no secret
        shown = f" (got {as_written!r})" if secrets.redact(given) != given else f" (got {as_written!r} = {given!r})"
    else:
        shown = "" if isinstance(given, dict | list) or given is None else f" (got {given!r})"
    return f"{loc}: {message}{shown}"


def step_config_model(stage_cls: type) -> type[StageConfig]:
    """The stage's Config plus the runtime keys, as one model that refuses unknown keys."""
    return create_model(f"{stage_cls.__name__}StepConfig", __base__=(stage_cls.Config, StepRuntime))


def parse_config(text: str, source: str = "<config>") -> Config:
    problems: list[str] = []
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(source, [f"not valid YAML: {exc}"]) from None
    if not isinstance(raw, dict):
        raise ConfigError(
            source, [f"expected a mapping with a `steps:` list at the top level, got {type(raw).__name__}"]
        )
    written: dict[str, str] = {}
    raw = _expand_env(raw, "", problems, written)
    secrets.remember_environment()  # stages read some keys by default ($OPENAI_API_KEY)
    secrets.remember_config(raw)
    try:
        pipeline = PipelineFile.model_validate(raw)
    except ValidationError as exc:
        problems += [_describe(e, "", PipelineFile, written) for e in exc.errors()]
        pipeline = None
    steps: list[Step] = []
    defaults = pipeline.workers.step_defaults() if pipeline is not None else {}
    for index, spec in enumerate(raw.get("steps") or []):
        step = _validate_step(index, spec, raw, defaults, problems, written)
        if step:
            steps.append(step)
    if problems or pipeline is None:
        raise ConfigError(source, [secrets.redact(p) for p in _list_stages_once(problems)])
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    return Config(
        file=pipeline, steps=tuple(steps), source=Path(source) if source != "<config>" else None, digest=digest
    )


def _list_stages_once(problems: list[str]) -> list[str]:
    """Several unknown stages: each problem keeps its guess, the list of available stages comes once, last."""
    listing = [p for p in problems if AVAILABLE in p]
    if len(listing) < 2:
        return problems
    stages = listing[0].split(AVAILABLE, 1)[1]
    return [p.split(AVAILABLE, 1)[0] for p in problems] + [f"available stages: {stages}"]


def _validate_step(
    index: int, spec: Any, raw: dict, worker_defaults: dict, problems: list[str], written: dict[str, str]
) -> Step | None:
    where = f"steps[{index}]"
    if not isinstance(spec, dict) or "type" not in spec or "name" not in spec:
        return None  # the file-level validation has reported it
    try:
        cls = stage_class(str(spec["type"]), str(spec["name"]))
    except UnknownStage as exc:
        problems.append(f"{where}: {exc}")
        return None
    except ImportError as exc:
        problems.append(f"{where}: stage {spec['type']}/{spec['name']} cannot be imported: {exc}")
        return None
    settings = dict(spec.get("config") or {})
    _seed_device_key(settings, cls)
    # The pipeline-wide keys fill in what the step does not set itself.
    for key in ("text_key", "video_key", "image_key"):
        if key in raw and key not in settings and key in cls.Config.model_fields:
            settings[key] = raw[key]
    model = step_config_model(cls)
    try:
        config = model.model_validate(settings)
    except ValidationError as exc:
        problems.extend(_describe(e, f"{where}.config", model, written) for e in exc.errors())
        problems.extend(_missing_packages(where, spec, cls, model, settings))
        return None
    declared = cls.resources(config).prepares
    if declared != has_prepare(cls):  # the runtime runs `prepare` only where the stage declares it
        problems.append(
            f"{where}: {cls.__name__}.resources() says prepares={declared}, but the class "
            f"{'has no' if declared else 'defines'} prepare(); return Resources(..., prepares={not declared}) "
            "from resources() (the stage's own code, not the config, is wrong)"
        )
        return None
    own = config.workers.model_dump(exclude_unset=True) if config.workers else {}
    workers = WorkerSettings.model_validate({**worker_defaults, **own})
    if workers.backend == "ray" and config.devices:
        problems.append(
            f"{where}.config.devices: devices name this machine's GPUs, but the step's workers run on Ray "
            f"(got devices={config.devices}); remove devices and set workers.count / workers.num_gpus instead"
        )
        return None
    return Step(index=index, type=spec["type"], name=spec["name"], stage_cls=cls, config=config, workers=workers)


def _missing_packages(where: str, spec: dict, cls: type, model: type[StageConfig], settings: dict) -> list[str]:
    """The install lines preflight would print, for a step whose config failed: fixing a key
    first and only then learning of a missing package costs the user a second round."""
    try:
        needs = cls.requirements(model.model_construct(**settings))  # unvalidated: only its package list is read
    except Exception:  # a config too broken to say what it needs; its key errors are listed
        return []
    return [f"{where} ({spec['type']}/{spec['name']}): {line}" for line in needs.missing_packages(spec["name"])]


def _seed_device_key(settings: dict, cls: type) -> None:
    """DataFlow-Gen's configs say `device: cuda` (or `cuda:1`, `cpu`): read it as `devices`.

    Plain `cuda` means "on GPUs", which is already the default of GPU stages (one worker per
    visible GPU); a numbered device pins the step to it.
    """
    if "device" not in settings or "device" in cls.Config.model_fields:
        return
    device = settings.pop("device")
    if "devices" in settings or device in (None, "cuda", "gpu", "auto"):
        return
    settings["devices"] = device if isinstance(device, list) else [device]


def load_config(path: str | Path) -> Config:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise ConfigError(str(path), [f"cannot read the config file: {exc.strerror}"]) from None
    return parse_config(text, str(path))
