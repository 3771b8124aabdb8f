"""Shared fixtures: test videos encoded once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.media import make_test_videos


@pytest.fixture(scope="session")
def videos(tmp_path_factory) -> dict[str, Path]:
    """Good, odd and broken videos (see tests/media.py), made once per session."""
    return make_test_videos(tmp_path_factory.mktemp("videos"))
