"""On a CUDA GPU: the transformers backend keeps each tiny captioner resident on the GPU in
bfloat16 and captions a batch like the CPU does. Skipped without a GPU (vLLM on GPU: test_vllm.py)."""

from __future__ import annotations

import pytest

from stages.base import StageError
from stages.registry import stage_class
from tests.stages.captioners.conftest import FAMILIES, TINY_CONFIG, record

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_transformers_backend_on_the_gpu(family, tiny_models, clips, broken_videos):
    cls = stage_class("VideoCaptioner", FAMILIES[family])
    config = cls.Config(**TINY_CONFIG, model_path=str(tiny_models[family]), backend="auto", prompt="Describe {title}.")
    stage = cls(config, "cuda:0")
    stage.load()
    try:
        if stage.backend_name == "vllm":
            pytest.skip("vLLM is installed: backend auto picks it (see test_vllm.py)")
        parameter = next(stage.lm.model.parameters())
        assert parameter.device.type == "cuda" and parameter.dtype == torch.bfloat16
        records = [record(clips[name], rid=name, title=name) for name in ("bikes", "bigbuckbunny", "moving_h264")]
        records.append(record(broken_videos["garbage"][0], rid="garbage", title="garbage"))
        results = stage.process([stage.prepare(r) for r in records[:3]] + records[3:])
        assert all(isinstance(r["text"], str) for r in results[:3]), results
        assert isinstance(results[3], StageError) and results[3].error_type == "VideoDecodeError"
        assert stage.take_usage()["tokens_out"] > 0
    finally:
        stage.close()
