"""What the child processes of a stage in the daemon's own process see of the GPUs.

A worker of `LocalHost` runs in the daemon's process, which sees every GPU; a stage that
starts a process on its device (a vLLM engine core) must show it only that device, and the
only way to tell a CUDA process which GPUs are its own is `CUDA_VISIBLE_DEVICES` at its start,
which it inherits from this process. So while such a child starts (`confine`), this module,
and nothing else in the daemon or the stages, sets the variable for the whole process, one
start at a time, and puts it back after. One start at a time also keeps two engines on one
GPU from profiling its memory at once (each would see the other's allocations).

Ray actors need none of this: Ray starts each actor's process with `CUDA_VISIBLE_DEVICES`
set to its own GPUs (daemon/hosts/ray/cluster.py keeps actors sharing a GPU from loading at
once), and their device is a plain name.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

from stages.base import Device

VARIABLE = "CUDA_VISIBLE_DEVICES"


def visible_devices(device: str, parent: str | None) -> str | None:
    """The mask a child on `device` gets, counted through this process's own mask `parent`:
    "cuda:1" -> "1", or "5" when this process runs with CUDA_VISIBLE_DEVICES=4,5; a group
    "cuda:0,cuda:1" (or "cuda:0,1") -> "0,1"; None for a device that is no GPU."""
    if not device.startswith("cuda"):
        return None
    indices = [part.strip().removeprefix("cuda").removeprefix(":") or "0" for part in device.split(",")]
    if parent is None or not parent.strip():
        return ",".join(indices)
    shown = [entry.strip() for entry in parent.split(",")]
    try:
        return ",".join(shown[int(index)] for index in indices)
    except (IndexError, ValueError):
        raise RuntimeError(
            f"device {device!r} is not among the GPUs this process sees ({VARIABLE}={parent}); "
            f"name one of cuda:0..cuda:{len(shown) - 1} in the step's devices"
        ) from None


class ChildDevices:
    """The one owner of this process's CUDA_VISIBLE_DEVICES while a stage's child starts."""

    _starting = threading.Lock()  # the variable is the process's: one child starts at a time

    @classmethod
    @contextlib.contextmanager
    def confine(cls, device: str) -> Iterator[None]:
        with cls._starting:
            previous = os.environ.get(VARIABLE)
            mask = visible_devices(device, previous)
            if mask is None:
                yield
                return
            os.environ[VARIABLE] = mask
            try:
                yield
            finally:
                if previous is None:
                    os.environ.pop(VARIABLE, None)
                else:
                    os.environ[VARIABLE] = previous


def local_device(name: str) -> Device:
    """A worker's device in the daemon's process, under `ChildDevices`' rule."""
    return Device(name, ChildDevices.confine)
