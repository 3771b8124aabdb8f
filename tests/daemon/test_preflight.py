"""Preflight, as a user meets it: `reelflow check`/`run` as real subprocesses, exit codes and one line per problem."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import yaml

from stages.base import Requirements, Stage, StageConfig

ROOT = Path(__file__).resolve().parents[2]


class FailingLoad(Stage):
    """A stage whose load raises something other than OSError, as a broken checkpoint does."""

    Config = StageConfig

    def load(self) -> None:
        raise RuntimeError("weights are corrupt: expected 4 tensors, found 3")

    def process(self, batch):
        return [{} for _ in batch]


class DeclaresNeeds(Stage):
    """A third-party-style stage that declares a package and a checkpoint of its own."""

    Config = StageConfig

    @classmethod
    def requirements(cls, config: StageConfig) -> Requirements:
        return Requirements.of("somextra", "no_such_package_xyz", weights="./no/weights")

    def process(self, batch):
        return [{} for _ in batch]


def _write(folder: Path, steps: list[dict]) -> Path:
    (folder / "meta.jsonl").write_text(json.dumps({"video": "a.mp4", "text": "a cat"}) + "\n")
    config = {
        "meta_path": str(folder / "meta.jsonl"),
        "save_folder": str(folder / "out"),
        "base_folder": str(folder / "work"),
        "steps": steps,
    }
    path = folder / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _reelflow(args: list[str], folder: Path, **env: str) -> subprocess.CompletedProcess:
    hf_home = folder / "hf-home"  # an empty hub cache
    hf_home.mkdir(exist_ok=True)
    full_env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), env.pop("PYTHONPATH", "")])),
        "HF_HOME": str(hf_home),
        "HF_HUB_OFFLINE": "1",
        "REELFLOW_EXTRA_STAGES": "Test.FailingLoad=tests.daemon.test_preflight:FailingLoad",
        **env,
    }
    return subprocess.run(
        [sys.executable, "-m", "daemon.cli", *args],
        cwd=folder,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
    )


CAPTION_STEPS = [
    {"type": "VideoCaptioner", "name": "Qwen2VLCaptioner", "config": {"model_path": "./no/such/folder"}},
    {"type": "VideoCaptioner", "name": "Qwen2VLCaptioner", "config": {"model_path": "Qwen/Qwen2-VL-2B-Instruct"}},
]


def test_check_names_each_unresolvable_model_path_in_one_line(tmp_path):
    config = _write(tmp_path, CAPTION_STEPS)
    done = _reelflow(["check", "--config", str(config)], tmp_path)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 2, done.stderr
    assert "steps[0] (VideoCaptioner/Qwen2VLCaptioner)" in lines[0] and "./no/such/folder" in lines[0]
    assert "not an existing folder" in lines[0]
    assert "steps[1]" in lines[1] and "Qwen/Qwen2-VL-2B-Instruct" in lines[1]
    assert "not in the local hub cache" in lines[1] and "HF_HUB_OFFLINE" in lines[1]
    assert "Traceback" not in done.stderr


def test_run_stops_before_writing_anything(tmp_path):
    config = _write(tmp_path, CAPTION_STEPS[1:])
    done = _reelflow(["run", "--config", str(config)], tmp_path)
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "Qwen/Qwen2-VL-2B-Instruct" in done.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()


def test_folder_without_checkpoint_files_is_refused(tmp_path):
    (tmp_path / "empty-model").mkdir()
    steps = [{"type": "VideoCaptioner", "name": "Qwen2VLCaptioner", "config": {"model_path": "./empty-model"}}]
    done = _reelflow(["check", "--config", str(_write(tmp_path, steps))], tmp_path)
    assert done.returncode == 2
    assert "without config.json or model_index.json" in done.stderr


def test_missing_dependency_named_with_its_extra(tmp_path):
    # Make `transformers` uninstalled for the subprocess: a None entry in sys.modules is what
    # importlib reports as "no such module", for find_spec and import alike.
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text("import sys\nsys.modules['transformers'] = None\n")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    steps = [{"type": "VideoCaptioner", "name": "Qwen2VLCaptioner", "config": {"model_path": "./model"}}]
    done = _reelflow(["check", "--config", str(_write(tmp_path, steps))], tmp_path, PYTHONPATH=str(shim))
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert "steps[0] (VideoCaptioner/Qwen2VLCaptioner)" in done.stderr
    assert "`transformers`" in done.stderr and "pip install 'reelflow[captioners]'" in done.stderr


def test_a_step_whose_keys_fail_still_names_its_missing_packages(tmp_path):
    # One round for the newcomer: the unset key and the missing package in the same answer.
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text("import sys\nsys.modules['openai'] = None\n")
    steps = [{"type": "TextGenerator", "name": "APIGenerator", "config": {"model_id": "openai:gpt-4o"}}]
    done = _reelflow(
        ["check", "--config", str(_write(tmp_path, steps))], tmp_path, PYTHONPATH=str(shim), OPENAI_API_KEY=""
    )
    assert done.returncode == 2, done.stderr
    assert "set OPENAI_API_KEY" in done.stderr, done.stderr
    assert "steps[0] (TextGenerator/APIGenerator): APIGenerator needs the `openai` package" in done.stderr
    assert "pip install 'reelflow[text]'" in done.stderr and "Traceback" not in done.stderr


def test_check_offline_accepts_a_hub_id_it_cannot_look_up(tmp_path):
    done = _reelflow(
        ["check", "--offline", "--config", str(_write(tmp_path, CAPTION_STEPS[1:]))], tmp_path, HF_HUB_OFFLINE=""
    )
    assert done.returncode == 0, done.stderr
    assert ": ok" in done.stdout


def test_load_failure_is_one_line_naming_the_step(tmp_path):
    steps = [{"type": "Test", "name": "FailingLoad", "config": {}}]
    done = _reelflow(["run", "--no-progress", "--config", str(_write(tmp_path, steps))], tmp_path)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    failed = [line for line in done.stderr.splitlines() if line.startswith("reelflow: failed")]
    assert len(failed) == 1, done.stderr
    assert "Test/FailingLoad" in failed[0] and "RuntimeError: weights are corrupt" in failed[0]


class _Unavailable(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - the http.server API
        self.send_response(503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_hub_that_answers_503_is_one_line_with_the_fixes(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Unavailable)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        config = _write(tmp_path, CAPTION_STEPS[1:])
        done = _reelflow(["check", "--config", str(config)], tmp_path, HF_HUB_OFFLINE="0", HF_ENDPOINT=endpoint)
    finally:
        server.shutdown()
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert "Qwen/Qwen2-VL-2B-Instruct" in line and "the hub answered HTTP 503" in line
    assert "HF_HUB_OFFLINE=1" in line and "local checkpoint folder" in line


def test_hub_id_in_the_local_cache_and_local_folder_pass_offline(tmp_path):
    from tests.tiny.diffusers_pipelines import place_in_hub_cache

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    place_in_hub_cache(model, tmp_path / "hf-home", "Qwen/Qwen2-VL-2B-Instruct")
    steps = [
        {"type": "VideoCaptioner", "name": "Qwen2VLCaptioner", "config": {"model_path": "Qwen/Qwen2-VL-2B-Instruct"}},
        {"type": "VideoCaptioner", "name": "Qwen2VLCaptioner", "config": {"model_path": "./model"}},
    ]
    done = _reelflow(["check", "--config", str(_write(tmp_path, steps))], tmp_path)
    assert done.returncode == 0, done.stderr
    assert ": ok (2 step(s)" in done.stdout


def _serve_config(folder: Path, steps: list[dict]) -> Path:
    config = {
        "steps": steps,
        "daemon": {"inbox": str(folder / "inbox"), "outbox": str(folder / "outbox"), "metrics": {"port": 0}},
    }
    path = folder / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_serve_stops_before_creating_anything_on_a_preflight_problem(tmp_path):
    done = _reelflow(["serve", "--config", str(_serve_config(tmp_path, CAPTION_STEPS[:1]))], tmp_path)
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "./no/such/folder" in done.stderr
    assert not (tmp_path / "inbox").exists() and not (tmp_path / "outbox").exists()


def test_serve_load_failure_is_one_line(tmp_path):
    steps = [{"type": "Test", "name": "FailingLoad", "config": {}}]
    done = _reelflow(["serve", "--config", str(_serve_config(tmp_path, steps))], tmp_path)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    (failed,) = [line for line in done.stderr.splitlines() if line.startswith("reelflow: failed")]
    assert "Test/FailingLoad" in failed and "weights are corrupt" in failed


def test_what_each_stage_declares_is_what_preflight_checks(tmp_path):
    """Preflight reads `Stage.requirements(config)` alone: a stage from outside stages/, the newer
    families (embedders, curation filters) and a captioner's nested judge are all checked, each
    problem one line naming the step, the setting and the fix."""
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text("import sys\nsys.modules['faiss'] = None\n")  # faiss-cpu uninstalled
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    judged = {
        "model_path": "./model",
        "num_candidates": 2,
        "temperature": 0.7,
        "select": "judge",
        "judge": {"backend": "transformers", "model": "./no/judge"},
    }
    steps = [
        {"type": "Test", "name": "DeclaresNeeds", "config": {}},
        {"type": "VideoEmbedder", "name": "CLIPEmbedder", "config": {"model_path": "./no/clip"}},
        {"type": "VideoFilter", "name": "NearDuplicateFilter", "config": {}},
        {"type": "VideoCaptioner", "name": "Qwen2VLCaptioner", "config": judged},
    ]
    stages = "Test.DeclaresNeeds=tests.daemon.test_preflight:DeclaresNeeds"
    done = _reelflow(
        ["check", "--config", str(_write(tmp_path, steps))],
        tmp_path,
        PYTHONPATH=str(shim),
        REELFLOW_EXTRA_STAGES=stages,
    )
    assert done.returncode == 2, done.stderr
    config_path = str(tmp_path / "c.yaml")
    lines = [line.removeprefix(f"{config_path}: ") for line in done.stderr.strip().splitlines()]
    assert len(lines) == 4, done.stderr
    assert lines[0].startswith("steps[0] (Test/DeclaresNeeds): DeclaresNeeds needs the `no_such_package_xyz` package")
    assert "pip install 'reelflow[somextra]'" in lines[0]  # a missing package: its checkpoint is not looked at
    assert lines[1].startswith(
        "steps[1] (VideoEmbedder/CLIPEmbedder): model_path './no/clip' is not an existing folder"
    )
    assert lines[2].startswith("steps[2] (VideoFilter/NearDuplicateFilter): NearDuplicateFilter needs the `faiss`")
    assert "pip install 'reelflow[curation]'" in lines[2]
    assert lines[3].startswith(
        "steps[3] (VideoCaptioner/Qwen2VLCaptioner): judge.model './no/judge' is not an existing"
    )


def test_a_missing_input_and_a_missing_model_come_in_one_answer(tmp_path):
    """Fixing the model path, then learning the input is missing, costs a newcomer a second round."""
    config = yaml.safe_load(_write(tmp_path, CAPTION_STEPS[:1]).read_text())
    config["meta_path"] = "demo/meta.jsonl"
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    for command in ("check", "run"):
        done = _reelflow([command, "--config", "c.yaml"], tmp_path)
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 2 and all(line.startswith("c.yaml: ") for line in lines), done.stderr
        assert "steps[0] (VideoCaptioner/Qwen2VLCaptioner): model_path './no/such/folder'" in lines[0]
        assert "meta_path: no such file: demo/meta.jsonl" in lines[1]


def test_check_refuses_the_missing_input_that_run_would_refuse(tmp_path):
    """A one-shot config (it names a meta_path): `check` catches what `run` stops on, with the same line."""
    steps = [{"type": "VideoProcessor", "name": "VideoProbe"}]
    config = yaml.safe_load(_write(tmp_path, steps).read_text())
    config["meta_path"] = "demo/meta.jsonl"  # relative, as the shipped configs write it, and not made yet
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    checked = _reelflow(["check", "--config", "c.yaml"], tmp_path)
    ran = _reelflow(["run", "--config", "c.yaml"], tmp_path)
    assert checked.returncode == ran.returncode == 2, (checked.stderr, ran.stderr)
    line = next(line for line in checked.stderr.splitlines() if "meta_path" in line)
    assert f"no such file: demo/meta.jsonl (looked for {tmp_path / 'demo' / 'meta.jsonl'}" in line
    assert "python -m tests.media demo" in line
    assert line in ran.stderr
    assert not (tmp_path / "out").exists()
