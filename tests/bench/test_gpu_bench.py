"""bench/gpu.py: `--smoke` runs the GPU check's own code on CPU with tiny models (every change),
the full-size configs build at their published sizes (on the meta device, no memory), and the
real run happens only where CUDA is (a `gpu` test, never in CI)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))
torch = pytest.importorskip("torch")


def run_bench(*args: str, timeout: float) -> dict:
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu.py"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={
            "PYTHONPATH": str(REPO),
            "PATH": "/usr/bin:/bin:" + str(Path(sys.executable).parent),
            "OMP_NUM_THREADS": "2",
        },
    )
    assert done.returncode == 0, f"bench/gpu.py {' '.join(args)} exited {done.returncode}:\n{done.stderr[-3000:]}"
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, f"expected one JSON line on stdout, got:\n{done.stdout}"
    return json.loads(lines[0])


def check_side(side: dict, videos: int, new_tokens: int) -> None:
    assert side["seconds"] > 0
    assert side["videos_per_s"] == pytest.approx(videos / side["seconds"], rel=0.01)
    assert side["tokens_per_s"] == pytest.approx(videos * new_tokens / side["seconds"], rel=0.01)


def test_smoke_prints_both_sides_and_the_generator():
    report = run_bench("--smoke", "--families", "qwen2_vl", "--steps", "1", timeout=300)
    assert report["smoke"] is True and report["device"] == "cpu"
    qwen = report["qwen2_vl"]
    assert qwen["videos"] == 4 and qwen["new_tokens"] == 8
    for side in ("loop", "engine"):
        check_side(qwen[side], 4, 8)
        assert qwen[side]["busy"] is None and qwen[side]["peak_bytes"] is None  # no NVML, no CUDA here
    assert qwen["ratio"] == pytest.approx(qwen["loop"]["seconds"] / qwen["engine"]["seconds"], rel=0.01)
    assert report["generator"]["steps"] == 1 and report["generator"]["seconds_per_step"] > 0


@pytest.mark.parametrize(("family", "billions"), [("qwen2_vl", 8.29), ("llava_onevision", 8.03)])
def test_full_size_folder_builds_the_published_model(family, billions, tmp_path):
    """The folder bench/gpu.py makes for the GPU run: real config, the tiny tokenizer's token ids."""
    import transformers
    from gpu import full_size_folder

    folder = full_size_folder(family, tmp_path / family)
    assert not list(folder.glob("*.safetensors"))
    config = transformers.AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = transformers.AutoModelForImageTextToText.from_config(config)
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(billions, abs=0.01)
    tokenizer = transformers.AutoProcessor.from_pretrained(folder).tokenizer
    video_token = config.video_token_id if family == "qwen2_vl" else config.video_token_index
    assert tokenizer.convert_ids_to_tokens(video_token) in ("<|video_pad|>", "<video>")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the full-size run)")
def test_full_size_run_on_the_gpu():
    report = run_bench("--repeat", "4", "--new-tokens", "32", "--steps", "2", timeout=600)
    for family in ("qwen2_vl", "llava_onevision"):
        assert report[family]["engine"]["peak_bytes"] > 15e9  # an 8B model in bf16 was resident
        check_side(report[family]["engine"], report[family]["videos"], 32)
