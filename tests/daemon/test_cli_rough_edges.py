"""The CLI's first-hour edges: "did you mean", keys beside `config:`, one list of stages, `steps`, `--version`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from daemon.cli import main
from daemon.config import ConfigError, parse_config

ROOT = Path(__file__).resolve().parents[2]


def problems_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    return caught.value.problems


def test_misspelt_keys_get_a_guess_at_every_level():
    problems = problems_of(
        """
steps:
  - type: VideoProcessor
    name: FrameSampler
    config: {num_frame: 4, batch_sise: 2}
daemon: {setle_ms: 3, metrics: {prot: 1}}
"""
    )
    assert "steps[0].config.num_frame: unknown key; did you mean 'num_frames'?" in problems
    assert "steps[0].config.batch_sise: unknown key; did you mean 'batch_size'?" in problems
    assert "daemon.setle_ms: unknown key; did you mean 'settle_ms'?" in problems
    assert "daemon.metrics.prot: unknown key; did you mean 'port'?" in problems


def test_top_level_synonyms_name_reelflows_key():
    problems = problems_of(
        """
input: rows.jsonl
output_dir: out
inbox: drop
steps:
  - type: VideoProcessor
    name: FrameSampler
"""
    )
    assert "input: unknown key; reelflow calls it meta_path (one-shot input file)" in problems
    assert "output_dir: unknown key; reelflow calls it save_folder (one-shot results)" in problems
    assert "inbox: unknown key; reelflow calls it daemon.inbox (the folder `reelflow serve` watches)" in problems


def test_runtime_key_beside_config_says_it_belongs_inside():
    (problem,) = problems_of(
        "steps:\n  - type: VideoProcessor\n    name: FrameSampler\n    batch_size: 4\n    config: {num_frames: 4}\n"
    )
    assert problem.startswith("steps[0].batch_size: unknown key beside type/name/config")
    assert "steps[0].config.batch_size" in problem


def test_several_unknown_stages_list_the_known_ones_once():
    problems = problems_of("steps:\n  - {type: Nope, name: A}\n  - {type: Nope, name: B}\n  - {type: Nope, name: C}\n")
    assert len(problems) == 4
    assert sum("VideoProcessor/VideoProbe" in p for p in problems) == 1
    assert problems[-1].startswith("available stages: ")
    assert problems[0] == "steps[0]: no stage registered as type 'Nope', name 'A'."


def test_steps_is_one_line_per_stage_with_short_aliases(capsys):
    assert main(["steps"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "VideoCaptioner/Qwen2VLCaptioner  (also /QwenVLCaptioner)" in lines
    assert "ImageGenerator/FLUXGenerator  (also VideoGenerator/)" in lines
    assert not any(line.startswith("VideoGenerator/FLUXGenerator") for line in lines)


def test_steps_verbose_lists_keys_compactly_and_name_shows_one_stage(capsys):
    assert main(["steps", "-v"]) == 0
    verbose = capsys.readouterr().out.splitlines()
    assert len(verbose) < 150
    assert any("num_frames" in line for line in verbose)
    assert main(["steps", "FrameSampler"]) == 0
    one = capsys.readouterr().out.splitlines()
    assert one[0].startswith("VideoProcessor/FrameSampler  (stages.video.sampler:FrameSampler)")
    assert any(line.strip().startswith("num_frames = ") for line in one)
    assert not any("Qwen2VLCaptioner" in line for line in one)
    assert main(["steps", "FrmeSampler"]) == 2
    assert "Did you mean FrameSampler?" in capsys.readouterr().err


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith("reelflow ")


def test_media_help_prints_help_and_creates_nothing(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "tests.media", "--help"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and "usage: python -m tests.media" in done.stdout
    assert list(tmp_path.iterdir()) == []
