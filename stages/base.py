"""The Stage interface: the only contract between the runtime (`daemon/`) and the transforms.

A stage is resident for the daemon's life: one instance per worker, `load` once, then
`process` batch after batch. It knows nothing about queues, files or metrics.

What a stage sees for each record is a plain dict: the row's fields (with the configured
`video_key`/`image_key` paths already resolved to absolute `pathlib.Path`s under the
allowed roots), the outputs of earlier steps, and three reserved keys the runtime adds:

- `"id"`: the record id (str),
- `"_job"`: the job name (str),
- `"_media_dir"`: the `Path` of the folder where this job's generated files belong
  (created on demand by `media_path`),
- `"_outbox_dir"`: the `Path` of the folder holding the jobs' output files (results,
  `<job>.embeddings.parquet`), where the runtime knows it.

`process` returns, for each input, a dict of *new fields* to merge into the record (e.g.
`{"text": "a caption"}`), a `StageError`, a `Filtered` (the record is dropped on purpose),
or a list of dicts: the record fans out into children (clips of a video), each a dict of
the child's own new fields on top of its parent's. A `Path` value in an output is written to
the results relative to the outbox, so stages return absolute `Path`s for the files they
make. An `Embedding` value (a vector) travels with the record to later steps, but the outbox
stores it in `<job>.embeddings.parquet` and the result line holds `<key>_index`, its row
there; an `InFlight` value is for later steps only and is never written.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import re
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

RECORD_ID = "id"
JOB = "_job"
MEDIA_DIR = "_media_dir"
OUTBOX_DIR = "_outbox_dir"
EMBEDDINGS_SUFFIX = ".embeddings.parquet"  # <job>.embeddings.parquet: a folder of parquet parts


@dataclass(frozen=True)
class InFlight:
    """A value for later steps only (e.g. per-frame embeddings a later filter reuses): it travels
    with the record between steps; no result, filtered or intermediate line ever holds it."""

    value: Any


# Loading models is not thread-safe: transformers' and diffusers' lazy modules fail ("cannot
# import name 'CLIPTextModel'") when several threads resolve them at once, and accelerate's
# init_empty_weights patches torch.nn.Module process-wide (a model built meanwhile in another
# thread gets meta tensors its weights are never copied into). So a process loads one stage at a
# time: the runtime holds this lock around every `load`; it is reentrant, so a stage may hold it
# again around its own lazy class lookups. The one model-loading lock of the process.
MODEL_LOADING = threading.RLock()

# What a stage needs from the input row, by kind; the reader checks these on the first
# step and resolves the path kinds against the allowed roots.
FieldKind = Literal["video", "image", "text"]


class StageError(Exception):
    """A record-level failure: returned in a record's slot (or raised by `prepare`).

    `error_type` names the failure in the errors file (defaults to the class name);
    the message says what was expected, what came and how to fix it.
    """

    def __init__(self, message: str, error_type: str | None = None, errno: int | None = None):
        super().__init__(message)
        self.message = message
        self.error_type = error_type or type(self).__name__
        # An OSError's number, kept so the runtime can tell a full disk (it waits) from a bad file.
        self.errno = errno

    @classmethod
    def from_exception(cls, exc: BaseException) -> StageError:
        if isinstance(exc, StageError):
            return exc
        return cls(str(exc) or repr(exc), type(exc).__name__, exc.errno if isinstance(exc, OSError) else None)

    def __repr__(self) -> str:
        return f"StageError({self.error_type}: {self.message})"


class Filtered:
    """Returned in a record's slot to drop it on purpose (too still, too short, a duplicate).

    The record goes to `outbox/<job>.filtered.jsonl` with `reason` (what was measured, the
    value and the limit) and `scores` (the measurements, so a threshold can be revisited).
    """

    __slots__ = ("reason", "scores")

    def __init__(self, reason: str, scores: dict[str, Any] | None = None):
        self.reason = reason
        self.scores = dict(scores or {})

    def __repr__(self) -> str:
        return f"Filtered({self.reason!r}, {self.scores!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Filtered) and (self.reason, self.scores) == (other.reason, other.scores)


class StageConfig(BaseModel):
    """Base of every stage's `config:` block. Unknown keys are refused.

    The pipeline-wide keys (`text_key`, `video_key`, `image_key`) are filled in from the
    top level of the YAML file unless a step sets its own.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    text_key: str = Field("text", description="Record field holding text (captions, prompts).")
    video_key: str = Field("video", description="Record field holding a video path.")
    image_key: str = Field("image", description="Record field holding an image path.")

    # Keys whose change needs the model reloaded (used by hot reload); everything else
    # applies in place because stages read `self.config` on every call.
    heavy_keys: ClassVar[frozenset[str]] = frozenset(
        {"model_path", "dtype", "tensor_parallel_size", "backend", "trust_remote_code", "devices", "workers"}
    )

    def input_fields(self) -> dict[str, FieldKind]:
        """Fields this stage needs in its input records, by kind. Default: none."""
        return {}


