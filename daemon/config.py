"""The YAML config: parse, expand `${ENV}`, validate the whole file, report every error at once.

The seed's keys keep their meaning (`meta_path`, `meta_folder`, `base_folder`, `save_folder`,
`image_key`, `text_key`, `video_key`, `steps: [{type, name, config}]`); the `daemon:` section
configures the long-running mode. Each step's `config:` block is validated by the stage's own
`Config` model combined with the runtime keys below, so one block holds both, as in the seed.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from daemon import secrets
from stages.base import StageConfig
from stages.registry import UnknownStage, stage_class

CLUSTER_KEYS = frozenset({"address", "namespace", "runtime_env"})
AVAILABLE = " Available: "  # how stages.registry.UnknownStage lists the known stages


class WorkerSettings(BaseModel):
    """Where a step's workers run: in the daemon's process (`local`) or as Ray actors (`ray`).

    The top-level `workers:` section sets the default for every step; a step's
    `config: {workers: {...}}` overrides single keys. The Ray keys do nothing with `local`.
    """

    model_config = ConfigDict(extra="forbid")

    backend: Literal["local", "ray"] = Field(
        "local",
        description='local: workers in this process; ray: each worker is a Ray actor (see the README\'s "Scale out on Ray").',
    )
    count: int | None = Field(
        None,
        ge=1,
        description="ray: actors for this step. Default: one per GPU of the cluster (one per tensor_parallel_size GPUs), times workers_per_device; 1 for CPU actors.",
    )
    num_gpus: float | None = Field(
        None,
        ge=0,
        description="ray: GPUs per actor. Default: tensor_parallel_size for a group; else the steps share each GPU (1/k each for k steps), as local workers share a device; 0 without GPUs or for API stages.",
    )
    num_cpus: float = Field(1.0, ge=0, description="ray: CPUs per actor (the scheduler's logical CPUs).")
    resources: dict[str, float] = Field(
        default_factory=dict, description='ray: custom resources per actor, e.g. {"a100": 1}.'
    )
    spread: bool = Field(False, description="ray: spread a step's actors over nodes (SPREAD scheduling).")
    calls_in_flight: int = Field(
        2, ge=1, le=8, description="ray: batches sent to one actor at once, so the RPC cost hides behind model time."
    )
    call_timeout_s: float = Field(
        600.0,
        gt=0,
        description="ray: a call (queueing behind the other call in flight included) running longer is hung: the actor is killed and restarted.",
    )
    start_timeout_s: float = Field(
        600.0,
        gt=0,
        description="ray: how long a new or restarted actor may take to be scheduled and load its model.",
    )
    max_restarts: int = Field(
        -1, ge=-1, description="ray: Ray restarts of one actor before it is replaced; -1: no limit."
    )
    max_replacements: int = Field(
        5,
        ge=0,
        description="ray: an actor dead for good is replaced by a new one, at most this many times in a row; then the daemon stops.",
    )
    replace_backoff_s: float = Field(
        1.0, gt=0, description="ray: wait before the first replacement; doubles after each failed one."
    )
    replace_backoff_max_s: float = Field(30.0, gt=0, description="ray: the longest wait between replacements.")

    @model_validator(mode="before")
    @classmethod
    def _cluster_keys_at_top(cls, data: Any) -> Any:
        if cls is WorkerSettings and isinstance(data, dict):
            misplaced = sorted(CLUSTER_KEYS & set(data))
            if misplaced:
                raise ValueError(
                    f"{', '.join(misplaced)} cannot be set per step: the daemon joins one Ray cluster; "
                    "set it in the top-level `workers:` section"
                )
        return data

    @model_validator(mode="after")
    def _whole_gpus_above_one(self):
        if self.num_gpus is not None and self.num_gpus > 1 and not float(self.num_gpus).is_integer():
            raise ValueError(
                f"num_gpus above 1 must be a whole number (got {self.num_gpus}); Ray shares a GPU only in fractions of one"
            )
        return self

    @model_validator(mode="after")
    def _ray_installed(self):
        if self.backend == "ray" and importlib.util.find_spec("ray") is None:
            raise ValueError("backend: ray needs the `ray` package; install it with: pip install 'reelflow[ray]'")
        return self


class WorkersSection(WorkerSettings):
    """The top-level `workers:` section: the defaults for every step, plus the cluster to join."""

    address: str = Field(
        "auto",
        description='ray: the cluster to join: "auto" (the one running on this node, or $RAY_ADDRESS), "host:port", "ray://host:10001", or "local" (start a private one-node cluster).',
    )
    namespace: str = Field(
        "reelflow", description="ray: the namespace of the actors (named reelflow:<step label>:<n>)."
    )
    runtime_env: dict[str, Any] | None = Field(
        None,
        description="ray: runtime_env for the daemon's job (e.g. env_vars, or py_modules when nodes lack reelflow).",
    )

    def step_defaults(self) -> dict[str, Any]:
        return self.model_dump(exclude_unset=True, exclude=set(CLUSTER_KEYS))


class StepRuntime(BaseModel):
    """Per-step keys the runtime reads from a step's `config:` block."""

    model_config = ConfigDict(extra="forbid")

    batch_size: int = Field(1, ge=1, description="Most records per model call.")
    devices: list[str] | None = Field(
        None, description='Devices to run workers on, e.g. ["cuda:0", "cuda:1"]; default: all GPUs, else ["cpu"].'
    )
    workers_per_device: int = Field(1, ge=1, description="Workers (resident stage copies) per device.")
    max_wait_ms: int = Field(50, ge=0, description="How long a worker waits to fill a batch before running it.")
    prep_workers: int = Field(
        2, ge=1, description="Threads running the stage's per-record `prepare` ahead of the model."
    )
    queue_size: int = Field(64, ge=1, description="Capacity of the step's input queue (backpressure bound).")
    speed_of_light_tokens_per_s: float | None = Field(
        None,
        gt=0,
        description="Output tokens/s of `vllm bench throughput` for this model and GPU; "
        "reelflow_efficiency_ratio{step} is the step's tokens/s over it.",
    )
    workers: WorkerSettings | None = Field(
        None, description="Overrides of the top-level `workers:` section for this step (backend, Ray actor settings)."
    )


