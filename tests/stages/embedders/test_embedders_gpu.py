"""On a CUDA GPU: CLIPEmbedder and AestheticFilter resident on the GPU (float16 with dtype auto)
give the CPU's vectors and scores to float16 precision. Skipped without a GPU."""

from __future__ import annotations

import numpy as np
import pytest

from tests.stages.embed_media import scene
from tests.stages.embedders.test_embedders import laion_head
from tests.tiny.clip import TINY_CLIP_DIM

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_gpu_vectors_and_scores_match_the_cpu(tmp_path, tiny_clip):
    from stages.embedders.clip import CLIPEmbedder, CLIPEmbedderConfig
    from stages.filters.aesthetic import AestheticFilter, AestheticFilterConfig

    records = [{"id": f"s{n}", "video": scene(tmp_path / f"s{n}.mp4", n), "text": "a scene"} for n in range(3)]
    head = tmp_path / "head.pth"
    torch.save(laion_head(TINY_CLIP_DIM), head)
    out = {}
    for device in ("cpu", "cuda:0"):
        embedder = CLIPEmbedder(CLIPEmbedderConfig(model_path=str(tiny_clip), num_frames=4), device)
        embedder.load()
        if device != "cpu":
            parameter = next(embedder.encoder.model.parameters())
            assert parameter.device.type == "cuda" and parameter.dtype == torch.float16
        embedded = embedder.process(records)
        scorer = AestheticFilter(AestheticFilterConfig(head_path=head, model_path=str(tiny_clip)), device)
        scorer.load()
        scores = scorer.process([{**r, **e} for r, e in zip(records, embedded, strict=True)])
        assert scorer.encoder is None  # reused the embedder's frames on the GPU too
        out[device] = (np.stack([e["embedding"] for e in embedded]), [s["aesthetic_score"] for s in scores])
    cpu, gpu = out["cpu"], out["cuda:0"]
    assert (np.sum(cpu[0] * gpu[0], axis=1) > 0.999).all()
    np.testing.assert_allclose(gpu[1], cpu[1], atol=0.05)