@dataclass(frozen=True)
class Resources:
    """What one worker of a stage needs, as the stage declares it for a given config.

    The runtime (local placement, Ray placement, batching) reads this and nothing else of a
    stage's config: it never guesses settings by attribute name.
    """

    accelerators: int = 0  # GPUs per worker (a tensor-parallel group takes several); 0 = CPU only
    concurrency_slots: int = 1  # records in flight at once per worker (an API's max_num_seqs)
    asynchronous: bool = False  # the worker awaits `aprocess` (else `process` runs in a thread)
    prepares: bool = False  # the stage has a per-record `prepare` run ahead of the model (config-checked)


@dataclass(frozen=True)
class Requirements:
    """What a stage's `load` needs beyond the base install, as the stage declares it for a config:
    the packages it imports, each with the `reelflow[extra]` that brings it, and the checkpoints
    it loads (a setting's name, e.g. `model_path` or `judge.model`, and its value: a local folder
    or a hub id). Start-up's preflight checks both before any port is bound or weight loaded;
    it reads nothing else of a stage's config."""

    packages: tuple[tuple[str, str], ...] = ()  # (importable module, extra that installs it)
    checkpoints: tuple[tuple[str, str], ...] = ()  # (setting, folder or hub id)
    weight_files: tuple[tuple[str, str], ...] = ()  # (setting, path of a single weights file)

    @classmethod
    def of(cls, extra: str, *modules: str, **checkpoints: str | None) -> Requirements:
        """`of("captioners", "torch", "transformers", model_path=config.model_path)`; empty values are left out."""
        found = tuple((key, value) for key, value in checkpoints.items() if isinstance(value, str) and value)
        return cls(tuple((module, extra) for module in modules), found)

    def __or__(self, other: Requirements) -> Requirements:
        packages = self.packages + tuple(p for p in other.packages if p not in self.packages)
        return Requirements(packages, self.checkpoints + other.checkpoints, self.weight_files + other.weight_files)

    def missing_packages(self, stage: str) -> list[str]:
        """One line per extra whose packages do not import here (checked with find_spec, nothing imported)."""
        by_extra: dict[str, list[str]] = {}
        for module, extra in self.packages:
            if importlib.util.find_spec(module) is None:
                by_extra.setdefault(extra, []).append(module)
        return [
            f"{stage} needs the {', '.join(f'`{m}`' for m in missing)} package{'s' if len(missing) > 1 else ''}, "
            f"not installed here; install with: pip install 'reelflow[{extra}]'"
            for extra, missing in by_extra.items()
        ]

    def nested(self, prefix: str) -> Requirements:
        """The same, with each checkpoint setting named under `prefix` (a nested config block)."""
        named = lambda pairs: tuple((f"{prefix}.{key}", value) for key, value in pairs)  # noqa: E731
        return Requirements(self.packages, named(self.checkpoints), named(self.weight_files))


class Device(str):
    """A worker's device ("cpu", "cuda:1", a group "cuda:0,cuda:1") as the host that started
    the worker named it, with that host's rule for the processes a stage starts on it.

    A stage that starts a child process using its device (a vLLM engine core) does so inside
    `spawning(device)`; what the child is shown is the host's business: the daemon's own
    process shows it only this device's GPUs (daemon/hosts/devices.py), a Ray actor's process
    is already confined by Ray, so a plain string there changes nothing.
    """

    confine: Callable[[str], contextlib.AbstractContextManager[None]] | None

    def __new__(cls, name: str, confine: Callable[[str], contextlib.AbstractContextManager[None]] | None = None):
        device = super().__new__(cls, name)
        device.confine = confine
        return device

    def __reduce__(self):  # the rule belongs to this process's host: elsewhere it is a plain name
        return (str, (str(self),))

    def on(self, name: str) -> Device:
        """Another device under the same host's rule (a step that pins `device: cuda:N`)."""
        return Device(name, self.confine)


def spawning(device: str) -> contextlib.AbstractContextManager[None]:
    """Enter while starting a child process that uses `device`: see `Device`."""
    confine = getattr(device, "confine", None)
    return confine(str(device)) if confine is not None else contextlib.nullcontext()


