"""Shared fixtures: test videos encoded once per session, a tiny tmpfs for disk-full faults."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.media import make_test_videos


@pytest.fixture(scope="session")
def videos(tmp_path_factory) -> dict[str, Path]:
    """Good, odd and broken videos (see tests/media.py), made once per session."""
    return make_test_videos(tmp_path_factory.mktemp("videos"))


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> Path:
    """A tiny random-weight CLIP folder (tests/tiny/clip.py), built once per session."""
    from tests.tiny.clip import tiny_clip_path

    return tiny_clip_path(tmp_path_factory)


@pytest.fixture
def tmpfs(tmp_path):
    """Mount a tiny tmpfs (tests run as root in CI); skip with the reason when that is not allowed."""
    mounted: list[Path] = []

    def mount(folder: Path, size_kb: int) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(folder)], capture_output=True, text=True
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs (needs root): {done.stderr.strip()}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in reversed(mounted):
        subprocess.run(["umount", "-l", str(folder)], check=False)
