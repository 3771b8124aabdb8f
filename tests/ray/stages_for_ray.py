"""A test-only stage for the Ray tests and the scale benchmark, registered through
`REELFLOW_EXTRA_STAGES` (see `EXTRA_STAGES`).

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

import os
import subprocess
import sys
import time
from typing import Any

from pydantic import Field

from stages.base import Stage, StageConfig, StageError, spawning

EXTRA_STAGES = "Test.Crashy=tests.ray.stages_for_ray:Crashy,Test.Preparing=tests.ray.stages_for_ray:Preparing"


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
        return {**record, "prepared_in": os.getpid()}

    def process(self, batch: list[dict[str, Any]]) -> list[dict[str, Any] | StageError]:
        out = super().process(batch)
        assert all("prepared_in" in record for record in batch)
        return out[:-1] if any(record.get("action") == "drop_one" for record in batch) else out
