"""On a CUDA GPU: the nine run in their recommended half precision, cpu_offload works, and the
same record and seed give identical frames (noise is drawn on the CPU, so also the same noise
as on the CPU). Skipped without a GPU."""

from __future__ import annotations

import numpy as np
import pytest

from stages.registry import stage_class
from tests.stages.generators.conftest import IMAGE_TO_VIDEO, TINY, make_record, read_png, read_video, stage_config

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _run(name, tiny_models, tmp_path, cond_image, **overrides):
    step_type, config = stage_config(name, tiny_models, **overrides)
    cls = stage_class(step_type, name)
    stage = cls(cls.Config(**config), "cuda:0")
    stage.load()
    image = cond_image if name in IMAGE_TO_VIDEO else None
    results = stage.process([make_record("g1", tmp_path, image), make_record("g2", tmp_path, image)])
    key = next(iter(results[0]))
    read = read_png if results[0][key].suffix == ".png" else (lambda p: read_video(p)[0])
    return stage, [read(result[key]) for result in results]


@pytest.mark.parametrize("name", list(TINY))
def test_runs_on_the_gpu_in_half_precision(name, tiny_models, tmp_path, cond_image):
    stage, outputs = _run(name, tiny_models, tmp_path / "a", cond_image)
    assert stage.pipe.device.type == "cuda"
    assert next(
        stage.pipe.transformer.parameters() if hasattr(stage.pipe, "transformer") else stage.pipe.unet.parameters()
    ).dtype in (torch.float16, torch.bfloat16)
    again = _run(name, tiny_models, tmp_path / "b", cond_image)[1]
    for first, second in zip(outputs, again, strict=True):
        assert np.array_equal(first, second)


@pytest.mark.parametrize("name", ["FLUXGenerator", "SVDGenerator", "CogVideoXT2VGenerator"])
def test_cpu_offload_on_the_gpu(name, tiny_models, tmp_path, cond_image):
    _, outputs = _run(name, tiny_models, tmp_path, cond_image, cpu_offload=True)
    assert len(outputs) == 2
