"""Shared fixtures: test videos encoded once per session."""

from __future__ import annotations

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
