"""Stages used only by the tests and benchmarks, registered through `REELFLOW_EXTRA_STAGES`.

`Echo` is one configurable stage: it copies a field (or the id) to its output and can be
told to sleep, fail, raise, run out of memory, return the wrong number of results or count
usage, so the runtime's handling of each case can be checked through the real daemon.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

from pydantic import Field

from stages.base import FieldKind, Resources, Stage, StageConfig, StageError

EXTRA_STAGES = ",".join(f"Test.{name}=tests.stages_for_tests:{name}" for name in ("Echo", "Spin", "Accel"))
ENV = {"REELFLOW_EXTRA_STAGES": EXTRA_STAGES}


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
