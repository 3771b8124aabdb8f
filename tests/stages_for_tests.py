"""Every stage used only by the tests and benchmarks, registered through `REELFLOW_EXTRA_STAGES`
(this module must stay importable without pytest: daemons and Ray workers import it by name).

Three sets, each with the `REELFLOW_EXTRA_STAGES` value that registers it: `EXTRA_STAGES`
(`ENV`) for the runtime's tests, `RELOAD_STAGES` (`RELOAD_ENV`) for the reload and operations
tests, `RAY_STAGES` for the Ray tests and the scale benchmark.

`Echo` is one configurable stage: it copies a field (or the id) to its output and can be
told to sleep, fail, raise, run out of memory, return the wrong number of results or count
usage, so the runtime's handling of each case can be checked through the real daemon.

`Tagger` stands in for a model stage: `load` reads `model_path` (a small text file: its
content is the model's name; a missing file fails like a bad checkpoint), `model_path` is
one of `StageConfig.heavy_keys`, and `suffix` is a light setting (like a prompt). Each
output says which model and which settings made it, so a test can check every result
against the config it claims (`_config_hash`).

`Crashy` answers each record with the pid of the process that ran it, after `sleep_s` of
sleep or `spin` iterations of pure-Python work; a record whose `action` field is `exit`
kills the worker process (`os._exit`), one whose `action` is `hang` never returns, and one
whose `action` is `fail` raises (a stage error, not a crash). `load` fails while the file
`fail_load_if` exists (to make actor replacements fail). With `spawn_child`, each record
also starts a child process on the stage's device, as a vLLM engine core is started, and
reports the `CUDA_VISIBLE_DEVICES` the child saw beside the actor's own.

`Preparing` is Crashy with a per-record `prepare` (run in the actor's thread pool): a record
whose `action` is `bad_prepare` raises there, and a batch holding one whose `action` is
`drop_one` is answered one slot short.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import Field

from stages.base import FieldKind, Resources, Stage, StageConfig, StageError, spawning

MODULE = "tests.stages_for_tests"


def _registered(*names: str) -> str:
    """`Test.<name>=tests.stages_for_tests:<class>` for each name; `Alias=Class` names a class twice."""
    pairs = [name.partition("=")[::2] for name in names]
    return ",".join(f"Test.{name}={MODULE}:{cls or name}" for name, cls in pairs)


EXTRA_STAGES = _registered("Echo", "Spin", "Accel")
ENV = {"REELFLOW_EXTRA_STAGES": EXTRA_STAGES}
# Tagger2 is the same class under a second name: a step graph with two distinct stages.
RELOAD_STAGES = _registered("Tagger", "Tagger2=Tagger", "GpuBlob")
RELOAD_ENV = {"REELFLOW_EXTRA_STAGES": RELOAD_STAGES}
RAY_STAGES = _registered("Crashy", "Preparing")


class OutOfMemoryError(RuntimeError):
    """Named like torch.cuda.OutOfMemoryError, which the runtime recognises by name."""


class EchoConfig(StageConfig):
    output_key: str = Field("echo", description="Field receiving the echoed value.")
    source: str = Field("id", description="Field copied into the output.")
    needs: dict[str, FieldKind] = Field(default_factory=dict, description="input_fields() of this stage.")
    sleep_s: float = Field(0.0, ge=0, description="Seconds slept per record in process.")
    prepare_sleep_s: float = Field(0.0, ge=0, description="Seconds slept per record in prepare.")
    fail_ids: list[str] = Field(default_factory=list, description="Ids answered with a StageError.")
    raise_ids: list[str] = Field(default_factory=list, description="A batch holding one of these ids raises.")
    prepare_fail_ids: list[str] = Field(default_factory=list, description="Ids whose prepare raises.")
    oom_above: int | None = Field(None, description="Batches larger than this raise OutOfMemoryError.")
    wrong_length: bool = Field(False, description="Return one result too many.")
    usage_per_record: dict[str, int] = Field(default_factory=dict, description="Added to usage per record.")
    batch_log: str | None = Field(None, description="Append each batch's ids (one line per batch) to this file.")

    def input_fields(self) -> dict[str, FieldKind]:
        return dict(self.needs)


class Echo(Stage):
    Config = EchoConfig

    def __init__(self, config: EchoConfig, device: str = "cpu"):
        super().__init__(config, device)
        self.batches: list[list[str]] = []
        self.loaded = self.closed = False

    def load(self) -> None:
        self.loaded = True

    def prepare(self, record: dict[str, Any]) -> dict[str, Any]:
        config = self.config
        if config.prepare_sleep_s:
            time.sleep(config.prepare_sleep_s)
        if str(record["id"]) in config.prepare_fail_ids:
            raise ValueError(f"prepare refused record {record['id']}")
        return record

    def process(self, batch: list[dict[str, Any]]) -> list[dict[str, Any] | StageError]:
        config = self.config
        ids = [str(r["id"]) for r in batch]
        self.batches.append(ids)
        if config.batch_log:
            with open(config.batch_log, "a", encoding="utf-8") as log:
                log.write(" ".join(ids) + "\n")
                log.flush()
                os.fsync(log.fileno())
        if config.oom_above is not None and len(batch) > config.oom_above:
            raise OutOfMemoryError(f"CUDA out of memory with a batch of {len(batch)}")
        if any(i in config.raise_ids for i in ids):
            raise RuntimeError(f"batch with a poisoned record ({sorted(set(ids) & set(config.raise_ids))})")
        out: list[dict[str, Any] | StageError] = []
        for record_id, record in zip(ids, batch, strict=True):
            if config.sleep_s:
                time.sleep(config.sleep_s)
            for key, amount in config.usage_per_record.items():
                self.usage[key] += amount
            if record_id in config.fail_ids:
                out.append(StageError(f"record {record_id} is refused by this stage", error_type="Refused"))
            else:
                value = record.get(config.source)
                out.append({config.output_key: str(value) if value is not None else None})
        if config.wrong_length:
            out.append({config.output_key: "extra"})
        return out

    def close(self) -> None:
        self.closed = True


class SpinConfig(StageConfig):
    work: int = Field(20000, ge=0, description="Loop iterations of pure-Python work per record.")


class Spin(Stage):
    """CPU-bound, no prepare: the benchmark's stage with real per-record work."""

    Config = SpinConfig

    def process(self, batch: list[dict[str, Any]]) -> list[dict[str, Any] | StageError]:
        out = []
        for record in batch:
            acc = 0
            for i in range(self.config.work):
                acc = (acc * 31 + i) & 0xFFFFFFFF
            out.append({"spin": acc ^ len(str(record["id"]))})
        return out


