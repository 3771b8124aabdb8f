"""Config validation: every problem at once with its key path, did-you-mean, ${ENV}, `reelflow check`."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from daemon.config import ConfigError, load_config, parse_config
from tests.harness import REPO

GOOD = """
steps:
  - type: VideoProcessor
    name: FrameSampler
    config: {num_frames: 4, batch_size: 2}
"""


def problems_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "c.yaml")
    return caught.value.problems


def test_good_config_combines_stage_and_runtime_keys():
    config = parse_config(GOOD + "video_key: clip\n")
    (step,) = config.steps
    assert step.label == "step_0_VideoProcessor_FrameSampler"
    assert step.config.num_frames == 4 and step.config.batch_size == 2
    assert step.config.video_key == "clip"  # the pipeline-wide key reaches the step
    assert step.runtime.batch_size == 2 and step.runtime.queue_size == 64
    assert config.daemon.settle_ms == 2000 and config.daemon.metrics.host == "127.0.0.1"


def test_every_problem_is_reported_at_once_with_its_key_path():
    text = """
meta_pth: x.jsonl
steps:
  - type: VideoProcessor
    name: FrameSampler
    config: {num_frames: 0, batch_size: 0, colour: red}
  - type: VideoProcessor
    name: VideoProbe
    config: {queue_size: -1}
  - type: VideoProcessor
    name: FrameSampler
    config: {num_frames: 4, fps: 2}
  - name: VideoProbe
daemon:
  settle_ms: -5
  metrics: {port: 70000}
  inbx: somewhere
