"""The seed's GPTTextGenerator step (with base_url) through the real daemon and through
`reelflow run`, against the real server behind the fault proxy.

No captioner is on main yet, so the chain is VideoProbe -> GPTTextGenerator on rows that
carry a caption (`text`), which the text step rewrites into a generation prompt.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tests.harness import DaemonProcess, metric_value, read_jsonl, run_oneshot, sample_video, write_config
from tests.stages.conftest import SECRET
from tests.stages.text.fault_proxy import Fault

CAPTIONS = [
    "a rabbit wakes up under a tree",
    "birds fly over a green meadow",
    "a squirrel drops a nut",
    "the camera pans across the forest",
    "a butterfly lands on a flower",
    "the rabbit yawns and stretches",
]


def gpt_step(base_url: str, model: str) -> dict:
    """The seed's step shape, plus base_url (and short answers so the tiny CPU model is quick)."""
    return {
        "type": "TextGenerator",
        "name": "GPTTextGenerator",
        "config": {
            "model": model,
            "api_key": "${OPENAI_API_KEY}",
            "max_num_seqs": 3,
            "temperature": 0.7,
            "sys_prompt": "You rewrite video captions into prompts for a text-to-video model.",
            "prompt": "Rewrite this caption as a generation prompt:",
            "batch_size": 4,
            "base_url": base_url,
            "max_tokens": 6,
            "output_key": "gen_prompt",
            "backoff_s": 0.1,
            "timeout_s": 5,
        },
    }


def leaks(folder: Path) -> list[str]:
    """Files under `folder` that contain the key or a recognisable piece of it."""
    found = []
    for path in folder.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            if any(piece.encode() in data for piece in (SECRET, SECRET[:8], SECRET[-8:])):
                found.append(str(path))
    return found


def test_daemon_chain_retries_faults_and_never_writes_the_key(tmp_path, proxy, lm_server):
    media = tmp_path / "media_src"
    media.mkdir()
    shutil.copy(sample_video(), media / "bunny.mp4")
    rows = [{"id": f"r{i}", "video": "bunny.mp4", "text": caption} for i, caption in enumerate(CAPTIONS)]
    rows.append({"id": "missing", "video": "nowhere.mp4", "text": "a video that is not there"})
    meta = tmp_path / "clips.jsonl"
    meta.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = {
        "meta_folder": str(media),
        "text_key": "text",
        "video_key": "video",
        "steps": [
            {"type": "VideoProcessor", "name": "VideoProbe", "config": {"batch_size": 4}},
            gpt_step(proxy.url, lm_server.model),
        ],
        "daemon": {"inbox": "inbox", "outbox": "outbox", "settle_ms": 200, "metrics": {"port": 0}},
    }
    config_path = write_config(tmp_path, config)
    # 429 (Retry-After: 1), 500 and a dropped connection are retried; a hostile 401 that quotes
    # the Authorization header back is not, and ends its record in the errors file.
    proxy.plan(
        Fault.error(429, "rate limited", retry_after="1"), Fault.error(500, "boom"), Fault.drop(), Fault.echo_auth()
    )
    with DaemonProcess(config_path, env={"OPENAI_API_KEY": SECRET}) as daemon:
        daemon.drop(meta)
        state = daemon.wait_for_job("clips", timeout=120)
        metrics = daemon.metrics()
        results, errors = daemon.results("clips"), daemon.errors("clips")
    assert state["state"] == "done"
    # Every record in exactly one of results or errors.
    assert sorted([r["id"] for r in results] + [e["id"] for e in errors]) == sorted(row["id"] for row in rows)
    assert len(results) == 5 and len(errors) == 2
    for result in results:
        assert isinstance(result["gen_prompt"], str) and result["gen_prompt"]
        assert result["probe"]["duration_s"] > 0 and result["text"] in CAPTIONS
    by_id = {e["id"]: e for e in errors}
    assert by_id.pop("missing")["error"] in ("FileNotFound", "VideoNotFound")  # the reader checks paths first
    (auth_error,) = by_id.values()
    assert auth_error["error"] == "AuthenticationError" and "HTTP 401" in auth_error["message"]
    assert "not retried" in auth_error["message"] and "Bearer ***" in auth_error["message"]
    # The faults were retried as specified and counted.
    assert [s.fault for s in proxy.log].count("pass") == 5
    step = "step_1_TextGenerator_GPTTextGenerator"
    assert metric_value(metrics, "reelflow_api_retries_total", step=step) == 3
    assert metric_value(metrics, "reelflow_api_requests_total", step=step) == 6 + 3
    assert metric_value(metrics, "reelflow_tokens_out_total", step=step) == 5 * 6
    assert metric_value(metrics, "reelflow_tokens_in_total", step=step) > 0
    assert proxy.max_inflight <= 3
    after_429 = next(i for i, s in enumerate(proxy.log) if s.status == 429)
    waits = [s.started - proxy.log[after_429].finished for s in proxy.log[after_429 + 1 :]]
    assert max(waits) >= 1.0  # the 429'd record came back only after Retry-After
    # The key reached the server, and no file the daemon wrote holds it (nor its log, nor /metrics).
    assert proxy.log[0].headers["authorization"] == f"Bearer {SECRET}"
    assert leaks(daemon.outbox) == [] and leaks(tmp_path / "inbox") == []
    assert SECRET not in daemon.log() and SECRET[:8] not in daemon.log() and SECRET not in metrics