class AccelConfig(EchoConfig):
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per worker.")


class Accel(Echo):
    """Like Echo, but asks for accelerators (one worker per GPU, or per group of tensor_parallel_size)."""

    Config = AccelConfig
    accelerated = True

    @classmethod
    def resources(cls, config: AccelConfig) -> Resources:
        return dataclasses.replace(super().resources(config), accelerators=config.tensor_parallel_size)


class TaggerConfig(StageConfig):
    model_path: str = Field(description="Text file standing in for weights; its content names the model.")
    suffix: str = Field("", description="Appended to each output (a light setting, like a prompt).")
    output_key: str = Field("tag", description="Record field that receives the output.")
    sleep_s: float = Field(0.0, ge=0, description="Seconds slept per batch (a model call's duration).")
    load_s: float = Field(0.0, ge=0, description="Seconds slept in load (a model load's duration).")


class Tagger(Stage):
    Config = TaggerConfig

    def __init__(self, config: TaggerConfig, device: str = "cpu"):
        super().__init__(config, device)
        self.model: str | None = None

    def load(self) -> None:
        time.sleep(self.config.load_s)
        self.model = Path(self.config.model_path).read_text(encoding="utf-8").strip()

    def process(self, batch: list[dict[str, Any]]) -> list[dict[str, Any] | StageError]:
        config = self.config
        if self.model is None:
            raise RuntimeError("process called before load")
        time.sleep(config.sleep_s)
        return [{config.output_key: f"{self.model}{config.suffix}"} for _ in batch]

    def close(self) -> None:
        self.model = None