class Stage:
    """One resident transform. Subclasses set `Config` and implement `load`/`process`.

    Optional hooks:
    - `prepare(record) -> dict`: per-record CPU work (decode frames, load an image). The
      runtime runs it in a thread pool ahead of the model call; `process` then gets the
      prepared dicts. Raise `StageError` (or any exception) for a bad record.
    - `async aprocess(batch)`: for natively async stages (an HTTP API, vLLM's AsyncLLM);
      the runtime awaits it instead of running `process` in a thread.

    Stages count what they produce in `self.usage` (e.g. `usage["generated_frames"] += 16`,
    `usage["tokens_out"] += n`); the runtime turns it into metrics after each batch.
    """

    Config: ClassVar[type[StageConfig]] = StageConfig
    # The step types (and extra names) a config may name this class by: "Type" registers it under
    # its own class name, "Type/Name" under another. Read from the source by stages/registry.py,
    # so it must be a literal in the class body.
    registered_as: ClassVar[tuple[str, ...]] = ()
    # True for stages that put a model on an accelerator: by default they get one worker per
    # visible GPU; the others run on the CPU unless the step names `devices`. The default
    # `resources` reads it; a stage whose need depends on its config overrides `resources`.
    accelerated: ClassVar[bool] = False

    def __init__(self, config: StageConfig, device: str = "cpu"):
        self.config = config
        self.device = device
        self.usage: Counter[str] = Counter()

    @classmethod
    def resources(cls, config: StageConfig) -> Resources:
        """What one worker needs with this config; stages whose needs depend on a key override it."""
        return Resources(
            accelerators=1 if cls.accelerated else 0,
            asynchronous=callable(getattr(cls, "aprocess", None)),
            prepares=callable(getattr(cls, "prepare", None)),
        )

    def loaded_resources(self) -> Resources:
        """What this instance needs now that it is loaded: `resources(self.config)`, unless the
        stage chose its backend at load (`backend: auto` picks vLLM or transformers by device)."""
        return type(self).resources(self.config)

    @classmethod
    def requirements(cls, config: StageConfig) -> Requirements:
        """Packages and checkpoints `load` needs with this config (default: none beyond the base)."""
        return Requirements()

    @classmethod
    def out_of_memory_advice(cls, config: StageConfig) -> str:
        """What to change when even one record does not fit (the worker's error message says it)."""
        return "lower the settings that size one record's work, or use a larger device"

    def load(self) -> None:
        """Load weights once; may be slow. Called in a worker thread."""

    def process(self, batch: list[dict[str, Any]]) -> list[dict[str, Any] | StageError]:
        """Same length and order as `batch`; a bad record gets a `StageError` in its slot."""
        raise NotImplementedError(f"{type(self).__name__} implements neither process nor aprocess")

    def close(self) -> None:
        """Free the model. Called once when the worker stops."""

    def take_usage(self) -> Counter[str]:
        used, self.usage = self.usage, Counter()
        return used


def has_prepare(stage: Stage | type[Stage]) -> bool:
    """Whether the stage (or its class) defines `prepare`: what its `resources().prepares` must say."""
    return callable(getattr(stage, "prepare", None))


def is_async(stage: Stage) -> bool:
    """Whether the runtime awaits this instance's `aprocess`: what its loaded resources say (a
    GPTTextGenerator on transformers is sync even though the class has `aprocess`)."""
    if getattr(stage, "config", None) is not None:
        return stage.loaded_resources().asynchronous
    return callable(getattr(stage, "aprocess", None))  # not initialised (a bare __new__): the class


_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")
STEM_CHARS = 200  # longest plain stem; with the hash and an extension a name stays under 255 bytes
READABLE_CHARS = 100  # the readable part of a hashed stem
HASH_MARK = "~"  # never in a plain stem, so a hashed stem can never equal one


def safe_file_stem(text: str) -> str:
    """A file (or folder) name made from a record id or template, injective over ids.

    An id that is already a safe name (letters, digits, `.`, `_`, `-`; not starting or ending
    with `.` or `_`; at most 200 characters) is its own stem, so ordinary ids keep their plain
    names. Any other id gets a readable stem plus `~` and 16 hex digits of the SHA-256 of the
    exact id: `cam/1` -> `cam_1~<hash>`, while `cam_1` stays `cam_1`. Two ids share a stem only
    on a 64-bit hash collision.
    """
    stem = _UNSAFE_NAME.sub("_", text).strip("._")
    if stem == text and 0 < len(stem) <= STEM_CHARS:
        return stem
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return f"{stem[:READABLE_CHARS] or 'record'}{HASH_MARK}{digest}"


def media_path(record: dict[str, Any], extension: str, template: str | None = None) -> Path:
    """Where a stage writes a generated file for this record: `<media_dir>/<id>.<ext>`.

    `template` may use `{id}`, `{job}` and any record field, e.g. `"{id}_{seed}"`.
    """
    stem = template.format_map({**record, "job": record[JOB]}) if template else str(record[RECORD_ID])
    folder = Path(record[MEDIA_DIR])
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{safe_file_stem(stem)}.{extension.lstrip('.')}"


def missing_field(where: str, key: str, record: dict[str, Any], *, why: str = "", fix: str = "") -> StageError:
    """The MissingField error for a record without `key`, naming the fields it has."""
    fields = sorted(k for k in record if not k.startswith("_"))
    return StageError(
        f"{where}: {why}the record has no field {key!r} (fields: {fields}){'; ' + fix if fix else ''}",
        error_type="MissingField",
    )


def format_prompt(template: str, record: dict[str, Any], *, where: str) -> str:
    """Fill `{field}` placeholders from the record; a missing field is a StageError."""
    try:
        return template.format_map(record)
    except KeyError as missing:
        key = missing.args[0]
        raise missing_field(where, key, record, why=f"the prompt template uses {{{key}}} but ") from None
    except (ValueError, IndexError) as bad:
        raise StageError(f"{where}: the prompt template is malformed: {bad}", error_type="BadTemplate") from None


def require(module: str, *, stage: str, extra: str):
    """Import an optional dependency, or say how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as missing:
        raise ImportError(
            f"`{stage}` needs the `{module}` package ({missing}); install it with: pip install 'reelflow[{extra}]'"
        ) from missing
