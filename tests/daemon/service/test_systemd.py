"""configs/systemd/reelflow.service: `systemd-analyze verify` passes with nothing printed, and the
settings the issue asks for are there (the daemon side of sd_notify is tested in test_notify.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from daemon.config import DaemonSection
from tests.harness import REPO

UNIT = REPO / "configs" / "systemd" / "reelflow.service"
INSTALLED_AT = "/opt/reelflow/.venv/bin/reelflow"


def reelflow_executable(tmp_path: Path) -> Path:
    """The `reelflow` console script of this environment (pip install -e . makes it), else a
    launcher for this checkout: verify needs ExecStart's program to exist and be executable."""
    script = Path(sys.executable).parent / "reelflow"
    if script.is_file() and os.access(script, os.X_OK):
        return script
    launcher = tmp_path / "bin" / "reelflow"
    launcher.parent.mkdir()
    launcher.write_text(f'#!/bin/sh\nPYTHONPATH="{REPO}" exec "{sys.executable}" -m daemon.cli "$@"\n')
    launcher.chmod(0o755)
    return launcher


def unit_settings() -> dict[str, list[str]]:
    """`Section.Key` -> its values, in order (a systemd unit repeats keys, which configparser refuses)."""
    settings: dict[str, list[str]] = {}
    section = None
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        settings.setdefault(f"{section}.{key}", []).append(value)
    return settings


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_unit_passes_systemd_analyze_verify_without_a_warning(tmp_path: Path):
    executable = reelflow_executable(tmp_path)
    text = UNIT.read_text()
    assert text.count(INSTALLED_AT) == 1
    copy = tmp_path / "reelflow.service"
    copy.write_text(text.replace(INSTALLED_AT, str(executable)))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and result.stderr == "", f"verify printed:\n{result.stdout}{result.stderr}"
    # The program it starts is reelflow's CLI with a `serve` command that takes --config.
    usage = subprocess.run([str(executable), "serve", "--help"], capture_output=True, text=True, timeout=60)
    assert usage.returncode == 0 and "--config" in usage.stdout, usage.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_verify_does_flag_a_broken_unit(tmp_path: Path):
    """The check above can fail: a typo in a directive is reported."""
    copy = tmp_path / "reelflow.service"
    broken = UNIT.read_text().replace(INSTALLED_AT, str(reelflow_executable(tmp_path)))
    copy.write_text(broken.replace("KillMode=mixed", "KillMode=mixed\nProtectSytem=strict"))
    result = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=60)
    assert "Unknown key 'ProtectSytem'" in result.stderr


def test_unit_has_what_the_daemon_needs():
    s = unit_settings()
    assert s["Service.Type"] == ["notify"]
    assert s["Service.ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert "notify-reload" in UNIT.read_text()  # the comment for systemd >= 253
    assert s["Service.ExecStart"][0].split()[1:] == ["serve", "--config", "/etc/reelflow/config.yaml"]
    assert s["Service.Restart"] == ["on-failure"]
    assert s["Service.KillMode"] == ["mixed"]
    assert int(s["Service.WatchdogSec"][0]) >= 10
    assert int(s["Service.TimeoutStartSec"][0]) >= 600, "model loading can take minutes"
    drain = DaemonSection().drain_timeout_s
    assert int(s["Service.TimeoutStopSec"][0]) > drain, "TimeoutStopSec must leave room for the drain"
    assert s["Service.ProtectSystem"] == ["strict"]
    assert s["Service.NoNewPrivileges"] == ["yes"] and s["Service.PrivateTmp"] == ["yes"]
    writable = " ".join(s["Service.ReadWritePaths"]).split()
    assert "/var/lib/reelflow" in writable and "/var/cache/reelflow" in writable
    assert "Service.PrivateDevices" not in s, "PrivateDevices hides the GPUs"
    allowed = " ".join(s["Service.DeviceAllow"])
    assert "/dev/nvidiactl" in allowed and "char-nvidia-frontend" in allowed and "nvidia-uvm" in allowed