class GpuBlobConfig(StageConfig):
    model_path: str = Field(description="Any string; changing it reloads the stage (a heavy key).")
    size_mib: int = Field(1024, ge=1, description="GPU memory the 'model' holds once loaded.")


class GpuBlob(Stage):
    """Holds `size_mib` of GPU memory while loaded and reports the process's peak allocation so far:
    a heavy reload must unload a worker's model before it loads the new one."""

    Config = GpuBlobConfig
    accelerated = True

    def load(self) -> None:
        import torch

        self.blob = torch.empty(self.config.size_mib << 20, dtype=torch.uint8, device=self.device)

    def process(self, batch: list[dict[str, Any]]) -> list[dict[str, Any] | StageError]:
        import torch

        allocated = torch.cuda.max_memory_allocated(self.device) / 2**20  # the peak so far, loads included
        return [{"gpu_mib": allocated, "device": self.device, "model": self.config.model_path} for _ in batch]

    def close(self) -> None:
        import torch

        self.blob = None
        torch.cuda.empty_cache()


class CrashyConfig(StageConfig):
    sleep_s: float = Field(0.0, ge=0, description="Seconds slept per record.")
    spin: int = Field(0, ge=0, description="Iterations of pure-Python work per record.")
    fail_load_if: str | None = Field(None, description="load raises while this file exists.")
    tag: str = Field("", description="Copied into every output (to see which config a call ran with).")
    spawn_child: bool = Field(False, description="Start a child process per record and report its GPU mask.")


class Crashy(Stage):
    Config = CrashyConfig

    def load(self) -> None:
        if self.config.fail_load_if and os.path.exists(self.config.fail_load_if):
            raise RuntimeError(f"load refused: {self.config.fail_load_if} exists")

    def process(self, batch: list[dict[str, Any]]) -> list[dict[str, Any] | StageError]:
        actions = [record.get("action") for record in batch]
        if "exit" in actions:
            os._exit(17)
        if "hang" in actions:
            time.sleep(3600)
        if "fail" in actions:
            raise RuntimeError(f"a batch of {len(batch)} with a failing record")
        out: list[dict[str, Any] | StageError] = []
        for record in batch:
            if self.config.sleep_s:
                time.sleep(self.config.sleep_s)
            acc = 0
            for i in range(self.config.spin):
                acc = (acc * 31 + i) & 0xFFFFFFFF
            self.usage["requests"] += 1
            seen = self._child_mask() if self.config.spawn_child else {}
            out.append(
                {
                    **seen,
                    "pid": os.getpid(),
                    "device": self.device,
                    "acc": acc,
                    "echo": str(record["id"]),
                    "tag": self.config.tag,
                }
            )
        return out

    def _child_mask(self) -> dict[str, Any]:
        show = "import os; print(os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>'))"
        with spawning(self.device):
            child = subprocess.run([sys.executable, "-c", show], capture_output=True, text=True, check=True)
        return {"child_mask": child.stdout.strip(), "own_mask": os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>")}


class Preparing(Crashy):
    def prepare(self, record: dict[str, Any]) -> dict[str, Any]:
        if record.get("action") == "bad_prepare":
            raise ValueError(f"record {record['id']} cannot be prepared")
        if record.get("action") == "disk_full_once" and record["id"] not in vars(self).setdefault("_full", set()):
            self._full.add(record["id"])
            raise OSError(errno.ENOSPC, "No space left on device", f"/frames/{record['id']}")
        return {**record, "prepared_in": os.getpid()}

    def process(self, batch: list[dict[str, Any]]) -> list[dict[str, Any] | StageError]:
        out = super().process(batch)
        assert all("prepared_in" in record for record in batch)
        return out[:-1] if any(record.get("action") == "drop_one" for record in batch) else out