def test_oneshot_text_only(tmp_path, proxy, lm_server):
    meta = tmp_path / "captions.jsonl"
    meta.write_text("".join(json.dumps({"caption": c}) + "\n" for c in CAPTIONS[:4]))
    step = gpt_step(proxy.url, lm_server.model)
    step["config"]["output_key"] = "prompt"
    config = {
        "meta_path": str(meta),
        "base_folder": str(tmp_path / "work"),
        "save_folder": str(tmp_path / "results"),
        "text_key": "caption",
        "steps": [step],
    }
    proxy.plan(Fault.error(503, "overloaded"), Fault.slow(6.0))  # the slow one exceeds timeout_s=5
    finished = run_oneshot(write_config(tmp_path, config), env={"OPENAI_API_KEY": SECRET}, timeout=180)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    results = [row for path in (tmp_path / "results").rglob("*.jsonl") for row in read_jsonl(path)]
    results = [row for row in results if "prompt" in row]
    assert sorted(row["caption"] for row in results) == sorted(CAPTIONS[:4])
    assert all(isinstance(row["prompt"], str) and row["prompt"] for row in results)
    assert [s.fault for s in proxy.log][:2] == ["status", "slow"] and len(proxy.log) == 6
    assert leaks(tmp_path / "results") == [] and leaks(tmp_path / "work") == []
    assert SECRET not in finished.stdout + finished.stderr


def test_oneshot_local_backends_chained(tmp_path, text_lm_dir):
    """`reelflow run` with no API at all: GPTTextGenerator's transformers backend, then
    LocalModelGenerator (n=2) on its answers."""
    meta = tmp_path / "captions.jsonl"
    meta.write_text("".join(json.dumps({"id": f"c{i}", "caption": c}) + "\n" for i, c in enumerate(CAPTIONS[:3])))
    config = {
        "meta_path": str(meta),
        "base_folder": str(tmp_path / "work"),
        "save_folder": str(tmp_path / "results"),
        "text_key": "caption",
        "steps": [
            {
                "type": "TextGenerator",
                "name": "GPTTextGenerator",
                "config": {
                    "model": str(text_lm_dir),
                    "backend": "transformers",
                    "temperature": 0,
                    "max_tokens": 5,
                    "prompt": "Rewrite:",
                    "output_key": "rewritten",
                    "batch_size": 3,
                },
            },
            {
                "type": "TextGenerator",
                "name": "LocalModelGenerator",
                "config": {
                    "model_path": str(text_lm_dir),
                    "user_prompt": "Expand: {rewritten}",
                    "n": 2,
                    "temperature": 1.0,
                    "seed": 1,
                    "max_tokens": 4,
                    "output_key": "expanded",
                    "batch_size": 2,
                },
            },
        ],
    }
    finished = run_oneshot(write_config(tmp_path, config), timeout=180)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    results = [row for path in (tmp_path / "results").rglob("*.jsonl") for row in read_jsonl(path)]
    results = [row for row in results if "expanded" in row]
    assert sorted(row["id"] for row in results) == ["c0", "c1", "c2"]
    for row in results:
        assert isinstance(row["rewritten"], str) and row["rewritten"]
        assert isinstance(row["expanded"], list) and len(row["expanded"]) == 2
