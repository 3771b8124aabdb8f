"""Media names are injective: two different ids never share a file or a folder, and an id that is
already a safe name keeps it (outputs of ordinary ids do not move)."""

from __future__ import annotations

import json

import pytest

from daemon.config import parse_config
from daemon.io.outbox import OutboxLayout
from daemon.metrics import Metrics
from daemon.runtime.engine import Engine, JobInput
from stages.base import JOB, MEDIA_DIR, RECORD_ID, media_path, safe_file_stem
from tests.harness import read_jsonl
from tests.media import encode

pytestmark = pytest.mark.timeout(120)

LONG_A = "a" * 200 + "-first" + "z" * 94
LONG_B = "a" * 200 + "-other" + "z" * 94
ODD_IDS = ["cam/1", "cam:1", "cam_1", "x", "_x_", ".x.", ".", "..", "", "é", LONG_A, LONG_B, "a" * 200, "a" * 201]


def test_distinct_ids_get_distinct_stems():
    stems = [safe_file_stem(i) for i in ODD_IDS]
    assert len(set(stems)) == len(ODD_IDS), dict(zip(ODD_IDS, stems, strict=True))


@pytest.mark.parametrize("plain", ["x", "cam_1", "clip-0007", "a.b", "Video.2024-01-01", "a" * 200])
def test_an_id_that_is_already_a_safe_name_keeps_it(plain):
    assert safe_file_stem(plain) == plain


@pytest.mark.parametrize("odd", ["cam/1", ".", "..", "", ".hidden", "a b", "a" * 201, "x\x00y", "../../etc"])
def test_other_ids_are_safe_readable_and_hashed(odd):
    stem = safe_file_stem(odd)
    assert "/" not in stem and "\x00" not in stem and not stem.startswith(".") and stem not in (".", "..")
    readable, _, digest = stem.rpartition("~")
    assert len(digest) == 16 and readable and len(stem.encode()) <= 200
    assert safe_file_stem(odd) == stem  # stable: a rerun finds the same file


def test_media_path_keeps_ids_apart(tmp_path):
    paths = {media_path({RECORD_ID: i, JOB: "j", MEDIA_DIR: tmp_path}, "png") for i in ODD_IDS}
    assert len(paths) == len(ODD_IDS)
    assert all(p.parent == tmp_path for p in paths)
    assert media_path({RECORD_ID: "x", JOB: "j", MEDIA_DIR: tmp_path}, "png") == tmp_path / "x.png"


async def test_frame_sampler_writes_each_id_into_its_own_folder(tmp_path):
    """Each id gets a video of its own size; every record's frames must show its own video."""
    ids = ["cam/1", "cam:1", "x", "_x_", ".x.", ".", "..", LONG_A, LONG_B]
    (tmp_path / "v").mkdir()
    rows, sizes = [], {}
    for n, record_id in enumerate(ids):
        size = (32 + 16 * n, 32)
        encode(tmp_path / "v" / f"{n}.mp4", frames=6, size=size, fps=6)
        rows.append({"id": record_id, "video": f"v/{n}.mp4"})
        sizes[record_id] = size
    meta = tmp_path / "m.jsonl"
    meta.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = parse_config("steps:\n  - {type: VideoProcessor, name: FrameSampler, config: {num_frames: 2}}\n")
    engine = Engine(config, OutboxLayout.daemon(tmp_path / "out"), Metrics())
    await engine.start()
    try:
        run = await engine.run_job(JobInput("m", meta, "jsonl", "m.jsonl", tmp_path))
    finally:
        await engine.stop()
    assert (run.ok, run.errors) == (len(ids), 0), read_jsonl(tmp_path / "out" / "m.errors.jsonl")
    from PIL import Image

    folders = {}
    for result in read_jsonl(tmp_path / "out" / "m.jsonl"):
        frames = [tmp_path / "out" / f for f in result["frames"]]
        assert len(frames) == 2
        folder = frames[0].parent
        assert folder.parent == tmp_path / "out" / "media" / "m", folder
        folders[result["id"]] = folder
        for frame in frames:
            with Image.open(frame) as image:
                assert image.size == sizes[result["id"]], (result["id"], frame)
    assert len(set(folders.values())) == len(ids)
    assert folders["x"].name == "x"  # an ordinary id keeps its plain folder
