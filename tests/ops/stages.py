"""A test-only stage with a "model" to reload, registered through `REELFLOW_EXTRA_STAGES`.

`Tagger` stands in for a model stage: `load` reads `model_path` (a small text file: its
content is the model's name; a missing file fails like a bad checkpoint), `model_path` is
one of `StageConfig.heavy_keys`, and `suffix` is a light setting (like a prompt). Each
output says which model and which settings made it, so a test can check every result
against the config it claims (`_config_hash`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from pydantic import Field

from stages.base import Stage, StageConfig, StageError

# Tagger2 is the same class under a second name: a step graph with two distinct stages.
EXTRA_STAGES = (
    "Test.Tagger=tests.ops.stages:Tagger,Test.Tagger2=tests.ops.stages:Tagger,Test.GpuBlob=tests.ops.stages:GpuBlob"
)
ENV = {"REELFLOW_EXTRA_STAGES": EXTRA_STAGES}


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