RUNTIME_KEYS = frozenset(StepRuntime.model_fields)


class MetricsSection(BaseModel):
    model_config = ConfigDict(extra="forbid")
    host: str = Field("127.0.0.1", description="Address the metrics server binds (loopback by default).")
    port: int = Field(9464, ge=0, le=65535, description="Port of /metrics, /healthz, /readyz; 0 picks a free one.")


class WebDatasetOutput(BaseModel):
    """WebDataset tar shards built from the results as they are appended (daemon/io/sinks.py)."""

    model_config = ConfigDict(extra="forbid")
    format: Literal["webdataset"] = Field(description="webdataset: tar shards, one sample per result.")
    path: Path = Field(description="Folder for the shards; each job writes <path>/<job>/shard-000000.tar ...")
    shard_max_samples: int = Field(1000, ge=1, description="A shard is closed once it holds this many samples.")
    shard_max_bytes: int = Field(
        1 << 30, ge=1, description="... or once its members add up to this many bytes (default 1 GiB)."
    )
    fields: list[str] = Field(
        default_factory=lambda: ["video", "json", "txt"],
        description="What each sample holds: video (the clip file at video_key), json (the result line), "
        "txt (the text at text_key), or any result field (its file or files, else its value as json).",
    )
    bucket_by: list[Literal["resolution", "duration"]] = Field(
        default_factory=list, description="Separate shard series per bucket: resolution (short side), duration."
    )


class ParquetOutput(BaseModel):
    """Parquet files built from the results as they are appended (daemon/io/sinks.py)."""

    model_config = ConfigDict(extra="forbid")
    format: Literal["parquet"] = Field(description="parquet: the results as Parquet files, one schema for all.")
    path: Path = Field(description="Folder for the files; each job writes <path>/<job>/part-000000.parquet ...")
    rows_per_file: int = Field(10000, ge=1, description="Rows per Parquet file.")


class RemoteSection(BaseModel):
    """Remote media (http(s)://, s3:// in a row's video/image field): fetched only from allowed prefixes."""

    model_config = ConfigDict(extra="forbid")
    allow: list[str] = Field(
        default_factory=list,
        description="URL prefixes (or fnmatch globs) that may be fetched; empty: no URL is ever fetched.",
    )
    cache_dir: Path | None = Field(None, description="Where fetched files are kept; default <outbox>/.reelflow/remote.")
    cache_max_gb: float = Field(20.0, gt=0, description="Least recently used files are evicted past this size.")
    timeout_s: float = Field(30.0, gt=0, description="Connect and read timeout of one fetch.")
    retries: int = Field(3, ge=0, description="Retries (with backoff) on 5xx, 429, timeouts and broken connections.")
    max_in_flight: int = Field(8, ge=1, description="Fetches at once.")


class SourceSpec(BaseModel):
    """A remote prefix polled for new meta files, which are copied into the inbox (daemon/io/sources.py)."""

    model_config = ConfigDict(extra="forbid")
    url: str = Field(
        description="The prefix to list: s3://bucket/incoming/ or an http(s):// folder index (needs reelflow[remote])."
    )
    poll_s: float = Field(60.0, gt=0, description="List it this often (seconds).")
    pattern: str = Field("*", description="Only names matching this fnmatch pattern are taken.")


OutputSpec = Annotated[WebDatasetOutput | ParquetOutput, Field(discriminator="format")]


class DaemonSection(BaseModel):
    model_config = ConfigDict(extra="forbid")
    inbox: Path = Field(Path("inbox"), description="Folder watched for meta files and videos.")
    outbox: Path = Field(Path("outbox"), description="Folder where results, errors and media are written.")
    settle_ms: int = Field(2000, ge=0, description="A file is taken once its size and mtime are stable this long.")
    rescan_s: float = Field(30.0, gt=0, description="Full rescan of the inbox every this many seconds.")
    drain_timeout_s: float = Field(60.0, ge=0, description="On SIGTERM, how long in-flight work may finish.")
    ignore: list[str] = Field(
        default_factory=list,
        description='Extra file-name patterns the inbox ignores (fnmatch, e.g. "*.json"), besides .*, *.tmp, *.part, *.partial, *~.',
    )
    watch_config: bool = Field(
        True, description="Reload the config file when it changes (SIGHUP / `systemctl reload` always reloads)."
    )
    metrics: MetricsSection = Field(default_factory=MetricsSection)
    remote: RemoteSection = Field(default_factory=RemoteSection)
    sources: list[SourceSpec] = Field(
        default_factory=list, description="Remote prefixes polled for new meta files, taken into the inbox."
    )
    outputs: list[OutputSpec] = Field(
        default_factory=list,
        description="Shard sinks fed from the results (webdataset tars, parquet files); reelflow run honours them too.",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Logging level.")


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
