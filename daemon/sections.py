"""The models of the config file's sections: `workers:` (where workers run, and the Ray
cluster to join), a step's runtime keys (`StepRuntime`, beside the stage's own keys in its
`config:` block), and `daemon:` (inbox, outbox, metrics, remote media, sources, shard outputs).

Each model refuses unknown keys and describes every setting; daemon/config.py parses the
file, combines them with each stage's `Config` and reports every problem at once.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

CLUSTER_KEYS = frozenset({"address", "namespace", "runtime_env"})


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
