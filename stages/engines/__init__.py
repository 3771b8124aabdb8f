"""Model back ends shared by the stage families (vLLM engine thread, HF vision and causal LMs),
and the small things every back end agrees on: the answer type, the dtype rule, the backend choice.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

log = logging.getLogger(__name__)

# transformers' sampling draws from torch's global generator (generate takes no Generator), which
# every model on a device shares: one lock per device makes a sampled batch the generator's only
# user, and a seeded one runs on a forked, seeded state, so seeded answers are reproducible when
# workers share a process. Process-wide on purpose: the generator it guards is process-wide too.
_SAMPLING_LOCKS: dict[str, threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()


@contextmanager
def sampling_rng(device: str, seed: int | None) -> Iterator[None]:
    """Run one `generate` as the only user of torch's generator on `device`, seeded when `seed` is set,
    leaving the global generator as it was (so one seeded step never fixes another's samples)."""
    import torch

    with _LOCKS_GUARD:
        lock = _SAMPLING_LOCKS.setdefault(device, threading.Lock())
    cuda = [torch.device(device).index or 0] if device.startswith("cuda") else []
    with lock, torch.random.fork_rng(devices=cuda, enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        yield


@dataclass
class Generation:
    """One request's answer: `texts` holds n samples (one unless the request asked for more)."""

    texts: list[str]
    tokens_in: int
    tokens_out: int

    @property
    def text(self) -> str:
        return self.texts[0]


def choose_backend(wanted: str, device: str, stage: str) -> str:
    """`auto`: vLLM when it is importable and the device is a GPU, else transformers (logged)."""
    if wanted != "auto":
        return wanted
    has_vllm = importlib.util.find_spec("vllm") is not None
    chosen = "vllm" if device.startswith("cuda") and has_vllm else "transformers"
    log.info(
        "%s: backend auto -> %s (device %s, vllm %s)",
        stage,
        chosen,
        device,
        "installed" if has_vllm else "not installed",
    )
    return chosen


def torch_dtype(name: str, device: str, recommended: str = "bfloat16"):
    """The torch dtype for a config's `dtype`: `auto` is `recommended` on a GPU (float16 where the GPU
    has no bfloat16) and float32 on the CPU; any other name is taken as it is."""
    import torch

    if name != "auto":
        return getattr(torch, name)
    if not device.startswith("cuda"):
        return torch.float32
    if recommended == "bfloat16" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        return torch.float16
    return getattr(torch, recommended)