"""
    problems = problems_of(text)
    joined = "\n".join(problems)
    expected = [
        r"^meta_pth: unknown key",
        r"^steps\[0\]\.config\.num_frames: .*greater than or equal to 1 \(got 0\)",
        r"^steps\[0\]\.config\.batch_size: .*greater than or equal to 1 \(got 0\)",
        r"^steps\[0\]\.config\.colour: unknown key",
        r"^steps\[1\]\.config\.queue_size: .*\(got -1\)",
        r"^steps\[2\]\.config: .*give num_frames or fps, not both",
        r"^steps\[3\]\.type: required key is missing",
        r"^daemon\.settle_ms: .*\(got -5\)",
        r"^daemon\.metrics\.port: .*\(got 70000\)",
        r"^daemon\.inbx: unknown key",
    ]
    for pattern in expected:
        assert any(re.search(pattern, p) for p in problems), f"no problem matches {pattern!r} in:\n{joined}"
    assert len(problems) == len(expected), joined
    # The exception's text holds them all, for the CLI to print.
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "c.yaml")
    assert str(caught.value).startswith(f"c.yaml: {len(expected)} problem(s)")


def test_unknown_stage_lists_known_ones_and_guesses():
    problems = problems_of(GOOD.replace("FrameSampler", "FrameSampeler"))
    assert len(problems) == 1
    message = problems[0]
    assert message.startswith("steps[0]: no stage registered as type 'VideoProcessor', name 'FrameSampeler'")
    assert "Did you mean VideoProcessor/FrameSampler?" in message
    assert "VideoProcessor/VideoProbe" in message and "VideoProcessor/FrameSampler" in message


def test_unknown_stage_type_without_close_match_still_lists_known_ones():
    (message,) = problems_of(GOOD.replace("VideoProcessor", "Zzzzzz").replace("FrameSampler", "Qqqq"))
    assert "Did you mean" not in message
    assert "Available: " in message and "VideoProcessor/VideoProbe" in message


def test_env_expansion(monkeypatch):
    monkeypatch.setenv("RF_TEST_FRAMES", "6")
    monkeypatch.setenv("RF_TEST_INBOX", "/srv/drop")
    monkeypatch.delenv("RF_TEST_UNSET", raising=False)
    text = GOOD.replace("num_frames: 4", "num_frames: '${RF_TEST_FRAMES}'") + (
        "daemon: {inbox: '${RF_TEST_INBOX}/in', outbox: '${RF_TEST_UNSET:-/srv/out}'}\n"
    )
    config = parse_config(text)
    assert config.steps[0].config.num_frames == 6
    assert config.daemon.inbox == Path("/srv/drop/in")
    assert config.daemon.outbox == Path("/srv/out")


def test_missing_env_var_is_a_problem_with_its_path(monkeypatch):
    monkeypatch.delenv("RF_TEST_UNSET", raising=False)
    monkeypatch.delenv("RF_TEST_UNSET2", raising=False)
    text = GOOD + "daemon: {inbox: '${RF_TEST_UNSET}', outbox: '${RF_TEST_UNSET2}/x'}\n"
    problems = problems_of(text)
    assert any(p.startswith("daemon.inbox: environment variable ${RF_TEST_UNSET} is not set") for p in problems)
    assert any(p.startswith("daemon.outbox: environment variable ${RF_TEST_UNSET2} is not set") for p in problems)
    assert "${RF_TEST_UNSET:-default}" in problems[0]  # says how to fix it


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("steps: [\n  - type: x\n name", "not valid YAML"),
        ("- just\n- a list\n", "expected a mapping with a `steps:` list"),
        ("", "expected a mapping"),
        ("steps: []\n", "steps: List should have at least 1 item"),
        ("steps: {type: VideoProcessor}\n", "steps: Input should be a valid list"),
    ],
)
def test_malformed_files_are_one_clear_problem(text, fragment):
    problems = problems_of(text)
    assert any(fragment in p for p in problems), problems


def test_unreadable_file(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "nope.yaml")
    assert "cannot read the config file" in caught.value.problems[0]


def test_bom_config_loads(tmp_path):
    path = tmp_path / "bom.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + GOOD.encode())
    assert load_config(path).steps[0].name == "FrameSampler"


def _check(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "daemon.cli", "check", "--config", str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.timeout(120)
def test_reelflow_check_prints_every_problem_and_exits_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(GOOD.replace("FrameSampler", "FrameSampeler") + "daemon: {settle_ms: -1, rescan: 3}\n")
    result = _check(bad)
    assert result.returncode == 2, result.stderr
    assert "3 problem(s)" in result.stderr
    assert "Did you mean VideoProcessor/FrameSampler?" in result.stderr
    assert "daemon.settle_ms" in result.stderr and "daemon.rescan: unknown key" in result.stderr
    good = tmp_path / "good.yaml"
    good.write_text(GOOD)
    result = _check(good)
    assert result.returncode == 0, result.stderr
    assert "ok (1 step(s): VideoProcessor/FrameSampler)" in result.stdout


# --- every shipped config -------------------------------------------------------------------

CONFIGS = REPO / "configs"


def pipeline_configs() -> list[Path]:
    """Every YAML under configs/ that is a pipeline config (has `steps:`); deploy files are not."""
    found = []
    for path in sorted([*CONFIGS.rglob("*.yaml"), *CONFIGS.rglob("*.yml")]):
        data = yaml.safe_load(path.read_text(encoding="utf-8-sig"))
        if isinstance(data, dict) and "steps" in data:
            found.append(path)
    return found


def test_the_issue_configs_are_shipped():
    names = {p.name for p in pipeline_configs()}
    assert {"demo.yaml", "probe_frames.yaml"} <= names


@pytest.mark.parametrize("path", pipeline_configs(), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_shipped_config_validates(path, monkeypatch):
    text = path.read_text(encoding="utf-8-sig")
    first = text.lstrip().splitlines()[0]
    assert first.startswith("#"), f"{path.name} must start with a comment giving the command that runs it"
    head = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    assert re.search(r"reelflow (run|serve)|run_pipeline\.py", head), f"{path.name}: no command in its header"
    # Secrets are not part of validity: give any variable the file needs a placeholder.
    for name in re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", text):
        monkeypatch.setenv(name, __import__("os").environ.get(name, "placeholder"))
    config = load_config(path)
    assert config.steps


def test_extra_stages_env_var(monkeypatch):
    monkeypatch.setenv("REELFLOW_EXTRA_STAGES", "Test.Echo=tests.stages_for_tests:Echo")
    assert parse_config(
        GOOD.replace("VideoProcessor", "Test").replace("FrameSampler", "Echo").replace("num_frames: 4, ", "")
    )
    monkeypatch.setenv("REELFLOW_EXTRA_STAGES", "Test.Echo")
    (message,) = problems_of(GOOD)
    assert "REELFLOW_EXTRA_STAGES: cannot read 'Test.Echo'; expected Type.Name=module:Class" in message


def test_reelflow_steps_lists_the_registered_stages_and_their_keys():
    result = subprocess.run(
        [sys.executable, "-m", "daemon.cli", "steps", "-v"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "VideoProcessor/VideoProbe" in result.stdout.splitlines()
    assert "VideoProcessor/FrameSampler" in result.stdout.splitlines()
    assert "cannot import" not in result.stdout
    one = subprocess.run(
        [sys.executable, "-m", "daemon.cli", "steps", "FrameSampler"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "VideoProcessor/FrameSampler  (stages.video.sampler:FrameSampler)" in one.stdout
    assert "    num_frames = None: Frames spaced evenly over the video." in one.stdout


def test_a_stage_whose_resources_contradict_its_prepare_is_refused(monkeypatch):
    """The runtime runs `prepare` where `resources()` declares it: a stage that defines one and
    says otherwise is refused before anything loads, naming the fix."""
    import dataclasses

    from tests.stages_for_tests import Echo

    declared = Echo.resources

    def without_prepare(config):
        return dataclasses.replace(declared(config), prepares=False)

    monkeypatch.setattr(Echo, "resources", without_prepare)
    with pytest.raises(ConfigError) as caught:
        parse_config("steps:\n  - {type: Test, name: Echo}\n")
    assert "Echo.resources() says prepares=False, but the class defines prepare()" in str(caught.value)
    assert "Resources(..., prepares=True)" in str(caught.value)
